"""The weight hook stated once: a method gives ``ΔW`` on the 2-D weight view, the engine derives the rest.

Most weight methods are one formula for the update of a frozen weight, ``W' = W + ΔW(θ, W)``:
low-rank and structured products (``ΔW = B A``, ``C ⊗ B A``, ``(B1 A1) ⊙ (B2 A2)``), spectral
updates (``U M Vᵀ``), multiplicative ones (OFT's ``R W`` is ``W + (R - I) W``; HiRA's
``W ⊙ (B A)``). A ``WeightDelta`` implements only ``delta_2d(w2)``: the update on the 2-D view
``(out, fan_in)`` (core.layers), computed in ``w2``'s dtype from the *frozen* weight ``w2``. From it:

- forward: every layer kind here is linear in its weight, so ``layer(x; W + ΔW) = y + layer₀(x; ΔW)``
  where ``layer₀`` is the layer's own operation without its bias (``apply_2d``): one formula serves
  Linear, Conv1d/2d/3d (with the layer's stride, padding, dilation, groups), Embedding and GPT-2's
  ``Conv1D``;
- merge: ``W2 + ΔW`` in float64 (the frozen weight as attach found it, so forward and merge agree
  inside a stack: every delta of the stage reads the original layer, as LoRA does);
- ``delta_weight()``: ``ΔW`` in float64 on the 2-D view, for diagnostics and task-vector merging.

A method with a cheaper forward (LoRA's ``x Aᵀ Bᵀ``) overrides ``forward``; ``delta_2d`` stays its definition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DeltatuneError
from .layers import kind_of, to_2d
from .wrapper import Delta


def frozen_2d(base: nn.Module, kind: str) -> torch.Tensor:
    """The frozen layer's float weight on the 2-D view (dequantised for a quantised layer)."""
    layer_kind = kind_of(base)
    weight = layer_kind.weight(base) if layer_kind is not None else base.weight
    return to_2d(weight, kind)


def weight_dtype(base: nn.Module) -> dict:
    """dtype and device for a delta's parameters: the layer's float dtype (float32 for a quantised one)."""
    w = base.weight
    return dict(dtype=w.dtype if w.is_floating_point() else torch.float32, device=w.device)


def apply_2d(x: torch.Tensor, w2: torch.Tensor, base: nn.Module, kind: str) -> torch.Tensor:
    """The layer's own operation with weight view ``w2`` and no bias, on input ``x``."""
    if kind in ("linear", "conv1d_gpt2"):
        return F.linear(x, w2)
    if kind == "embedding":
        return F.embedding(x, w2.t(), base.padding_idx, base.max_norm, base.norm_type,
                           base.scale_grad_by_freq, base.sparse)
    if kind == "conv":
        weight = w2.reshape(base.weight.shape)
        if base.padding_mode != "zeros":
            raise DeltatuneError(f"convolutions with padding_mode={base.padding_mode!r} are not supported by "
                                 f"weight deltas; use a zero-padded convolution")
        conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
        return conv(x, weight, None, base.stride, base.padding, base.dilation, base.groups)
    raise DeltatuneError(f"layer kind {kind!r} has no 2-D weight view for a weight delta")


class WeightDelta(Delta):
    """A delta given by ``ΔW``: subclasses set ``self.kind``, call ``bind(base)`` and implement
    ``delta_2d(w2)`` in ``w2``'s dtype (the layer's float dtype in forward, float64 in merge)."""

    kind: str

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x, y, base):
        w2 = frozen_2d(base, self.kind)
        return y + apply_2d(x, self.delta_2d(w2.to(x.dtype) if x.is_floating_point() else w2), base, self.kind)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """``ΔW`` in float64 on the 2-D view."""
        return self.delta_2d(frozen_2d(base, self.kind).detach().double())

    def merge(self, w2, b):
        return w2 + self.delta_2d(self._frozen.double()), b

    def bind(self, base: nn.Module) -> None:
        """Keep a plain reference to the frozen layer: ``merge`` reads its weight, not the one given."""
        self.__dict__["_base"] = base

    @property
    def _frozen(self) -> torch.Tensor:
        base = self.__dict__.get("_base")
        if base is None:
            raise DeltatuneError(f"{type(self).__name__}.bind(base) was not called in its constructor")
        return frozen_2d(base, self.kind).detach()
