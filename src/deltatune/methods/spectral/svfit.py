"""SVFit, from "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular
Values" (Sun et al., 2024).

The frozen weight's 2-D view ``W (out, fan_in)`` is split by its SVD ``W = U S Vᵀ`` into its best
rank-``r`` approximation and a residual; the top ``r`` singular values become the trained
parameters and scale the fixed singular subspaces::

    W' = W_res + U_r diag(s) V_rᵀ,     W_res = W - U_r diag(s₀) V_rᵀ,     s₀ = S[:r]

so ``ΔW = U_r diag(s - s₀) V_rᵀ``. Trained: ``s`` (``r``), starting at ``s₀``; frozen: ``U_r``, ``V_r``
and ``s₀``. The paper's model is its pretrained model at init (``W_res + U_r diag(s₀) V_rᵀ = W``);
here ``W`` is never modified and the delta adds ``U_r diag(s - s₀) V_rᵀ``, which is zero at init,
the same function with the same gradients. ``s`` itself is the parameter, as in the paper, so
weight decay pulls the singular values toward zero, not toward ``s₀``.

Parameter count per layer: ``r``. ``r=None`` (the default) trains every singular value
(``r = min(out, fan_in)``): the paper's count, 16 times fewer than LoRA at rank 8 on a square layer
(``d`` against ``16 d``), is that of all ``d`` singular values.

Stored: only ``s``. ``U_r``, ``V_r`` and ``s₀`` are the SVD of the frozen weight (``_svd.spectrum``:
float64, signs fixed), recomputed at attach and at load into non-persistent buffers.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.config import BaseConfig, check_number, method_config
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import WeightDelta
from ..lowrank.lora import DEFAULT_TARGETS
from ._svd import frozen, rank_of, spectrum, trained


@method_config
class SvfitConfig(BaseConfig):
    """SVFit. ``r`` the number of top singular values trained per layer (None: all of them)."""

    r: int | None = None

    def validate(self) -> None:
        if self.r is not None:
            check_number("r", self.r, kind=int, low=1)


class SvfitDelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, r: int):
        super().__init__()
        self.bind(base)
        self.kind = kind
        top = spectrum(base, kind).top(r)
        frozen(self, "svfit_U", top.U, base)
        frozen(self, "svfit_Vh", top.Vh, base)
        frozen(self, "svfit_s0", top.S, base)
        self.svfit_s = trained(self.svfit_s0, base)

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        """``U_r diag(s - s₀) V_rᵀ``."""
        shift = self.svfit_s.to(w2.dtype) - self.svfit_s0.to(w2.dtype)
        return (self.svfit_U.to(w2.dtype) * shift) @ self.svfit_Vh.to(w2.dtype)


def make_delta(base: nn.Module, kind: str, cfg: SvfitConfig, name: str, loading: bool = False,
               shared: None = None) -> SvfitDelta:
    return SvfitDelta(base, kind, rank_of(base, kind, cfg.r, name, "svfit"))


def expected_parameters(base: nn.Module, kind: str, cfg: SvfitConfig, name: str) -> int:
    """``r`` per layer (``min(out, fan_in)`` for ``r=None``)."""
    return cfg.r if cfg.r is not None else min(out_in(base, kind))


SVFIT = register(Method(
    name="svfit", config_cls=SvfitConfig,
    paper="SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values",
    hook="weight", kinds=("linear", "conv", "conv1d_gpt2"), make_delta=make_delta,
    expected_parameters=expected_parameters, default_targets=DEFAULT_TARGETS,
    variants=[{"r": 4}],
    # SVFit's rates are not in its abstract: the rate of the other per-component scale vectors
    # here (IA3, VeRA), one step moving each singular value by about 1e-2
    default_lr=1e-2))   # not yet swept here
