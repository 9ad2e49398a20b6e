"""LoKr, from "KronA: Parameter Efficient Tuning with Kronecker Adapter" (Edalati et al., 2022), the
Kronecker adapter of LyCORIS and of "DiffuseKronA: A Parameter Efficient Fine-tuning Method for
Personalized Diffusion Model".

The frozen weight's 2-D view ``W (out, fan_in)`` becomes::

    W + (alpha / r) · C ⊗ M,        C (out₁, in₁),  M (out₂, in₂),  out = out₁ out₂,  fan_in = in₁ in₂

``out`` and the input channels are each split into two factors ``m · n`` by ``factor``: -1 takes
the most balanced pair (``m`` the largest divisor not above the square root); a positive ``factor``
that divides the dimension is ``m`` itself, otherwise ``m`` is the largest divisor not above
``factor`` or the square root. ``C`` takes the ``m``'s, ``M`` the ``n``'s, as LyCORIS and PEFT
split. A convolution's kernel goes whole into ``M``'s columns (``in₂ = n · k₁ k₂``), so ``C ⊗ M``
is the Kronecker product on the 2-D view ``(out, in · k₁ k₂)``; PEFT's separate Tucker path for
conv kernels (``use_effective_conv2d``) is not provided, the 2-D view serves every kind.

``M = B A`` is low-rank (``lokr_w2_a (out₂, r)``, ``lokr_w2_b (r, in₂)``) unless
``r >= max(out₂, n) / 2`` (the product would be no smaller than the matrix): then it is one full
``lokr_w2``. ``C`` is the full ``lokr_w1``; with ``decompose_both`` it is low-rank
(``lokr_w1_a (out₁, r)``, ``lokr_w1_b (r, in₁)``) when ``r < max(out₁, in₁) / 2``. All of them are
trained; nothing of the frozen layer is read.

Initialisation (as PEFT): ``C`` zero (``lokr_w1``, or ``lokr_w1_a``), the other factors
He-uniform, so the model is unchanged at init; ``C`` gets a gradient on the first step, ``M``'s
factors from the second. Parameter count per layer: ``|C| + |M|`` with ``|C| = out₁ in₁`` (or
``r (out₁ + in₁)`` decomposed) and ``|M| = r (out₂ + in₂)`` (or ``out₂ in₂`` full).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from ...core.config import BaseConfig, check, method_config
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import WeightDelta, weight_dtype
from ..lowrank.lora import DEFAULT_TARGETS
from ._kron import check_layer, check_rank_alpha, he_uniform_


@method_config
class LokrConfig(BaseConfig):
    """LoKr. ``r`` the rank of the low-rank factor(s), ``alpha`` the scale numerator (``alpha / r``),
    ``factor`` how dimensions are split (-1: most balanced), ``decompose_both``: ``C`` low-rank too."""

    r: int = 8
    alpha: float = 8.0
    factor: int = -1
    decompose_both: bool = False

    def validate(self) -> None:
        check_rank_alpha(self.r, self.alpha)
        check(self.factor == -1 or self.factor >= 1,
              f"factor={self.factor} is not valid: use -1 (the most balanced split) or a positive int "
              f"(the size of the first Kronecker factor's side)")


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m · n = dim``: ``m = factor`` where it divides ``dim``, else the largest
    divisor of ``dim`` not above ``factor`` (any, for -1) nor ``sqrt(dim)``."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    bound = math.isqrt(dim) if factor == -1 else min(factor, math.isqrt(dim))
    m = max(d for d in range(1, bound + 1) if dim % d == 0)
    return m, dim // m


@dataclasses.dataclass(frozen=True)
class KronShape:
    """The split of a layer's 2-D view: ``C (out1, in1)``, ``M (out2, in2 · kernel)``; ``in2`` is
    the input-channel factor, which (not ``in2 · kernel``) decides whether ``M`` is kept full."""
    out1: int
    out2: int
    in1: int
    in2: int
    kernel: int

    @classmethod
    def of(cls, base: nn.Module, kind: str, factor: int) -> "KronShape":
        out, fan_in = out_in(base, kind)
        kernel = math.prod(base.kernel_size) if kind == "conv" else 1
        (out1, out2), (in1, in2) = factorization(out, factor), factorization(fan_in // kernel, factor)
        return cls(out1, out2, in1, in2, kernel)

    def c_lowrank(self, cfg: LokrConfig) -> bool:
        return cfg.decompose_both and cfg.r < max(self.out1, self.in1) / 2

    def m_lowrank(self, cfg: LokrConfig) -> bool:
        return cfg.r < max(self.out2, self.in2) / 2


class LokrDelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, cfg: LokrConfig, name: str, loading: bool = False):
        super().__init__()
        check_layer(base, kind, "lokr", name)
        self.kind = kind
        self.bind(base)
        s = KronShape.of(base, kind, cfg.factor)
        self.scale = cfg.alpha / cfg.r
        like = weight_dtype(base)

        def new(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, **like))

        self.c_lowrank, self.m_lowrank = s.c_lowrank(cfg), s.m_lowrank(cfg)
        if self.c_lowrank:
            self.lokr_w1_a, self.lokr_w1_b = new(s.out1, cfg.r), new(cfg.r, s.in1)
        else:
            self.lokr_w1 = new(s.out1, s.in1)
        if self.m_lowrank:
            self.lokr_w2_a, self.lokr_w2_b = new(s.out2, cfg.r), new(cfg.r, s.in2 * s.kernel)
        else:
            self.lokr_w2 = new(s.out2, s.in2 * s.kernel)
        if not loading:
            with torch.no_grad():
                # C stays zero (lokr_w1, or lokr_w1_a): ΔW = 0 while both of M's factors are random
                for p in ((self.lokr_w1_b,) if self.c_lowrank else ()) + (
                        (self.lokr_w2_a, self.lokr_w2_b) if self.m_lowrank else (self.lokr_w2,)):
                    he_uniform_(p)

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(C, M)`` in ``dtype``."""
        c = self.lokr_w1_a.to(dtype) @ self.lokr_w1_b.to(dtype) if self.c_lowrank else self.lokr_w1.to(dtype)
        m = self.lokr_w2_a.to(dtype) @ self.lokr_w2_b.to(dtype) if self.m_lowrank else self.lokr_w2.to(dtype)
        return c, m

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        c, m = self.factors(w2.dtype)
        return self.scale * torch.kron(c, m)


def make_delta(base: nn.Module, kind: str, cfg: LokrConfig, name: str, loading: bool = False,
               shared=None) -> LokrDelta:
    return LokrDelta(base, kind, cfg, name, loading)


def expected_parameters(base: nn.Module, kind: str, cfg: LokrConfig, name: str) -> int:
    """``|C| + |M|``: each factor full, or ``r`` times its two sides where it is low-rank."""
    s = KronShape.of(base, kind, cfg.factor)
    c = cfg.r * (s.out1 + s.in1) if s.c_lowrank(cfg) else s.out1 * s.in1
    m = cfg.r * (s.out2 + s.in2 * s.kernel) if s.m_lowrank(cfg) else s.out2 * s.in2 * s.kernel
    return c + m


LOKR = register(Method(
    name="lokr", config_cls=LokrConfig, paper="KronA: Parameter Efficient Tuning with Kronecker Adapter",
    hook="weight", kinds=("linear", "conv", "conv1d_gpt2"), make_delta=make_delta,
    expected_parameters=expected_parameters, default_targets=DEFAULT_TARGETS,
    default_lr=5e-3,    # from the paper's recipe; not yet swept here
    variants=[{"r": 1, "decompose_both": True}, {"factor": 4}]))
