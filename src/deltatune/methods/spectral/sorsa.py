"""SORSA, from "SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation of
Large Language Models" (Cao, 2024).

The frozen weight's 2-D view ``W (out, fan_in) = U S Vᵀ`` is split into its principal part, trained,
and a frozen residual::

    W' = W_r + W_p,     W_p = U_p diag(S_p) V_pᵀ,     W_r = W - U₀ diag(S₀) V₀ᵀ

with ``U_p (out, r)``, ``S_p (r)``, ``V_p (fan_in, r)`` trained and initialised to the top ``r``
singular triplets ``U₀, S₀, V₀``, so the model is unchanged at init (as in the paper). Here ``W`` is
never modified: the delta adds ``ΔW = U_p diag(S_p) V_pᵀ - U₀ diag(S₀) V₀ᵀ``, zero at init, the same
function with the same gradients.

The orthonormal regulariser keeps the singular vectors near orthonormal frames, so that scaling
is carried by ``S_p``; it enters through ``dt.auxiliary_loss``, summed over the adapter's layers::

    L_reg = gamma Σ_layers (||U_pᵀ U_p - I||²_F + ||V_pᵀ V_p - I||²_F)

(zero at init up to rounding). ``gamma`` is the released recipe's 4e-4; its trainer adds the
regulariser's gradient scaled by ``gamma / lr`` to the task gradient (the regulariser on its own
rate); a loss term cannot see the rate, so here ``gamma`` weighs the term itself.

Parameter count per layer: ``r (out + fan_in + 1)``. ``r`` defaults to 8, LoRA's rank here (the
paper's Llama 2 runs use 128 on 4096-wide layers; its package defaults to 4).

Stored: ``U_p``, ``S_p``, ``V_pᵀ``. ``U₀, S₀, V₀`` are the SVD of the frozen weight (``_svd.spectrum``),
recomputed at attach and load into non-persistent buffers. On Linear and GPT-2 ``Conv1D`` layers the
forward runs through the factors (``x V_p S_p U_pᵀ - x V₀ S₀ U₀ᵀ``, rank ``2r``) without building ``ΔW``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import BaseConfig, check_number, method_config
from ...core.engine import adapters, wrappers
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import WeightDelta
from ..lowrank.lora import DEFAULT_TARGETS
from ._svd import MATMUL_KINDS, frozen, rank_of, spectrum, trained


@method_config
class SorsaConfig(BaseConfig):
    """SORSA. ``r`` the number of principal singular triplets trained per layer; ``gamma`` the
    weight of the orthonormal regulariser (0: none)."""

    r: int = 8
    gamma: float = 4e-4

    def validate(self) -> None:
        check_number("r", self.r, kind=int, low=1)
        check_number("gamma", self.gamma, low=0)


class SorsaDelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, r: int):
        super().__init__()
        self.bind(base)
        self.kind = kind
        top = spectrum(base, kind).top(r)
        frozen(self, "sorsa_U0", top.U, base)
        frozen(self, "sorsa_S0", top.S, base)
        frozen(self, "sorsa_Vh0", top.Vh, base)
        self.sorsa_U = trained(self.sorsa_U0, base)
        self.sorsa_S = trained(self.sorsa_S0, base)
        self.sorsa_Vh = trained(self.sorsa_Vh0, base)

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        """``U_p diag(S_p) V_pᵀ - U₀ diag(S₀) V₀ᵀ``."""
        t = w2.dtype
        return ((self.sorsa_U.to(t) * self.sorsa_S.to(t)) @ self.sorsa_Vh.to(t)
                - (self.sorsa_U0.to(t) * self.sorsa_S0.to(t)) @ self.sorsa_Vh0.to(t))

    def forward(self, x, y, base):
        if self.kind not in MATMUL_KINDS:
            return super().forward(x, y, base)
        t = x.dtype
        # two products of one shape, so the trained and initial terms cancel exactly at init
        trained_part = F.linear(F.linear(x, self.sorsa_Vh.to(t)) * self.sorsa_S.to(t), self.sorsa_U.to(t))
        initial_part = F.linear(F.linear(x, self.sorsa_Vh0.to(t)) * self.sorsa_S0.to(t), self.sorsa_U0.to(t))
        return y + (trained_part - initial_part)

    def orthonormality(self) -> torch.Tensor:
        """``||U_pᵀ U_p - I||²_F + ||V_pᵀ V_p - I||²_F``."""
        eye = torch.eye(self.sorsa_S.shape[0], dtype=self.sorsa_U.dtype, device=self.sorsa_U.device)
        return ((self.sorsa_U.T @ self.sorsa_U - eye).square().sum()
                + (self.sorsa_Vh @ self.sorsa_Vh.T - eye).square().sum())


def make_delta(base: nn.Module, kind: str, cfg: SorsaConfig, name: str, loading: bool = False,
               shared: None = None) -> SorsaDelta:
    return SorsaDelta(base, kind, rank_of(base, kind, cfg.r, name, "sorsa"))


def expected_parameters(base: nn.Module, kind: str, cfg: SorsaConfig, name: str) -> int:
    """``r (out + fan_in + 1)`` per layer: ``U_p``, ``V_p`` and ``S_p``."""
    out, fan_in = out_in(base, kind)
    return cfg.r * (out + fan_in + 1)


def auxiliary_loss(model: nn.Module, name: str) -> torch.Tensor | None:
    """``gamma Σ (||U_pᵀU_p - I||²_F + ||V_pᵀV_p - I||²_F)`` over the adapter's layers; None for
    ``gamma = 0`` or a frozen (loaded) adapter, whose term would be a constant."""
    deltas = [w.deltas[name] for _, w in wrappers(model) if name in w.deltas]
    gamma = adapters(model)[name].gamma
    if gamma == 0 or not deltas or not deltas[0].sorsa_U.requires_grad:
        return None
    return gamma * sum(d.orthonormality() for d in deltas)


SORSA = register(Method(
    name="sorsa", config_cls=SorsaConfig,
    paper="SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation of Large Language Models",
    hook="weight", kinds=("linear", "conv", "conv1d_gpt2"), make_delta=make_delta,
    expected_parameters=expected_parameters, default_targets=DEFAULT_TARGETS, auxiliary_loss=auxiliary_loss,
    variants=[{"r": 4, "gamma": 0.1}],
    # the paper's Llama 2 7B rate is 3e-5 (PiSSA's range, a tenth of LoRA's there); LoRA here runs at
    # 3e-3, about 15 times Llama's LoRA rates, so 5e-4
    default_lr=5e-4))   # from the paper's recipe; not yet swept here
