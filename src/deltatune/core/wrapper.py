"""The two wrappers the engine puts into a model.

``DeltaLayer`` replaces a frozen layer: it keeps the layer as ``base`` and one delta module per
named adapter in ``deltas``. ``ModuleCopies`` replaces a module listed in ``trainable_modules``:
it keeps the original as ``base`` and one trainable copy per adapter in ``copies``.
Which adapters run is plain state on the wrapper (``active``); which are folded into the base
weights is ``merged``. Nothing else is hidden.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..kernels import SharedInput
    from .layers import WeightBackup


# Methods may provide a fused forward that computes the frozen layer and the delta together
# (``fused_forward``); the conformance suite turns this off to compare with the plain path.
FAST_PATHS = True


class Delta(nn.Module):
    """Base class of a method's per-layer delta.

    ``forward(x, y, base)`` gets the layer input ``x``, the frozen layer's output ``y`` and the
    frozen layer, and returns the adapted output. A delta that changes the layer's input instead
    sets ``transforms_input`` and implements ``transform_input``. ``merge(w2, b)`` gets the
    float64 2-D weight view (see core.layers) and bias and returns the merged pair.
    """

    transforms_input = False
    # a parameter-subset delta trains diffs of the frozen layer's own parameters (``parameter_diffs``):
    # the layer then runs with ``p + diff`` in place of each ``p``, before any other delta applies
    overrides_parameters = False

    # a delta whose output depends on the layer as the deltas before it left it (DoRA normalises
    # that weight) sets this and gets ``preceding=``: those deltas in the order they act
    reads_preceding = False

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def transform_arguments(self, x: torch.Tensor, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, kwargs

    def parameter_diffs(self) -> dict[str, torch.Tensor]:
        return {}

    def merge(self, w2: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged")


def fold(base: nn.Module, kind: str, deltas) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float64 2-D weight and bias of ``base`` with ``deltas`` folded in, in order (their
    ``merge``): the layer as a later delta in a stack sees it."""
    from .layers import to_2d
    w2 = to_2d(base.weight, kind).double()
    b = None if getattr(base, "bias", None) is None else base.bias.double()
    for d in deltas:
        w2, b = d.merge(w2, b)
    return w2, b


def stage(delta: Delta) -> int:
    """Where a delta acts in a layer, which fixes the order of forward and merge alike:
    0 parameter diffs (the layer's own weights change), 1 input transforms (the frozen layer's
    input is rescaled), 2 output deltas (in activation order, each reading the original input)."""
    return 0 if delta.overrides_parameters else 1 if delta.transforms_input else 2


class SubsetDelta(Delta):
    """Trained diffs of chosen parameters of a frozen layer (the *parameter subset* hook): the
    layer computes with ``weight + diffs["weight"]`` and ``bias + diffs["bias"]``; merge adds the
    diffs to the weights, and the base parameters themselves are never touched until then. Only
    ``weight`` and ``bias`` can be chosen (what merge folds); methods such as BitFit and LN tuning
    choose which."""

    overrides_parameters = True

    def __init__(self, base: nn.Module, kind: str, names: tuple[str, ...]):
        super().__init__()
        self.kind = kind
        self.diffs = nn.ParameterDict()
        for n in names:
            if n not in ("weight", "bias"):
                raise ValueError(f"SubsetDelta trains weight and bias diffs only, not {n!r}")
            p = getattr(base, n, None)
            if not isinstance(p, torch.Tensor):
                raise ValueError(f"{type(base).__name__} has no {n} to train")
            self.diffs[n] = nn.Parameter(torch.zeros_like(p, requires_grad=True))

    def parameter_diffs(self) -> dict[str, torch.Tensor]:
        return dict(self.diffs.items())

    def forward(self, x, y, base):
        return y

    def merge(self, w2, b):
        from .layers import to_2d
        if "weight" in self.diffs:
            w2 = w2 + to_2d(self.diffs["weight"].double(), self.kind)
        if "bias" in self.diffs:
            b = self.diffs["bias"].double() if b is None else b + self.diffs["bias"].double()
        return w2, b


def call_base(base: nn.Module, deltas, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The frozen layer on ``x`` with the parameter diffs of ``deltas`` applied (if any)."""
    diffs: dict[str, torch.Tensor] = {}
    for d in deltas:
        for n, diff in d.parameter_diffs().items():
            diffs[n] = diffs[n] + diff if n in diffs else diff
    if not diffs:
        return base(x, *args, **kwargs)
    params = {n: getattr(base, n) + diff for n, diff in diffs.items()}
    return torch.func.functional_call(base, params, (x, *args), kwargs)


class BiasDelta(Delta):
    """A trainable shift of a layer's bias, zero at init (LoRA's ``bias="all"`` option)."""

    def __init__(self, out_features: int, kind: str):
        super().__init__()
        self.kind = kind
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x, y, base):
        from .layers import channel_view
        return y + channel_view(self.bias, y, self.kind)

    def merge(self, w2, b):
        from .layers import merge_bias_shift
        return merge_bias_shift(w2, b, self.bias, self.kind)


class DeltaLayer(nn.Module):
    def __init__(self, base: nn.Module, kind: str):
        super().__init__()
        self.base = base
        self.kind = kind
        self.deltas = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        # Exact copies of the base weight and bias taken at the first merge, so that unmerge
        # restores them bit-for-bit rather than by subtracting in floating point.
        self.backup: "WeightBackup | None" = None      # core.layers.WeightBackup
        # Set by dt.per_sample_adapters: one adapter name (or None) per sample of the batch.
        self.per_sample: list[str | None] | None = None
        # Set by the engine for q/k/v-like siblings (SharedInput).
        self.shared: "SharedInput | None" = None

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight: models read a layer's ``weight`` (its dtype, its shape)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def running(self) -> list[Delta]:
        return [self.deltas[n] for n in self.active if n in self.deltas and n not in self.merged]

    def forward(self, *args, **kwargs):
        if self.kind == "block":
            return self.forward_block(*args, **kwargs)
        return self.forward_layer(*args, **kwargs)

    def forward_layer(self, x, *args, **kwargs):
        if self.per_sample is not None:
            return self.forward_per_sample(x, *args, **kwargs)
        deltas = self.running()
        if not deltas:
            return self.base(x, *args, **kwargs)
        if FAST_PATHS and len(deltas) == 1 and not args and not kwargs:
            if self.shared is not None:
                out = self.shared.output(self, x)
                if out is not None:
                    return out
            fused = getattr(deltas[0], "fused_forward", None)
            out = fused(x, self.base) if fused is not None else None
            if out is not None:
                return out
        x_in = x
        for d in deltas:
            if d.transforms_input:
                x_in = d.transform_input(x_in)
        y = call_base(self.base, [d for d in deltas if d.overrides_parameters], x_in, *args, **kwargs)
        for i, d in enumerate(deltas):
            if d.reads_preceding:
                before = [e for j, e in enumerate(deltas) if j < i or (j > i and stage(e) < 2)]
                y = d(x, y, self.base, preceding=sorted(before, key=stage))
            else:
                y = d(x, y, self.base)
        return y

    def forward_per_sample(self, x, *args, **kwargs):
        """Each sample runs its own adapter: one batched pass where the method provides one
        (``batched_forward``, e.g. LoRA's gathered low-rank products), else one pass per adapter
        over its samples."""
        names = self.per_sample
        if x.shape[0] != len(names):
            raise ValueError(f"per_sample_adapters got {len(names)} names but the batch has {x.shape[0]} samples")
        present = [n for n in dict.fromkeys(names) if n is not None and n in self.deltas]
        if not present:
            return self.base(x, *args, **kwargs)
        slot = {n: i for i, n in enumerate(present)}
        index = torch.tensor([slot.get(n, -1) for n in names], device=x.device)
        deltas = [self.deltas[n] for n in present]
        batched = getattr(type(deltas[0]), "batched_forward", None)
        if batched is not None and all(type(d) is type(deltas[0]) for d in deltas):
            out = batched(deltas, index, x, self.base, self.training, *args, **kwargs)
            if out is not None:
                return out
        y = self.base(x, *args, **kwargs)
        out = y.clone()
        for i, d in enumerate(deltas):
            rows = (index == i).nonzero().squeeze(1)
            xs = x.index_select(0, rows)
            if d.transforms_input or d.overrides_parameters:
                ys = call_base(self.base, [d], d.transform_input(xs), *args, **kwargs)
            else:
                ys = y.index_select(0, rows)
            out = out.index_copy(0, rows, d(xs, ys, self.base))
        return out

    def forward_block(self, *args, **kwargs):
        """A block (an MLP, an attention module): deltas read the block's input (its first
        positional argument, or ``hidden_states``) and change the first element of its output
        (the hidden states, when the block returns a tuple). An input transform here rewrites the
        block's arguments (``transform_arguments``: a parallel adapter on a post-norm block adds to
        the residual argument, inside the block's LayerNorm)."""
        if self.per_sample is not None:
            return self.forward_block_per_sample(args, kwargs)
        deltas = self.running()
        if not deltas:
            return self.base(*args, **kwargs)
        x = block_input(self.base, args, kwargs)
        for d in deltas:
            if d.transforms_input:
                args, kwargs = d.transform_arguments(x, args, kwargs)
        out = self.base(*args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        for d in deltas:
            if not d.transforms_input:
                y = d(x, y, self.base)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    def forward_block_per_sample(self, args, kwargs):
        """Each sample runs its own adapter. Output deltas: one call of the block, then each
        adapter's delta on its rows. Argument transforms: one call per adapter on its rows, with
        every tensor argument whose first dimension is the batch split alike (masks, cos/sin)."""
        names = self.per_sample
        x = block_input(self.base, args, kwargs)
        if x.shape[0] != len(names):
            raise ValueError(f"per_sample_adapters got {len(names)} names but the batch has {x.shape[0]} samples")
        groups = {n: torch.tensor([i for i, m in enumerate(names) if m == n], device=x.device)
                  for n in dict.fromkeys(names)}
        if not any(self.deltas[n].transforms_input for n in groups if n in self.deltas):
            out = self.base(*args, **kwargs)
            y = out[0] if isinstance(out, tuple) else out
            new = y
            for n, rows in groups.items():
                if n in self.deltas:
                    new = new.index_copy(0, rows, self.deltas[n](x.index_select(0, rows), y.index_select(0, rows),
                                                                 self.base))
            return (new, *out[1:]) if isinstance(out, tuple) else new
        saved, outs = self.per_sample, {}
        self.per_sample = None
        try:
            for n, rows in groups.items():
                active, self.active = self.active, ([n] if n in self.deltas else [])
                try:
                    outs[n] = self.forward_block(*_rows(args, rows, len(names)), **_rows(kwargs, rows, len(names)))
                finally:
                    self.active = active
        finally:
            self.per_sample = saved
        return _join(outs, groups, len(names))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, active={self.active}, merged={self.merged}"


def block_input(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{type(block).__name__} was called without a tensor as its first argument or as "
                        f"hidden_states=; a block delta cannot find its input")
    return x


def _rows(value, rows: torch.Tensor, n: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value.index_select(0, rows)
    if isinstance(value, tuple):
        return tuple(_rows(v, rows, n) for v in value)
    if isinstance(value, dict):
        return {k: _rows(v, rows, n) for k, v in value.items()}
    return value


def _join(outs: dict, index: dict, n: int):
    first = next(iter(outs.values()))
    if isinstance(first, tuple):
        return tuple(_join({k: o[i] for k, o in outs.items()}, index, n) for i in range(len(first)))
    if not (isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] == index[next(iter(outs))].numel()):
        return first      # not per sample (None, or a value the block returns whole)
    out = first.new_zeros((n, *first.shape[1:]))
    for k, o in outs.items():
        out = out.index_copy(0, index[k], o)
    return out


class ModuleCopies(nn.Module):
    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.copies = nn.ModuleDict()
        self.active: list[str] = []
        self.per_sample: list[str | None] | None = None

    def current(self) -> nn.Module:
        for n in self.active:
            if n in self.copies:
                return self.copies[n]
        return self.base

    def forward(self, x, *args, **kwargs):
        if self.per_sample is None:
            return self.current()(x, *args, **kwargs)
        groups: dict[str | None, list[int]] = {}
        for i, n in enumerate(self.per_sample):
            groups.setdefault(n if n in self.copies else None, []).append(i)
        out = None
        for n, rows in groups.items():
            module = self.copies[n] if n is not None else self.base
            idx = torch.tensor(rows, device=x.device)
            part = module(x.index_select(0, idx), *args, **kwargs)
            if out is None:
                out = part.new_zeros((x.shape[0], *part.shape[1:]))
            out = out.index_copy(0, idx, part)
        return out

    def extra_repr(self) -> str:
        return f"active={self.active}"
