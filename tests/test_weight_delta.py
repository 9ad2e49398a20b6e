"""core.weights: a delta stated as ΔW on the 2-D view runs, for every layer kind, as the layer
with its weight replaced by W + ΔW (checked against a copy of the layer whose weight is edited)."""

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.core.weights import WeightDelta, apply_2d


class FullDelta(WeightDelta):
    """ΔW = P + 0.5 W: a free matrix plus a term that reads the frozen weight."""

    def __init__(self, base, kind, shape2d):
        super().__init__()
        self.kind = kind
        self.bind(base)
        self.P = nn.Parameter(torch.randn(*shape2d) * 0.1)

    def delta_2d(self, w2):
        return self.P.to(w2.dtype) + 0.5 * w2


def edited(layer, kind, P):
    """The reference: the layer itself with its stored weight set to W + ΔW, in the layer's layout."""
    ref = copy.deepcopy(layer)
    with torch.no_grad():
        w = ref.weight
        w2 = w.reshape(w.shape[0], -1) if kind in ("linear", "conv") else w.t()
        new2 = w2 + P + 0.5 * w2
        ref.weight.copy_(new2.reshape(w.shape) if kind in ("linear", "conv") else new2.t())
    return ref


CASES = {
    "linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(3, 6), (5, 6)),
    "conv": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), lambda: torch.randn(2, 4, 7, 7), (6, 18)),
    "embedding": (lambda: nn.Embedding(10, 4, padding_idx=0), lambda: torch.tensor([[0, 3, 9]]), (4, 10)),
    "conv1d_gpt2": (lambda: Conv1D(5, 6), lambda: torch.randn(3, 6), (5, 6)),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_forward_is_the_layer_with_the_edited_weight(kind):
    torch.manual_seed(0)
    build, inputs, shape2d = CASES[kind]
    layer, x = build(), inputs()
    delta = FullDelta(layer, kind, shape2d)
    got = delta(x, layer(x), layer)
    want = edited(layer, kind, delta.P.detach())(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    w2, b = delta.merge(torch.zeros(shape2d, dtype=torch.float64), None)   # merge reads the frozen weight
    assert torch.allclose(w2.float(), (delta.P + 0.5 * (layer.weight.reshape(layer.weight.shape[0], -1)
                                       if kind in ("linear", "conv") else layer.weight.t())).detach(), atol=1e-6)


def test_an_unbound_delta_says_what_is_missing():
    class Unbound(FullDelta):
        def __init__(self, base, kind, shape2d):
            WeightDelta.__init__(self)
            self.kind, self.P = kind, nn.Parameter(torch.zeros(*shape2d))
    layer = nn.Linear(3, 2)
    with pytest.raises(Exception, match="bind"):
        Unbound(layer, "linear", (2, 3)).merge(torch.zeros(2, 3, dtype=torch.float64), None)


def test_apply_2d_refuses_a_kind_without_a_view():
    with pytest.raises(Exception, match="2-D weight view"):
        apply_2d(torch.zeros(2, 3), torch.zeros(3, 3), nn.LayerNorm(3), "norm")
