"""``dt.qfx``: trainable fixed point on a small MBConv network (the pretrained CNN's blocks,
random weights) and on transformers' Linear layers; ``qfx_export`` and ``integer_infer``
reproduce the float64 emulation bit for bit; K-hot weights; the learned binary points."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.errors import DeltatuneError
from deltatune.quant import integer_infer
from deltatune.quant.fixed_point import FixedFormat
from deltatune.quant.integer import int_cast
from deltatune.quant.ops import GlobalAvgPool
from deltatune.quant.qfx import FixedQuantizer, QfxWeighted
from deltatune.train.vision import BN_EPS, MBConv, SameConv2d


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = SameConv2d(3, 8, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(8, eps=BN_EPS)
        self.act = nn.ReLU6()
        self.block = MBConv(8, 8, 2, 3, 1)          # with its residual sum
        self.block2 = MBConv(8, 12, 2, 5, 2)
        self.pool = GlobalAvgPool()
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(self.drop(self.pool(self.block2(self.block(self.act(self.bn(self.stem(x))))))))


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):     # statistics as a trained network has them
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return net.eval()


@pytest.fixture
def images():
    return torch.randn(12, 3, 20, 20, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("options", [dict(), dict(weight_bits=4, act_bits=6), dict(weight_khot=2),
                                     dict(quant="AP_TRN", overflow="AP_WRAP"),
                                     dict(weight_per_channel=False)])
def test_integer_inference_reproduces_the_emulation_bit_for_bit(tmp_path, images, options):
    net = dt.qfx(tiny_net(), calibration=[images[:6], images[6:]], **options).double()
    emulated = net(images.double())
    dt.qfx_export(net, tmp_path)
    result = integer_infer(tmp_path, images)
    assert result.values.dtype == np.int64
    assert torch.equal(result.to_tensor(), emulated)
    spec = json.loads((tmp_path / "qfx.json").read_text())
    kinds = {op["kind"] for op in spec["ops"]}
    assert kinds == {"conv2d", "affine", "relu6", "add", "avgpool", "linear"}
    assert "ap_fixed<" in (tmp_path / "weights.h").read_text()

    # one LSB added to every weight of one layer: the integer run no longer matches
    from safetensors.numpy import load_file, save_file
    weights = load_file(str(tmp_path / "weights.safetensors"))
    weights["block._project_conv.weight"] += 1
    save_file(weights, str(tmp_path / "weights.safetensors"))
    assert not torch.equal(integer_infer(tmp_path, images).to_tensor(), emulated)


def test_every_op_is_quantised_and_the_types_come_from_calibration(images):
    net = tiny_net()
    float_out = net(images)
    q = dt.qfx(copy.deepcopy(net), weight_bits=8, act_bits=8, calibration=[images])
    ops = {n: type(m).__name__ for n, m in q.named_modules() if type(m).__name__.startswith("Qfx")}
    assert ops["stem"] == "QfxWeighted" and ops["bn"] == "QfxBatchNorm" and ops["act"] == "QfxActivation"
    assert ops["block._add"] == "QfxAdd" and ops["pool"] == "QfxAvgPool" and ops["fc"] == "QfxWeighted"
    # only the first conv reads a float input; every other op's input is already fixed point
    assert [n for n, m in q.named_modules() if isinstance(m, QfxWeighted) and bool(m.quantize_input)] == ["stem"]
    # calibration: the ReLU6's output type is unsigned, with just enough integer bits for its largest
    # value; the BatchNorm's before it is signed with one more (the sign)
    with torch.no_grad():
        before = net.bn(net.stem(images))
        top = net.act(before).max().item()
    assert q.act.output.format() == FixedFormat(8, math.ceil(math.log2(top)), False, "AP_RND", "AP_SAT")
    assert q.bn.output.format().int_bits == math.ceil(math.log2(before.abs().max().item())) + 1
    out = q(images)
    assert 0 < (out - float_out).abs().max() < 0.1 * float_out.abs().max()


def test_learned_binary_point_moves_toward_the_data():
    """The gradient to the integer bits: negative (more integer bits) when values saturate,
    positive (more fraction bits) when the range is far too wide."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4
    for start, sign in ((0.0, -1), (6.0, 1)):
        q = FixedQuantizer(6, "AP_RND", "AP_SAT")
        q.calibrated.fill_(True)
        q.int_bits.data.fill_(start)
        ((q(x) - x) ** 2).mean().backward()
        assert torch.sign(q.int_bits.grad).item() == sign, (start, q.int_bits.grad)
    # and training settles the split of 6 bits for N(0, 4^2) data from a poor start (I = 0)
    q = FixedQuantizer(6, "AP_RND", "AP_SAT")
    q.calibrated.fill_(True)
    q.int_bits.data.fill_(0.0)
    opt = torch.optim.Adam(q.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        ((q(x) - x) ** 2).mean().backward()
        opt.step()
    # the MSE-optimal split is I = 5 (sign + 4: range +-16 = 4 sigma, LSB 0.5; I = 4 clips at 2
    # sigma, I = 6 doubles the step); the estimator settles on the 4.5 boundary just below it
    assert q.format().int_bits in (4, 5)
    assert ((q(x) - x) ** 2).mean() < 0.3


def _naf_weight(k: int) -> int:
    """The fewest signed powers of two that sum to ``k``: the weight of its non-adjacent form."""
    count = 0
    while k:
        if k & 1:
            digit = 2 - (k & 3)         # +1 or -1
            k -= digit
            count += 1
        k //= 2
    return count


@pytest.mark.parametrize("k", [1, 2])
def test_khot_weights_are_sums_of_at_most_k_powers_of_two(images, k):
    q = dt.qfx(tiny_net(), calibration=[images], weight_khot=k)
    for name, m in q.named_modules():
        if isinstance(m, QfxWeighted):
            w = m.quantized_weight().detach().double()
            lsb = torch.tensor([f.lsb for f in m.weight.channel_formats()], dtype=torch.float64)
            ints = (w / lsb.reshape(-1, *([1] * (w.dim() - 1)))).flatten().tolist()
            assert all(float(i).is_integer() for i in ints), name
            assert max(_naf_weight(int(i)) for i in ints) <= k, name
            assert sum(_naf_weight(int(i)) == k for i in ints) > 0, name      # the budget is used


def test_int_cast_agrees_with_the_float_cast_on_every_mode():
    from deltatune.quant.fixed_point import OVERFLOW_MODES, QUANT_MODES, cast
    k = np.arange(-300, 301, dtype=np.int64)
    for quant in QUANT_MODES:
        for overflow in OVERFLOW_MODES:
            for signed in (True, False):
                fmt = FixedFormat(5, 2, signed, quant, overflow)
                as_float = cast(torch.from_numpy(k).double() / 16, 5, 2, signed, quant, overflow)
                assert torch.equal(torch.from_numpy(int_cast(k, 4, fmt)).double() * fmt.lsb, as_float), fmt


def test_qfx_on_transformers_linear_layers_trains():
    from test_train import make_tiny_model
    transformers = pytest.importorskip("transformers")
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        path = make_tiny_model(__import__("pathlib").Path(folder))
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    ids = torch.randint(5, 90, (4, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dt.qfx(model, weight_bits=8, act_bits=8, calibration=[batch])
    linear = [n for n, m in model.named_modules() if isinstance(m, QfxWeighted)]
    assert len(linear) >= 6 and all(bool(model.get_submodule(n).quantize_input) for n in linear)
    loss = model(**batch, labels=torch.tensor([0, 1, 2, 0])).loss
    loss.backward()
    q = model.get_submodule(linear[0])
    assert q.weight.int_bits.grad is not None and q.base.weight.grad is not None


def test_bad_input(images):
    with pytest.raises(DeltatuneError, match="weight_bits=0 must be an int from 1"):
        dt.qfx(tiny_net(), weight_bits=0, calibration=[images])
    with pytest.raises(DeltatuneError, match="'AP_ROUND' is not an HLS mode"):
        dt.qfx(tiny_net(), quant="AP_ROUND", calibration=[images])
    with pytest.raises(DeltatuneError, match=r"cannot quantise 'drop' \(Dropout\)"):
        dt.qfx(tiny_net(), targets=["stem", "drop"], calibration=[images])
    with pytest.raises(DeltatuneError, match="'nosuch', which is not a module"):
        dt.qfx(tiny_net(), targets=["nosuch"], calibration=[images])
    with pytest.raises(DeltatuneError, match="calibration is empty"):
        dt.qfx(tiny_net(), calibration=[])
    q = dt.qfx(tiny_net(), calibration=[images])
    with pytest.raises(DeltatuneError, match="already quantised"):
        dt.qfx(q, calibration=[images])
    partial = dt.qfx(tiny_net(), targets=["stem", "bn"], calibration=[images])
    with pytest.raises(DeltatuneError, match="a float operation follows it"):
        dt.qfx_export(partial.double(), "/nonexistent/never-written")
    gap = dt.qfx(tiny_net(), targets=["stem", "act", "block._expand_conv"], calibration=[images])   # bn left float
    with pytest.raises(DeltatuneError, match="act reads a value that no quantised op produced"):
        dt.qfx_export(gap.double(), "/nonexistent/never-written")


def test_train_qfx_from_a_float_fine_tune(tmp_path, capsys):
    """``deltatune train --method full --qfx 8,8 --init-from RUN``: quantisation-aware fine-tuning
    of the float run's model; the learned integer bits are in the checkpoint."""
    from test_train import make_dataset, make_tiny_model

    from deltatune import cli
    from deltatune.train.checkpoint import load_checkpoint
    model = make_tiny_model(tmp_path / "tiny")
    data = make_dataset(tmp_path / "toy.csv")
    common = ["train", "--data", str(data), "--model", str(model), "--method", "full", "--epochs", "1",
              "--batch-size", "16", "--max-length", "24", "--no-progress", "--device", "cpu", "--lr", "1e-3"]
    assert cli.main([*common, "--out", str(tmp_path / "float")]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "q"), "--qfx", "8,8", "--init-from", str(tmp_path / "float")]) == 0
    metrics = json.loads((tmp_path / "q" / "metrics.json").read_text())
    assert 0 <= metrics["qfx_exact_test_accuracy"] <= 1 and metrics["qfx_exported"] is None   # softmax etc. are float
    params = load_checkpoint(tmp_path / "q" / "checkpoint.safetensors").params
    points = [n for n in params if n.endswith(".int_bits")]
    assert points and any(n.endswith("weight.int_bits") for n in points)
    for bad, message in ((["--qfx", "8"], "give the weight and activation widths"),
                         (["--qfx", "8,8", "--method", "lora"], "use it with --method full"),
                         (["--qfx-khot", "2"], "applies to --qfx runs only"),
                         (["--init-from", str(tmp_path)], "no checkpoint.safetensors there")):
        capsys.readouterr()
        assert cli.main([*common, "--out", str(tmp_path / "bad"), *bad]) == 2, bad
        assert message in capsys.readouterr().err, bad
