"""LoHa, from "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning"
(Hyeon-Woo, Ye-Bin and Oh, 2022), as LyCORIS and PEFT use it for fine-tuning.

The frozen weight's 2-D view ``W (out, fan_in)`` becomes::

    W + (alpha / r) · (B₁ A₁) ⊙ (B₂ A₂)

with ``B₁, B₂ (out, r)`` (``hada_w1_a``, ``hada_w2_a``) and ``A₁, A₂ (r, fan_in)`` (``hada_w1_b``,
``hada_w2_b``), all trained. The Hadamard product of two rank-``r`` matrices has rank up to ``r²``
(FedPara's point) for ``2 r (out + fan_in)`` parameters per layer. A convolution's kernel is
updated on its 2-D view ``(out, in · k₁ k₂)`` (PEFT's conv-specific CP path is not provided).

Initialisation (FedPara's He initialisation, as PEFT): ``A₂`` zero, the other three He-uniform,
so the model is unchanged at init. Zeroing ``A₂`` rather than a whole product's both factors keeps
every gradient alive: ``A₂`` gets one on the first step (``B₂ᵀ (G ⊙ B₁ A₁)`` with ``B₂`` random),
and once ``A₂`` has moved the other three get theirs.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.config import BaseConfig, method_config
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import WeightDelta, weight_dtype
from ..lowrank.lora import DEFAULT_TARGETS
from ._kron import check_layer, check_rank_alpha, he_uniform_


@method_config
class LohaConfig(BaseConfig):
    """LoHa. ``r`` the rank of each of the two products, ``alpha`` the scale numerator (``alpha / r``)."""

    r: int = 8
    alpha: float = 8.0

    def validate(self) -> None:
        check_rank_alpha(self.r, self.alpha)


class LohaDelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, cfg: LohaConfig, name: str, loading: bool = False):
        super().__init__()
        check_layer(base, kind, "loha", name)
        self.kind = kind
        self.bind(base)
        out, fan_in = out_in(base, kind)
        self.scale = cfg.alpha / cfg.r
        like = weight_dtype(base)
        self.hada_w1_a, self.hada_w2_a = (nn.Parameter(torch.zeros(out, cfg.r, **like)) for _ in range(2))
        self.hada_w1_b, self.hada_w2_b = (nn.Parameter(torch.zeros(cfg.r, fan_in, **like)) for _ in range(2))
        if not loading:
            with torch.no_grad():
                for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
                    he_uniform_(p)

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        d = w2.dtype
        first = self.hada_w1_a.to(d) @ self.hada_w1_b.to(d)
        second = self.hada_w2_a.to(d) @ self.hada_w2_b.to(d)
        return self.scale * first * second


def make_delta(base: nn.Module, kind: str, cfg: LohaConfig, name: str, loading: bool = False,
               shared=None) -> LohaDelta:
    return LohaDelta(base, kind, cfg, name, loading)


def expected_parameters(base: nn.Module, kind: str, cfg: LohaConfig, name: str) -> int:
    """``2 r (out + fan_in)``: two rank-``r`` pairs."""
    out, fan_in = out_in(base, kind)
    return 2 * cfg.r * (out + fan_in)


LOHA = register(Method(
    name="loha", config_cls=LohaConfig,
    paper="FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning",
    hook="weight", kinds=("linear", "conv", "conv1d_gpt2"), make_delta=make_delta,
    expected_parameters=expected_parameters, default_targets=DEFAULT_TARGETS,
    default_lr=1e-2))   # from the paper's recipe; not yet swept here
