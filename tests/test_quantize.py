"""dt.quantize (QLoRA's frozen base) against its definition, "QLoRA: Efficient Finetuning of Quantized
LLMs": the NF4 levels from the normal quantiles (computed here with the standard library, and the
paper's table), block-wise absmax codes as the nearest point of each block's grid, the storage
bound, LoRA / DoRA / PiSSA on top, merging with each policy, exact unmerge, save/load, errors."""

from __future__ import annotations

import statistics
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.core import wrapper
from deltatune.core.errors import DeltatuneError
from deltatune.core.matching import wrappers
from deltatune.quant import QuantLinear, nf4_levels, requantization_errors
from deltatune.quant.blockwise import dequantize_tensor, quantize_tensor
from models import tiny_llama

BLOCK = 64
# the NF4 values listed in the paper's appendix
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def reference_levels() -> torch.Tensor:
    """NF4 from its definition: 8 positive normal quantiles at probabilities evenly spaced from
    delta down to 1/2 (exclusive), 7 negative ones likewise, and zero, scaled to a maximum of 1."""
    q = statistics.NormalDist().inv_cdf
    delta = 1 - (1 / 30 + 1 / 32) / 2
    pos = [q(delta + (0.5 - delta) * i / 8) for i in range(8)]
    neg = [-q(delta + (0.5 - delta) * i / 7) for i in range(7)]
    levels = sorted(neg + [0.0] + pos)
    return torch.tensor([v / max(levels) for v in levels], dtype=torch.float64)


def reference_dequantize(layer: QuantLinear) -> torch.Tensor:
    """The stored weight decoded here: low nibble first, level times the block's scale."""
    n = layer.out_features * layer.in_features
    if layer.scheme == "nf4":
        codes = []
        for byte in layer.codes.tolist():
            codes += [byte & 15, byte >> 4]
        unit = reference_levels()[torch.tensor(codes)]
    else:
        unit = layer.codes.double() / 127
    per_block = unit.view(-1, BLOCK) * layer.scales.double()[:, None]
    return per_block.reshape(-1)[:n].view(layer.out_features, layer.in_features)


def odd_weight() -> torch.Tensor:
    """Normal weights with an outlier, an all-zero block and a length that is not a multiple of 64."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 41, generator=g) * 0.02
    w[3, 5] = 0.7
    w.view(-1)[BLOCK * 4: BLOCK * 5] = 0
    return w


def grid_distance(w: torch.Tensor, grid_unit: torch.Tensor) -> torch.Tensor:
    """Distance of each element to the nearest point of its block's grid ``absmax * grid_unit``."""
    flat = w.double().reshape(-1)
    blocks = F.pad(flat, (0, -flat.numel() % BLOCK)).view(-1, BLOCK)
    absmax = blocks.abs().amax(1, keepdim=True)
    grid = absmax[:, :, None] * grid_unit[None, None, :]
    return (blocks[:, :, None] - grid).abs().amin(-1).reshape(-1)[:flat.numel()].view(w.shape)


def quantized_llama(scheme: str = "nf4"):
    return dt.quantize(tiny_llama().eval(), scheme)


def ids(seed: int = 1, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


def train_steps(model, steps: int = 4, lr: float = 1e-2):
    opt = torch.optim.AdamW([p for _, p in dt.trainable_parameters(model)], lr=lr)
    model.train()
    for step in range(steps):
        x = ids(10 + step)
        loss = F.cross_entropy(model(x).logits[:, :-1].reshape(-1, 512), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# ------------------------------------------------------------------------------ the codebook


def test_nf4_levels_are_the_papers_normal_quantiles():
    levels = nf4_levels()
    assert levels.shape == (16,) and levels.dtype == torch.float32
    assert levels[0] == -1 and levels[-1] == 1 and levels[7] == 0 and bool((levels.diff() > 0).all())
    torch.testing.assert_close(levels.double(), reference_levels(), atol=1e-7, rtol=0)
    torch.testing.assert_close(levels.double(), torch.tensor(PAPER_NF4, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_each_element_is_its_blocks_nearest_grid_point(scheme):
    w = odd_weight()
    unit = reference_levels() if scheme == "nf4" else torch.arange(-127, 128, dtype=torch.float64) / 127
    q = quantize_tensor(w, scheme)
    back = dequantize_tensor(q).double()
    nearest = grid_distance(w, unit)
    error = (back - w.double()).abs()
    assert float((error - nearest).max()) <= 1e-7      # no other grid point is closer
    # and so within half of the widest gap of the grid, times the block's absmax
    flat = F.pad(w.reshape(-1), (0, -w.numel() % BLOCK)).view(-1, BLOCK)
    absmax = flat.abs().amax(1, keepdim=True).expand(-1, BLOCK).reshape(-1)[:w.numel()].view(w.shape).double()
    assert bool((error <= absmax * float(unit.diff().max()) / 2 + 1e-7).all())
    assert torch.equal(back.view(-1)[BLOCK * 4: BLOCK * 5], torch.zeros(BLOCK, dtype=torch.float64))
    assert abs(float(back[3, 5]) - 0.7) < 1e-7         # a block's absmax element is exact


def test_nf4_packs_two_codes_per_byte_low_nibble_first():
    w = reference_levels().float().repeat(4)          # one block: the 16 levels in order, four times
    q = quantize_tensor(w, "nf4")
    assert q.codes.dtype == torch.uint8 and q.codes.numel() == BLOCK // 2 and q.scales.tolist() == [1.0]
    assert q.codes[:8].tolist() == [lo | (lo + 1) << 4 for lo in range(0, 16, 2)]


# ------------------------------------------------------------------------------ the layer


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_quantized_linear_computes_with_its_decoded_weight(scheme):
    torch.manual_seed(0)
    linear = nn.Linear(40, 24)
    layer = QuantLinear.from_linear(linear, scheme)
    want_w = reference_dequantize(layer).float()
    torch.testing.assert_close(layer.weight, want_w, atol=1e-7, rtol=0)
    assert [n for n, _ in layer.named_parameters()] == ["bias"] and not layer.bias.requires_grad
    assert {n for n, _ in layer.named_buffers()} == {"codes", "scales"}
    x = torch.randn(3, 5, 40, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, x @ want_w.T + linear.bias, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ want_w, atol=1e-5, rtol=1e-5)


def test_quantize_replaces_every_linear_but_the_head():
    model = tiny_llama().eval()
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    assert dt.quantize(model, "nf4") is model
    names = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert names == {f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}"
                     for i in range(2) for p in PROJECTIONS}
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    with torch.no_grad():
        after = model(x).logits
    assert 0 < float((after - before).abs().max()) < 0.5 * float(before.abs().max())
    assert not [n for n, _ in model.named_parameters() if n.endswith("proj.weight")]
    fresh = dt.quantize(tiny_llama().eval(), "nf4", targets=["q_proj"])
    assert sum(isinstance(m, QuantLinear) for m in fresh.modules()) == 2
    reloaded = dt.quantize(tiny_llama().eval(), "nf4")
    for m in reloaded.modules():
        if isinstance(m, QuantLinear):
            m.codes.zero_()
    reloaded.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, after)


@pytest.mark.slow
@pytest.mark.parametrize("scheme,bound", [("nf4", 0.30), ("int8", 0.30)])
def test_smollm2_linear_storage(scheme, bound):
    from deltatune.train.model import load_causal_lm
    model, _ = load_causal_lm("smollm2")
    float_bytes = {n: m.weight.numel() * 4 for n, m in model.named_modules()
                   if type(m) is nn.Linear and not n.endswith("lm_head")}
    dt.quantize(model, scheme)
    stored = {n: m.codes.numel() * m.codes.element_size() + m.scales.numel() * m.scales.element_size()
              for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert stored.keys() == float_bytes.keys() and len(stored) == 30 * 7
    ratio = sum(stored.values()) / sum(float_bytes.values())
    print(f"{scheme}: {sum(stored.values()):,} bytes for {sum(float_bytes.values()):,} float32 bytes ({ratio:.4f})")
    assert ratio <= bound
    # the formula: n/2 (nf4) or n (int8) code bytes plus a float32 scale per 64 weights
    n = sum(float_bytes.values()) // 4
    assert sum(stored.values()) == (n // 2 if scheme == "nf4" else n) + 4 * n // BLOCK


# ------------------------------------------------------------------------------ methods on top


def test_lora_on_nf4_is_the_decoded_weight_plus_the_low_rank_update():
    model = quantized_llama()
    dt.attach(model, dt.config("lora", r=4, alpha=8, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, p in dt.trainable_parameters(model):
            p.normal_(0, 0.1)
    layer = dict(wrappers(model))["model.layers.0.self_attn.q_proj"]
    d = layer.deltas["default"]
    x = torch.randn(2, 7, 64)
    want = x @ reference_dequantize(layer.base).float().T + 2.0 * (x @ d.lora_A.T) @ d.lora_B.T
    for fast in (True, False):
        wrapper.FAST_PATHS = fast
        try:
            with torch.no_grad():
                torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
        finally:
            wrapper.FAST_PATHS = True


@pytest.mark.parametrize("fast", [True, False])
def test_backward_keeps_no_float_copy_of_a_quantized_weight(fast, monkeypatch):
    """QLoRA's point: in backward the frozen base costs its codes, not a float weight."""
    monkeypatch.setattr(wrapper, "FAST_PATHS", fast)
    model = quantized_llama()
    dt.attach(model, dt.config("lora", r=4, targets="all-linear"))
    shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, QuantLinear)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = model(ids()).logits.square().mean()
    loss.backward()
    assert not shapes & set(saved), f"float weights kept for backward: {shapes & set(saved)}"
    assert all(p.grad is not None for _, p in dt.trainable_parameters(model))


def test_fast_and_plain_paths_agree_on_nf4(monkeypatch):
    grads = []
    for fast in (True, False):
        monkeypatch.setattr(wrapper, "FAST_PATHS", fast)
        model = quantized_llama()
        dt.attach(model, dt.config("lora", r=4, targets="all-linear"))
        with torch.no_grad():
            for _, p in dt.trainable_parameters(model):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
        out = model(ids()).logits
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad for _, p in dt.trainable_parameters(model)]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_dora_and_pissa_read_the_decoded_weight():
    model = quantized_llama()
    x = ids()
    with torch.no_grad():
        base_out = model(x).logits
    dt.attach(model, dt.config("dora", r=4, targets=["v_proj"]), name="dora")
    layer = dict(wrappers(model))["model.layers.0.self_attn.v_proj"]
    torch.testing.assert_close(layer.deltas["dora"].magnitude.double(), reference_dequantize(layer.base).norm(dim=1),
                               atol=1e-6, rtol=1e-6)
    dt.attach(model, dt.config("lora", r=4, init="pissa", targets=["q_proj"]), name="pissa")
    q = dict(wrappers(model))["model.layers.0.self_attn.q_proj"]
    d = q.deltas["pissa"]
    U, S, Vh = torch.linalg.svd(reference_dequantize(q.base))
    torch.testing.assert_close(d.scale * (d.B0.double() @ d.A0.double()), U[:, :4] * S[:4] @ Vh[:4], atol=1e-5, rtol=0)
    for names in (["dora"], ["pissa"]):
        dt.set_active(model, names)
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, base_out, atol=1e-5, rtol=1e-5)


def test_lora_on_nf4_lowers_the_loss_on_text():
    """A tiny Llama on Moby Dick bytes (the lm task's text where installed, else any English)."""
    try:
        from deltatune.train import lm
        text = lm.book_text(lm.read_moby_dick())[:20000]
    except Exception:       # the Debian text is optional in CI: the mechanics do not depend on it
        text = (__doc__ or "") * 40
    data = torch.tensor(list(text.encode()[:64 * 16]), dtype=torch.long).view(16, 64)
    model = quantized_llama()
    dt.attach(model, dt.config("lora", r=8, targets="all-linear"))
    opt = torch.optim.AdamW([p for _, p in dt.trainable_parameters(model)], lr=3e-2)

    def loss_of(batch):
        return F.cross_entropy(model(batch).logits[:, :-1].reshape(-1, 512), batch[:, 1:].reshape(-1))

    with torch.no_grad():
        first = float(loss_of(data))
    model.train()
    for step in range(30):
        loss = loss_of(data[(step % 4) * 4:(step % 4) * 4 + 4])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        last = float(loss_of(data))
    assert last < first - 0.15, (first, last)


@pytest.mark.slow
def test_qlora_on_smollm2_lowers_the_lm_task_loss():
    from deltatune.train import lm
    from deltatune.train.model import load_causal_lm
    model, tokenizer = load_causal_lm("smollm2")
    dt.quantize(model, "nf4")
    task = lm.CausalLMTask(model)
    text = lm.book_text(lm.read_moby_dick())
    train, test = lm.pack_book(tokenizer(text[:400_000], add_special_tokens=False)["input_ids"], 64,
                               train_tokens=64 * 16, test_tokens=64 * 8)
    dt.attach(task, dt.config("lora", r=8, targets="all-linear"))
    opt = torch.optim.AdamW([p for _, p in dt.trainable_parameters(task)], lr=1e-3)
    before = lm.evaluate_lm(task, test, 8, torch.device("cpu"))["test_loss"]
    task.train()
    for _ in range(2):
        for batch in train.batches(4):
            _, loss = task(**batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = lm.evaluate_lm(task, test, 8, torch.device("cpu"))["test_loss"]
    print(f"nf4 SmolLM2 + LoRA: test loss {before:.4f} -> {after:.4f}")
    assert after < before - 0.05


# ------------------------------------------------------------------------------ merge, unmerge, files


def snapshot(model):
    return {n: (m, m.codes.clone(), m.scales.clone()) for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def assert_restored(model, snap, x, out):
    now = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert now.keys() == snap.keys()
    for n, (m, codes, scales) in snap.items():
        assert now[n] is m and torch.equal(m.codes, codes) and torch.equal(m.scales, scales)
    with torch.no_grad():
        assert torch.equal(model(x).logits, out)


def test_merge_onto_a_quantized_base_needs_a_policy():
    model = train_steps(dt.attach(quantized_llama(), dt.config("lora", r=4, targets=["q_proj", "up_proj"])))
    with pytest.raises(DeltatuneError, match="requantize.*dequantize"):
        dt.merge(model)
    with pytest.raises(DeltatuneError, match="quantized='sometimes'"):
        dt.merge(model, quantized="sometimes")
    assert all(not w.merged and w.backup is None for _, w in wrappers(model))


def test_merge_dequantize_keeps_the_merged_weight_in_float():
    model = train_steps(dt.attach(quantized_llama(), dt.config("lora", r=4, targets=["q_proj", "up_proj"])))
    x, snap = ids(3), snapshot(model)
    layer = dict(wrappers(model))["model.layers.1.mlp.up_proj"]
    d = layer.deltas["default"]
    want = reference_dequantize(layer.base) + d.scale * d.lora_B.double() @ d.lora_A.double()
    with torch.no_grad():
        unmerged = model(x).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # nothing is re-quantised, so nothing to warn about
        dt.merge(model, quantized="dequantize")
    assert type(layer.base) is nn.Linear and layer.base.weight.dtype == torch.float32
    torch.testing.assert_close(layer.base.weight.double(), want, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, unmerged, atol=1e-5, rtol=1e-5)
    dt.unmerge(model)
    assert_restored(model, snap, x, unmerged)


def test_merge_requantize_reports_the_error_and_unmerge_is_exact():
    model = train_steps(dt.attach(quantized_llama(), dt.config("lora", r=4, targets=["q_proj", "up_proj"])))
    x, snap = ids(3), snapshot(model)
    layers = dict(wrappers(model))
    merged_w = {}
    with torch.no_grad():
        for n, w in layers.items():
            d = w.deltas["default"]
            merged_w[n] = reference_dequantize(w.base).float().double() + d.scale * d.lora_B.double() @ d.lora_A.double()
        unmerged = model(x).logits
    with pytest.warns(UserWarning, match="re-quantised 4 layers.*max abs error"):
        dt.merge(model, quantized="requantize")
    errors = requantization_errors(model)
    assert set(errors) == set(layers)
    for n, w in layers.items():
        assert isinstance(w.base, QuantLinear) and w.base.scheme == "nf4"
        target = merged_w[n].float().double()
        stored = reference_dequantize(w.base)
        diff = stored - target
        err = errors[n]
        assert err.max_abs == pytest.approx(float(diff.abs().max()), rel=1e-6)
        assert err.relative_frobenius == pytest.approx(float(diff.norm() / target.norm()), rel=1e-6)
        assert 0 < err.relative_frobenius < 0.2
        # re-quantised: each element the nearest point of its block's new grid
        assert float((diff.abs() - grid_distance(target, reference_levels())).max()) <= 1e-6
    with torch.no_grad():
        merged = model(x).logits
    assert 0 < float((merged - unmerged).abs().max()) < 0.5 * float(unmerged.abs().max())
    dt.unmerge(model)
    assert_restored(model, snap, x, unmerged)


def test_lora_adapter_on_a_quantized_base_round_trips(tmp_path):
    model = train_steps(dt.attach(quantized_llama(), dt.config("lora", r=4, targets="all-linear")))
    dt.save_adapter(model, tmp_path / "a")
    fresh = quantized_llama()
    dt.load_adapter(fresh, tmp_path / "a")
    x = ids(5)
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, model(x).logits)
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    assert all("lora_" in k for k in saved) and len(saved) == 2 * 14


# ------------------------------------------------------------------------------ errors


def test_quantize_errors():
    with pytest.raises(DeltatuneError, match="scheme 'fp4' is not known.*nf4, int8"):
        dt.quantize(tiny_llama(), "fp4")
    with pytest.raises(DeltatuneError, match="matched no module.*Closest"):
        dt.quantize(tiny_llama(), "nf4", targets=["q_prj_typo"])
    with pytest.raises(DeltatuneError, match="empty list"):
        dt.quantize(tiny_llama(), "nf4", targets=[])
    with pytest.raises(DeltatuneError, match="nn.Linear layers only; model.embed_tokens \\(Embedding\\)"):
        dt.quantize(tiny_llama(), "nf4", targets=["embed_tokens"])
    model = quantized_llama()
    with pytest.raises(DeltatuneError, match="already quantised"):
        dt.quantize(model, "int8")
    attached = dt.attach(tiny_llama(), dt.config("lora", targets=["q_proj"]))
    with pytest.raises(DeltatuneError, match="quantize the base model first, then attach"):
        dt.quantize(attached, "nf4")
    with pytest.raises(DeltatuneError, match="2-D float weight"):
        QuantLinear(torch.zeros(4), None, "nf4")


def test_nf4_under_the_planners_fake_tensors_leaves_real_quantisation_working():
    """The planner attaches on fake tensors first (LoftQ quantises at attach): the NF4 levels it
    asks for must not be cached as a tensor without data for the real run after it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from deltatune.quant.blockwise import dequantize_tensor, quantize_tensor
    import deltatune.quant.blockwise as blockwise
    blockwise._nf4_level_values.cache_clear()
    with FakeTensorMode():
        quantize_tensor(torch.randn(4, 64), "nf4")
    w = torch.randn(4, 64)
    error = (dequantize_tensor(quantize_tensor(w, "nf4")) - w).abs().max()
    assert 0 < error < w.abs().max() / 4
