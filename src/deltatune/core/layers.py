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
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import DeltatuneError

KINDS = ("linear", "conv", "embedding", "conv1d_gpt2", "norm")


def layer_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d_gpt2"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or (
            "norm" in type(module).__name__.lower() and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.dim() == 1):
        return "norm"
    return None


def out_in(module: nn.Module, kind: str) -> tuple[int, int]:
    """(out, fan_in) of the 2-D weight view."""
    w = module.weight
    if kind == "linear":
        return w.shape[0], w.shape[1]
    if kind == "conv":
        return w.shape[0], w[0].numel()
    if kind in ("embedding", "conv1d_gpt2"):
        return w.shape[1], w.shape[0]
    raise DeltatuneError(f"layer kind {kind!r} has no 2-D weight view")


def to_2d(weight: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "linear":
        return weight
    if kind == "conv":
        return weight.reshape(weight.shape[0], -1)
    if kind in ("embedding", "conv1d_gpt2"):
        return weight.t()
    if kind == "norm":
        return weight       # 1-D: only bias and scale deltas apply
    raise DeltatuneError(f"layer kind {kind!r} has no 2-D weight view")


def from_2d(w2: torch.Tensor, like: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "linear":
        return w2
    if kind == "conv":
        return w2.reshape(like.shape)
    if kind in ("embedding", "conv1d_gpt2"):
        return w2.t()
    if kind == "norm":
        return w2
    raise DeltatuneError(f"layer kind {kind!r} has no 2-D weight view")


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
