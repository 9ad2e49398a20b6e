"""HRA, from "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder Reflection
Adaptation" (Yuan, Liu and Xu, NeurIPS 2024).

A chain of ``r`` Householder reflections multiplies the frozen weight on its input side (as OFT,
oft.py; PEFT's HRA rotates the same side)::

    W2' = W2 H,     H = Π_{i=1..r} (I - 2 u_i u_iᵀ / ‖u_i‖²),     ΔW = W2 (H - I)

``H`` is orthogonal for any ``u_i`` (each factor is a reflection) and ``W2 (H - I)`` has rank at most
``r``: the bridge to low-rank adaptation of the title. It is applied reflection by reflection,
``Δ -= 2 ((W2 + Δ) û_i) û_iᵀ``, never as a ``fan_in x fan_in`` matrix.

Trained: ``U = [u_1 ... u_r]`` (``hra_u``, ``fan_in x r``); frozen: the layer. Initialisation (the
paper's): the reflections come in equal pairs, ``u_{2k-1} = u_{2k}``, drawn uniform in
``±(r/2)^-1/2`` (the official code's Kaiming-uniform draw), so each pair cancels, ``H = I`` and the
model is unchanged at init; ``r`` must therefore be even. Orthogonality of the reflection planes
(the paper's regulariser, Eq. 7): ``orth_reg_weight · Σ_layers ‖I - ÛᵀÛ‖²_F`` with ``Û`` the
unit-norm columns, through ``dt.auxiliary_loss`` (0, the default, trains plain HRA; PEFT's
Gram-Schmidt alternative is not offered). A convolution is rotated on its 2-D view
(``fan_in = in_channels / groups x kernel``).

Parameters per layer: ``r · fan_in``.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.config import BaseConfig, check, check_number, method_config
from ...core.engine import adapters, wrappers
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import WeightDelta, weight_dtype
from ..lowrank.lora import DEFAULT_TARGETS
from ._rotation import check_conv, compute_dtype


@method_config
class HRAConfig(BaseConfig):
    """HRA. ``r``: reflections per layer (even); ``orth_reg_weight``: the regulariser's weight λ."""

    r: int = 8
    orth_reg_weight: float = 0.0

    def validate(self) -> None:
        check_number("r", self.r, kind=int, low=2, high=1 << 16)
        check(self.r % 2 == 0, f"r={self.r} must be even: the reflections start in cancelling pairs, so the "
                               f"model is unchanged at init; use r={self.r + 1}")
        check_number("orth_reg_weight", self.orth_reg_weight, low=0)


class HRADelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, cfg: HRAConfig, name: str):
        super().__init__()
        check_conv(base, kind, "hra", name)
        self.kind = kind
        self.bind(base)
        _, fan_in = out_in(base, kind)
        like = weight_dtype(base)
        half = (torch.rand(fan_in, cfg.r // 2, device=like["device"]) * 2 - 1) * (cfg.r // 2) ** -0.5
        self.hra_u = nn.Parameter(half.repeat_interleave(2, dim=1).to(like["dtype"]))

    def unit(self, dtype: torch.dtype) -> torch.Tensor:
        u = self.hra_u.to(dtype)
        return u / u.norm(dim=0)

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(w2)
        w, u = w2.to(dtype), self.unit(dtype)
        delta = torch.zeros_like(w)
        for i in range(u.shape[1]):
            delta = delta - 2 * torch.outer((w + delta) @ u[:, i], u[:, i])
        return delta.to(w2.dtype)

    def orthogonality(self) -> torch.Tensor:
        """``‖I - ÛᵀÛ‖²_F`` of the unit reflection vectors."""
        u = self.unit(compute_dtype(self.hra_u))
        return (torch.eye(u.shape[1], dtype=u.dtype, device=u.device) - u.t() @ u).pow(2).sum()


def make_delta(base: nn.Module, kind: str, cfg: HRAConfig, name: str, loading: bool = False) -> HRADelta:
    return HRADelta(base, kind, cfg, name)


def expected_parameters(base: nn.Module, kind: str, cfg: HRAConfig, name: str) -> int:
    """``r · fan_in``: the reflection vectors."""
    return cfg.r * out_in(base, kind)[1]


def auxiliary_loss(model: nn.Module, name: str) -> torch.Tensor | None:
    """``orth_reg_weight Σ ‖I - ÛᵀÛ‖²_F`` over the adapter's layers (None when off or frozen)."""
    weight = adapters(model)[name].orth_reg_weight
    deltas = [layer.deltas[name] for _, layer in wrappers(model) if name in layer.deltas]
    if weight == 0 or not deltas or not deltas[0].hra_u.requires_grad:
        return None
    return weight * sum(d.orthogonality() for d in deltas)


HRA = register(Method(
    name="hra", config_cls=HRAConfig,
    paper="Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder Reflection Adaptation",
    hook="weight", kinds=("linear", "conv", "conv1d_gpt2"), make_delta=make_delta,
    expected_parameters=expected_parameters, default_targets=DEFAULT_TARGETS, auxiliary_loss=auxiliary_loss,
    variants=[{"orth_reg_weight": 1e-3}],
    # the official GLUE recipes (DeBERTa-v3-base) train U with AdamW at 9e-4..4e-3
    default_lr=3e-3,    # from the paper's recipe; not yet swept here
))
