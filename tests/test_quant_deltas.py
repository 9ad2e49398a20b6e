"""LoftQ and L4Q beyond the conformance suite: LoftQ's start is nearer the float weight than
QLoRA's; L4Q's merged weight lies on its learned grid and its steps train."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.errors import DeltatuneError
from deltatune.quant.blockwise import dequantize_tensor, quantize_tensor


class Host(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(96, 64)
        with torch.no_grad():       # a pretrained-like weight: a few strong directions plus noise
            u, v = torch.randn(64, 4), torch.randn(4, 96)
            self.proj.weight.copy_(u @ v / 8 + 0.02 * torch.randn(64, 96))

    def forward(self, x):
        return self.proj(x)


def _effective_weight(model: Host) -> torch.Tensor:
    eye = torch.eye(96)
    with torch.no_grad():
        return (model(eye) - model.proj.bias).T


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_loftq_starts_nearer_the_float_weight_than_qlora(scheme):
    w = Host().proj.weight.detach().double()
    qlora_error = (dequantize_tensor(quantize_tensor(w, scheme), torch.float64) - w).norm()
    errors = []
    for iters in (1, 3):
        model = Host()
        dt.attach(model, dt.config("loftq", targets=["proj"], r=8, scheme=scheme, iters=iters))
        errors.append((_effective_weight(model).double() - w).norm())
    assert errors[0] < 0.9 * qlora_error, (errors, qlora_error)
    assert errors[1] <= errors[0] * 1.01
    # the merged layer is the function the adapter computed
    x = torch.randn(5, 96)
    with torch.no_grad():
        before = model(x)
        dt.merge(model)
        assert torch.allclose(model(x), before, atol=1e-5)


def test_loftq_refuses_a_quantised_base():
    model = Host()
    dt.quantize(model, "nf4", targets=["proj"])
    with pytest.raises(DeltatuneError, match="loftq: proj is stored quantised already"):
        dt.attach(model, dt.config("loftq", targets=["proj"]))


def test_l4q_merges_onto_its_learned_grid_and_trains_its_steps():
    model = Host()
    dt.attach(model, dt.config("l4q", targets=["proj"], r=4, bits=4))
    delta = next(m for m in model.modules() if type(m).__name__ == "L4qDelta")
    start = delta.l4q_step.detach().clone()
    target = Host(seed=1)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(64, 96)
    losses = []
    for _ in range(60):
        loss = ((model(x) - target(x).detach()) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0] and not torch.equal(delta.l4q_step.detach(), start)
    step = delta.l4q_step.detach().double()
    dt.merge(model)
    codes = model.proj.weight.detach().double() / step[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-4)              # every weight on its row's grid
    assert codes.round().min() >= -8 and codes.round().max() <= 7      # 4-bit signed


def test_train_lora_on_a_quantised_base(tmp_path, capsys):
    """``deltatune train --method lora --quantize-base nf4``: QLoRA; the adapter trains on the
    NF4 base and the run records the base's scheme."""
    import json

    from test_train import make_dataset, make_tiny_model

    from deltatune import cli
    model = make_tiny_model(tmp_path / "tiny")
    data = make_dataset(tmp_path / "toy.csv")
    common = ["train", "--data", str(data), "--model", str(model), "--epochs", "1", "--batch-size", "16",
              "--max-length", "24", "--no-progress", "--device", "cpu"]
    assert cli.main([*common, "--method", "lora", "--quantize-base", "nf4", "--out", str(tmp_path / "q")]) == 0
    assert "frozen base stored nf4" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "q" / "metrics.json").read_text())
    assert metrics["quantize_base"] == "nf4" and metrics["trainable_params"] > 0
    assert cli.main([*common, "--method", "full", "--quantize-base", "nf4", "--out", str(tmp_path / "f")]) == 2
    assert "trains no adapter" in capsys.readouterr().err
