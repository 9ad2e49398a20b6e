"""LoLDU, from "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient
Fine-Tuning" (Shi et al., 2024).

The frozen weight's 2-D view ``W (out, fan_in)`` is factored by LU with partial pivoting and its
pivots pulled out as a diagonal, ``W = P L D U``: ``P`` a row permutation, ``L (out, k)`` unit lower
triangular (entries at most 1 in magnitude, from the pivoting), ``D = diag(d)`` the ``k = min(out,
fan_in)`` pivots and ``U (k, fan_in)`` unit upper triangular. The first ``r`` components initialise
the adapter, and training rescales them with a trained diagonal and one trained scalar::

    W' = W_res + z P L_r diag(d) U_r,     W_res = W - z₀ P L_r diag(d₀) U_r

Our reading of the paper, checked against its released code: ``L_r = L[:, :r]``, ``U_r = U[:r]`` and
``P`` are frozen, ``d`` (``r``) starts at the pivots ``d₀ = D[:r]`` and ``z`` at ``z₀ = alpha / r``, so
the model is unchanged at init (``W_res + z₀ P L_r D_r U_r = W``). Both the diagonal and the scale
train here (the released code makes the scale a parameter, but its filter of trained parameters
picks the diagonal only; a frozen scale is ``z = z₀`` throughout). Here ``W`` is never
modified: the delta adds ``ΔW = P L_r diag(z d - z₀ d₀) U_r``, zero at init, the same function
with the same gradients.

Parameter count per layer: ``r + 1``. ``r=None`` (the default, as the released code's rank 768 on
768-wide models) takes every component, ``r = k``; ``alpha`` is 1 as there, so ``z₀ = 1 / r``.

Stored: ``d`` and ``z`` only. ``P L_r``, ``U_r`` and ``d₀`` come from the LU of the frozen weight in
float64 (deterministic: partial pivoting picks the first largest entry of each column), recomputed
at attach and load into non-persistent buffers; ``z₀`` from the config.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...core.config import BaseConfig, check_number, method_config
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import WeightDelta, frozen_2d
from ..lowrank.lora import DEFAULT_TARGETS
from ._svd import frozen, rank_of, trained


@method_config
class LolduConfig(BaseConfig):
    """LoLDU. ``r`` the number of LDU components per layer (None: all ``min(out, fan_in)``);
    ``alpha`` sets the scale's start value ``alpha / r``."""

    r: int | None = None
    alpha: float = 1.0

    def validate(self) -> None:
        if self.r is not None:
            check_number("r", self.r, kind=int, low=1)
        check_number("alpha", self.alpha, low=0, low_open=True)


@dataclasses.dataclass(frozen=True)
class Ldu:
    """``W = PL diag(d) U``: ``PL (out, k)`` the permuted unit lower factor, ``d (k,)`` the pivots,
    ``U (k, fan_in)`` unit upper (a zero pivot leaves its row of ``U`` as LU gave it)."""
    PL: torch.Tensor
    d: torch.Tensor
    U: torch.Tensor


def ldu(w2: torch.Tensor) -> Ldu:
    """The pivoted LDU of a 2-D weight, in float64."""
    P, L, U = torch.linalg.lu(w2.double())
    d = U.diagonal()
    return Ldu(P @ L, d, U / torch.where(d == 0, 1.0, d)[:, None])


class LolduDelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, r: int, alpha: float):
        super().__init__()
        self.bind(base)
        self.kind = kind
        parts = ldu(frozen_2d(base, kind).detach())
        frozen(self, "loldu_L", parts.PL[:, :r], base)
        frozen(self, "loldu_U", parts.U[:r], base)
        frozen(self, "loldu_d0", parts.d[:r], base)
        frozen(self, "loldu_z0", torch.tensor(alpha / r), base)
        self.loldu_d = trained(self.loldu_d0, base)
        self.loldu_z = trained(self.loldu_z0, base)

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        """``P L_r diag(z d - z₀ d₀) U_r``."""
        t = w2.dtype
        scale = self.loldu_z.to(t) * self.loldu_d.to(t) - self.loldu_z0.to(t) * self.loldu_d0.to(t)
        return (self.loldu_L.to(t) * scale) @ self.loldu_U.to(t)


def make_delta(base: nn.Module, kind: str, cfg: LolduConfig, name: str, loading: bool = False,
               shared: None = None) -> LolduDelta:
    return LolduDelta(base, kind, rank_of(base, kind, cfg.r, name, "loldu"), cfg.alpha)


def expected_parameters(base: nn.Module, kind: str, cfg: LolduConfig, name: str) -> int:
    """``r + 1`` per layer: the diagonal and the scale (``r = min(out, fan_in)`` for ``r=None``)."""
    return (cfg.r if cfg.r is not None else min(out_in(base, kind))) + 1


LOLDU = register(Method(
    name="loldu", config_cls=LolduConfig,
    paper="LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for Parameter-Efficient Fine-Tuning",
    hook="weight", kinds=("linear", "conv", "conv1d_gpt2"), make_delta=make_delta,
    expected_parameters=expected_parameters, default_targets=DEFAULT_TARGETS,
    variants=[{"r": 4, "alpha": 4.0}],
    # LoLDU's rates are not in its abstract or released code: it trains a diagonal and a scalar, as
    # the scale-vector methods here (IA3, VeRA: 1e-2); a step of 1e-2 on z rescales W's LDU part by 1 %
    default_lr=3e-3))   # swept on BBC: 96.62 % at 3e-3, 95.95 % at 1e-2, 95.72 % at 3e-2
