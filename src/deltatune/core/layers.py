"""Layer kinds: how each frozen layer type exposes its weight as a 2-D matrix.

Every weight delta is defined on the 2-D view ``W2 (out, fan_in)`` of a layer's weight, so one
formula (``W2 + s B A``, a column norm, a row scale) serves Linear, convolutions, Embedding and
GPT-2's transposed ``Conv1D``:

- ``linear``: ``nn.Linear`` weight ``(out, in)`` is already 2-D.
- ``conv``: ``nn.Conv1d/2d/3d`` weight ``(out, in, *k)`` is viewed as ``(out, in * prod(k))``.
- ``embedding``: ``nn.Embedding`` weight ``(num, dim)`` maps a one-hot input to ``dim``, so
  its 2-D view is the transpose ``(dim, num)``.
- ``conv1d_gpt2``: transformers' ``Conv1D`` stores ``(in, out)``; the view is the transpose.
- ``norm``: LayerNorm/RMSNorm-like modules with a 1-D weight (only scaling/bias deltas).

Each kind is a ``LayerKind`` object (``kind_of(module)``): its ``name`` (what methods see), the
shape and 2-D view, ``weight(module)`` (the float weight, dequantised for a quantised layer) and,
for merging, ``backup`` / ``check_store`` / ``store``. A package adds a kind with ``register_kind``
under an existing name: ``deltatune.quant`` registers its quantised Linear as one more "linear",
so every method attaches to it unchanged. The functions below keep the kind-name interface.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import nn

from .errors import DeltatuneError

KINDS = ("linear", "conv", "embedding", "conv1d_gpt2", "norm")
MERGE_POLICIES = ("requantize", "dequantize")   # dt.merge(quantized=...) onto a quantised layer


@dataclasses.dataclass(frozen=True)
class WeightBackup:
    """Exact copies of a layer's weight and bias, taken before its first merge."""
    weight: torch.Tensor
    bias: torch.Tensor | None

    def restore(self, module: nn.Module) -> nn.Module:
        with torch.no_grad():
            module.weight.copy_(self.weight)
            if self.bias is not None:
                module.bias.copy_(self.bias)
            elif getattr(module, "bias", None) is not None:
                module.bias = None
        return module


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """One kind of frozen layer: ``name`` is what methods see, ``matches`` picks its modules."""
    name: str
    matches: Callable[[nn.Module], bool]

    def shape(self, module: nn.Module) -> torch.Size:
        return module.weight.shape

    def out_in(self, module: nn.Module) -> tuple[int, int]:
        """(out, fan_in) of the 2-D weight view."""
        s = self.shape(module)
        if self.name in ("linear", "conv"):
            return s[0], math.prod(s[1:])
        if self.name in ("embedding", "conv1d_gpt2"):
            return s[1], s[0]
        raise DeltatuneError(f"layer kind {self.name!r} has no 2-D weight view")

    def to_2d(self, weight: torch.Tensor) -> torch.Tensor:
        if self.name in ("linear", "norm"):     # norm: 1-D, only bias and scale deltas apply
            return weight
        if self.name == "conv":
            return weight.reshape(weight.shape[0], -1)
        return weight.t()

    def from_2d(self, w2: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return w2.reshape(like.shape) if self.name == "conv" else self.to_2d(w2)

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight

    def backup(self, module: nn.Module) -> WeightBackup:
        bias = getattr(module, "bias", None)
        return WeightBackup(module.weight.detach().clone(), None if bias is None else bias.detach().clone())

    def check_store(self, module: nn.Module, quantized: str | None) -> None:
        """Raise before any layer is merged if ``store`` would refuse (a missing merge policy)."""
        if quantized is not None and quantized not in MERGE_POLICIES:
            raise DeltatuneError(f"quantized={quantized!r}: use one of {', '.join(MERGE_POLICIES)} (or None)")

    def store(self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
              quantized: str | None) -> tuple[nn.Module, object | None]:
        """Write a merged weight and bias (float64) into the layer; returns the module that now
        holds them (a lossy kind may replace it) and a record of how far storing moved them
        (None: stored exactly)."""
        module.weight.copy_(weight.to(module.weight.dtype))
        if bias is not None:
            if getattr(module, "bias", None) is None:
                module.bias = nn.Parameter(bias.to(module.weight.dtype), requires_grad=False)
            else:
                module.bias.copy_(bias.to(module.bias.dtype))
        return module, None


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or (
        "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), torch.Tensor)
        and m.weight.dim() == 1)


BUILTIN = {k.name: k for k in (
    LayerKind("linear", lambda m: isinstance(m, nn.Linear)),
    LayerKind("conv", lambda m: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))),
    LayerKind("embedding", lambda m: isinstance(m, nn.Embedding)),
    LayerKind("conv1d_gpt2", lambda m: type(m).__name__ == "Conv1D" and hasattr(m, "nf")),
    LayerKind("norm", _is_norm))}
_REGISTERED: list[LayerKind] = list(BUILTIN.values())


def register_kind(kind: LayerKind) -> LayerKind:
    """Add a layer kind, matched before the built-in ones; its name must be one of ``KINDS``."""
    if kind.name not in KINDS:
        raise DeltatuneError(f"layer kind name {kind.name!r} must be one of {KINDS} (what methods support)")
    _REGISTERED.insert(0, kind)
    return kind


def kind_of(module: nn.Module) -> LayerKind | None:
    return next((k for k in _REGISTERED if k.matches(module)), None)


def layer_kind(module: nn.Module) -> str | None:
    kind = kind_of(module)
    return None if kind is None else kind.name


def _named(kind: str) -> LayerKind:
    if kind not in BUILTIN:
        raise DeltatuneError(f"layer kind {kind!r} has no 2-D weight view")
    return BUILTIN[kind]


def out_in(module: nn.Module, kind: str) -> tuple[int, int]:
    """(out, fan_in) of the 2-D weight view."""
    own = kind_of(module)      # a registered kind may read its shape without building the weight
    return (own if own is not None and own.name == kind else _named(kind)).out_in(module)


def to_2d(weight: torch.Tensor, kind: str) -> torch.Tensor:
    return _named(kind).to_2d(weight)


def from_2d(w2: torch.Tensor, like: torch.Tensor, kind: str) -> torch.Tensor:
    return _named(kind).from_2d(w2, like)


def merge_bias_shift(w2: torch.Tensor, b: torch.Tensor | None, shift: torch.Tensor,
                     kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold an output shift into the layer. An Embedding has no bias, but every lookup returns
    exactly one row, so the shift is added to every row (a column of the 2-D view)."""
    shift = shift.double()
    if kind == "embedding":
        return w2 + shift[:, None], b
    return w2, shift if b is None else b + shift


def channel_view(v: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Shape a per-output-feature vector so it broadcasts against the layer output ``y``."""
    if kind == "conv":
        return v.view(1, -1, *([1] * (y.dim() - 2)))
    return v


def check_groups(module: nn.Module, kind: str, method: str) -> None:
    if kind == "conv" and module.groups != 1:
        raise DeltatuneError(
            f"{method} supports convolutions with groups=1 only; this one has groups={module.groups} "
            f"(a depthwise/grouped conv): exclude it from targets")
