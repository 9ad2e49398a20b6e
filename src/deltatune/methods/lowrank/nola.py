"""NOLA, from "NOLA: Compressing LoRA using Linear Combination of Random Basis" (Koohpayegani,
Navaneet, Nooralinejad, Kolouri and Pirsiavash, 2024).

LoRA's factors are re-parametrised as linear combinations of fixed random matrices, and only the
mixing coefficients are trained::

    A = Σ_{i=1..k} α_i A_i,     B = Σ_{j=1..l} β_j B_j,     ΔW = (alpha / r) B A

with ``A_i`` ``(r, fan_in)`` and ``B_j`` ``(out, r)`` drawn once from ``seed`` and frozen, and
``α`` ``(k,)``, ``β`` ``(l,)`` trained, so the number of trained parameters is decoupled from both
the rank and the layer's shape. Parameter count per layer: ``k + l``. Each basis is
Kaiming-uniform divided by the square root of its count (``|A_i| <= 1/sqrt(k fan_in)``,
``|B_j| <= 1/sqrt(l r)``), as the authors' code divides its uniform bases by ``sqrt(k)``: an
update of every coefficient then moves ``A`` by ``O(sqrt(k))`` basis norms, not ``O(k)``, so the
learning rate does not depend on ``k`` and ``l``.

Initialisation: ``β = 0``, so ``B = 0`` and the model is unchanged at initialisation; ``α`` is
drawn uniformly in ``±sqrt(3)``, which gives ``A`` LoRA's Kaiming-uniform variance
``1 / (3 fan_in)`` (a zero ``α`` as well would leave every gradient zero). The authors' GPT-2 code
reaches the same start differently, adding a frozen Kaiming ``A_0`` to ``Σ α_i A_i`` with
``α = 0``; the formula above is the paper's.

Adapter-level state: the bases are regenerated from ``seed`` (stored in the config) as
non-persistent buffers of the adapter-level module (VeRA's ``VeraBases``: one stack of ``k``
``A_i`` per ``fan_in``, one of ``l`` ``B_j`` per ``out``, shared by the layers of that shape), so
the adapter file holds only ``α`` and ``β``.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.config import BaseConfig, check_number, method_config
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import WeightDelta, weight_dtype
from .lora import DEFAULT_TARGETS
from .vera import VeraBases


@method_config
class NolaConfig(BaseConfig):
    """NOLA. ``r`` the rank of the random factors, ``alpha`` the scale numerator (``alpha / r``),
    ``k`` and ``l`` the numbers of random bases of ``A`` and ``B`` (the trained coefficients per
    layer), ``seed`` the seed the bases are regenerated from."""

    r: int = 8
    alpha: float = 16.0
    k: int = 1024
    l: int = 1024
    seed: int = 0

    def validate(self) -> None:
        check_number("r", self.r, kind=int, low=1, high=1 << 16)
        check_number("alpha", self.alpha, low=0, low_open=True)
        check_number("k", self.k, kind=int, low=1, high=1 << 20)
        check_number("l", self.l, kind=int, low=1, high=1 << 20)
        check_number("seed", self.seed, kind=int, low=0, high=2 ** 63 - 1)


class NolaDelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, cfg: NolaConfig, bases: VeraBases):
        super().__init__()
        self.kind = kind
        self.bind(base)
        out, fan_in = out_in(base, kind)
        like = weight_dtype(base)
        probe = torch.empty(0, **like)
        self.r, self.scale = cfg.r, cfg.alpha / cfg.r
        self.norm_A, self.norm_B = cfg.k ** -0.5, cfg.l ** -0.5
        self.shape_A, self.shape_B = (cfg.k, cfg.r, fan_in), (cfg.l, out, cfg.r)
        # a plain reference, not a submodule: the bases belong to the adapter, listed once
        self.__dict__["bases"] = bases
        # stacked as (k r, fan_in) and (l out, r): the bound 1/sqrt(cols) is A_i's and B_j's own
        self.key_A = bases.matrix("nola_A", cfg.k * cfg.r, fan_in, probe)
        self.key_B = bases.matrix("nola_B", cfg.l * out, cfg.r, probe)
        self.nola_alpha = nn.Parameter(torch.empty(cfg.k, **like).uniform_(-3.0 ** 0.5, 3.0 ** 0.5))
        self.nola_beta = nn.Parameter(torch.zeros(cfg.l, **like))

    @property
    def basis_A(self) -> torch.Tensor:
        """The ``k`` frozen ``A_i``, ``(k, r, fan_in)``."""
        return self.bases.get_buffer(self.key_A).view(self.shape_A) * self.norm_A

    @property
    def basis_B(self) -> torch.Tensor:
        """The ``l`` frozen ``B_j``, ``(l, out, r)``."""
        return self.bases.get_buffer(self.key_B).view(self.shape_B) * self.norm_B

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        dtype = w2.dtype
        # the 1/sqrt(k), 1/sqrt(l) go on the coefficients: no scaled copy of the bases per call
        A_stack = self.bases.get_buffer(self.key_A).view(self.shape_A).to(dtype)
        B_stack = self.bases.get_buffer(self.key_B).view(self.shape_B).to(dtype)
        A = torch.einsum("k,kri->ri", self.nola_alpha.to(dtype) * self.norm_A, A_stack)
        B = torch.einsum("l,lor->or", self.nola_beta.to(dtype) * self.norm_B, B_stack)
        return self.scale * (B @ A)


def make_delta(base: nn.Module, kind: str, cfg: NolaConfig, name: str, loading: bool = False,
               shared: VeraBases | None = None) -> NolaDelta:
    return NolaDelta(base, kind, cfg, shared)


def expected_parameters(base: nn.Module, kind: str, cfg: NolaConfig, name: str) -> int:
    """``k + l`` per layer: the mixing coefficients of ``A`` and ``B``."""
    return cfg.k + cfg.l


NOLA = register(Method(
    name="nola",
    config_cls=NolaConfig,
    paper="NOLA: Compressing LoRA using Linear Combination of Random Basis",
    hook="weight",
    # an Embedding's fan_in is its vocabulary: k random (r, vocab) bases would outweigh the layer
    kinds=("linear", "conv", "conv1d_gpt2"),
    make_delta=make_delta,
    expected_parameters=expected_parameters,
    default_targets=DEFAULT_TARGETS,
    shared_state=lambda model, cfg: VeraBases(cfg.seed),
    default_lr=1e-2,    # from the paper's recipe; not yet swept here
))
