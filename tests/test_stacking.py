"""Several adapters active on one layer: forward and merge compose in one order. The expected
outputs come from the methods' definitions written here (LoRA: y = W x + b + s B A x; IA3 on a
feed-forward input: y = W (l * x) + b; IA3 on an output: y = l * (W x + b)), not from the engine."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.errors import DeltatuneError


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


ADAPTERS = {
    "lora": lambda: dt.config("lora", r=4, alpha=8, targets=["down"]),
    "ia3_in": lambda: dt.config("ia3", targets=["down"], feedforward=["down"]),
    "ia3_out": lambda: dt.config("ia3", targets=["down"], feedforward=[]),
}


def stacked(order):
    model = Block()
    for name in order:
        dt.attach(model, ADAPTERS[name](), name=name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():           # trained-like values: nothing is at its identity initialisation
        for name, p in model.named_parameters():
            if ".deltas." in name:     # every adapter's, not only the last attached (the trainable one)
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))
    assert all(float(p.detach().abs().sum()) > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))
    dt.set_active(model, list(order))
    return model


def reference(model, order, x):
    """The stacked layer by its definition: input transforms feed the frozen layer; output
    deltas then apply in activation order, each on the original input."""
    down = model.down
    h = torch.relu(model.up(x))
    W, b = down.base.weight, down.base.bias
    h_in = h
    for n in order:
        if n == "ia3_in":
            h_in = h_in * down.deltas[n].ia3_l
    y = h_in @ W.T + b
    for n in order:
        if n == "lora":
            d = down.deltas[n]
            y = y + d.scale * (h @ d.lora_A.T @ d.lora_B.T)
        elif n == "ia3_out":
            y = y * down.deltas[n].ia3_l
    return y


@pytest.mark.parametrize("order", [p for k in (2, 3) for p in itertools.permutations(ADAPTERS, k)],
                         ids=lambda o: "+".join(o))
def test_stacked_forward_follows_the_definition_and_merges_exactly(order):
    model = stacked(order)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unmerged = model(x)
        assert torch.allclose(unmerged, reference(model, order, x), atol=1e-5)
        dt.merge(model)
        merged = model(x)
    assert (merged - unmerged).abs().max() < 1e-5, "+".join(order)


def test_merging_an_output_delta_under_an_unmerged_input_transform_is_refused():
    model = stacked(("lora", "ia3_in"))
    weight = model.down.base.weight.detach().clone()
    with pytest.raises(DeltatuneError, match="acts on the layer before them"):
        dt.merge(model, "lora")
    assert torch.equal(model.down.base.weight, weight) and model.down.merged == []
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = model(x)
        dt.merge(model, "ia3_in")          # the input transform alone folds exactly
        assert (model(x) - before).abs().max() < 1e-5
        dt.merge(model, "lora")            # and then the rest
        assert (model(x) - before).abs().max() < 1e-5


def test_an_output_delta_folds_alone_only_when_nothing_unmerged_runs_before_it():
    x = torch.randn(3, 16)
    model = stacked(("lora", "ia3_out"))        # l * (W x + b + s B A x): the scale also scales LoRA
    with pytest.raises(DeltatuneError, match="acts on the layer before them"):
        dt.merge(model, "ia3_out")
    model = stacked(("ia3_out", "lora"))        # l * (W x + b) + s B A x
    with torch.no_grad():
        before = model(x)
        dt.merge(model, "ia3_out")
        assert (model(x) - before).abs().max() < 1e-5
