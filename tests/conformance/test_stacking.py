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


# ----------------------------------------------------------------------------- every pair of methods
# Any two adapters active on one layer: merged equals unmerged in both orders for every ordered
# pair of foldable methods that share a layer kind (two adapters of one method included); a
# non-foldable method in the stack makes merge refuse and leaves the weights as they were.
# (Which pairs run in CI: see PARTNERS.)

from transformers.pytorch_utils import Conv1D  # noqa: E402

from cases import RUN_FIELDS, STACK_OPTIONS  # noqa: E402


class Host(nn.Module):
    """A frozen two-layer model whose second layer (``target``) is of one kind."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        if kind == "linear":
            self.first, self.target = nn.Linear(16, 24), nn.Linear(24, 16)
        elif kind == "conv":
            self.first, self.target = nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(12, 16, 3, padding=1)
        elif kind == "conv1d_gpt2":
            self.first, self.target = Conv1D(24, 16), Conv1D(16, 24)
        elif kind == "embedding":
            self.target, self.first = nn.Embedding(32, 16), nn.Linear(16, 16)
        elif kind == "norm":
            self.first, self.target = nn.Linear(16, 16), nn.LayerNorm(16)

    def forward(self, x):
        if self.kind == "embedding":
            return self.first(self.target(x))
        return self.target(torch.relu(self.first(x)))

    def example(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(2)
        if self.kind == "embedding":
            return torch.randint(0, 32, (5, 7), generator=g)
        if self.kind == "conv":
            return torch.randn(2, 3, 6, 6, generator=g)
        return torch.randn(5, 16, generator=g)


def _units() -> dict[str, tuple[str, dict]]:
    """Stack members: each foldable method with its defaults; IA3 both as an output scaling and as
    a feed-forward input scaling (two different stages of a layer)."""
    units = {}
    for name in dt.available_methods():
        m = dt.get_method(name)
        if not m.foldable and m.hook == "input":
            continue        # prompts and prefixes do not sit on a layer's weights
        fields = set(m.config_cls.__dataclass_fields__)
        kw = {**{k: v for k, v in RUN_FIELDS.items() if k in fields}, **STACK_OPTIONS.get(name, {})}
        if name == "ia3":
            units["ia3_out"] = (name, {**kw, "feedforward": []})
            units["ia3_in"] = (name, {**kw, "feedforward": ["target"]})
        else:
            units[name] = (name, kw)
    return units


UNITS = _units()
HOST_KINDS = ("linear", "conv", "conv1d_gpt2", "embedding", "norm")


# The CI tier pairs every method with itself and with one member of each stage of a layer (a
# parameter diff, an input transform, an output scaling, a low-rank output delta and one that reads
# the layers before it); the other ordered pairs, quadratic in the number of methods, run in the
# slow tier (`make test-all`).
PARTNERS = ("bitfit", "ia3_in", "ia3_out", "lora", "dora")


def _pairs(foldable: bool):
    out = []
    for a, (ma, _) in UNITS.items():
        for b, (mb, _) in UNITS.items():
            both = dt.get_method(ma).foldable and dt.get_method(mb).foldable
            if both != foldable:
                continue
            shared = [k for k in HOST_KINDS if k in dt.get_method(ma).kinds and k in dt.get_method(mb).kinds]
            marks = [] if a == b or a in PARTNERS or b in PARTNERS else [pytest.mark.slow]
            out += [pytest.param(a, b, k, id=f"{a}+{b}-{k}", marks=marks) for k in shared]
    return out


def _stack(first: str, second: str, kind: str) -> Host:
    model = Host(kind)
    for adapter, unit in (("first", first), ("second", second)):
        method, kw = UNITS[unit]
        dt.attach(model, dt.config(method, targets=["target"], **kw), name=adapter)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():       # trained-like values for both adapters, none at its initialisation
        for name, p in model.named_parameters():
            if ".deltas." in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    dt.set_active(model, ["first", "second"])
    return model


@pytest.mark.parametrize("first,second,kind", _pairs(foldable=True))
def test_two_foldable_adapters_on_one_layer_merge_equal_unmerged(first, second, kind):
    model = _stack(first, second, kind)
    x = model.example()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".deltas." not in n}
    with torch.no_grad():
        unmerged = model(x)
        assert (unmerged - Host(kind)(x)).abs().max() > 1e-4, "the stack changes nothing: the check could not fail"
        dt.merge(model)
        merged = model(x)
    scale = max(1.0, unmerged.abs().max().item())
    assert (merged - unmerged).abs().max().item() <= 1e-5 * scale, f"{first} then {second} on a {kind} layer"
    dt.unmerge(model)
    after = {n: p.detach() for n, p in model.named_parameters() if ".deltas." not in n}
    assert after.keys() == base.keys() and all(torch.equal(after[n], base[n]) for n in base)


@pytest.mark.parametrize("first,second,kind", _pairs(foldable=False))
def test_a_non_foldable_adapter_in_the_stack_makes_merge_refuse(first, second, kind):
    model = _stack(first, second, kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(DeltatuneError, match="cannot be merged"):
        dt.merge(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
