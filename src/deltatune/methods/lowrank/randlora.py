"""RandLoRA, from "RandLoRA: Full-rank parameter-efficient fine-tuning of large models" (Albert,
Zhang, Lucey and Shi, 2025).

A full-rank update as a sum of ``n`` fixed random rank-``r`` bases, each with trained diagonal
scalings::

    ΔW = (alpha / r) Σ_{i=1..n} B_i Λ_i A Γ_i,        n = ceil(d / r)

on the layer's 2-D view with its smaller side ``d`` and larger side ``D`` (``d = min(out, fan_in)``):
``A`` ``(r, d)``, one random matrix shared by the ``n`` terms, and ``B_i`` ``(D, r)`` are drawn
from ``seed`` (Kaiming-uniform, ``|A| <= 1/sqrt(d)``, ``|B_i| <= 1/sqrt(r)``) and frozen;
``Λ_i = diag(λ_i)`` ``(r × r)`` and ``Γ_i = diag(γ_i)`` ``(d × d)`` are trained. Because
``n r >= d``, the sum can reach full rank ``d`` while training only ``n (r + d)`` numbers per layer
(the parameter count). Our reading of the paper (and of the authors' Hugging Face PEFT version,
which agrees): ``Γ`` scales the smaller side, so when ``fan_in <= out`` the sum is ``ΔW`` itself,
and otherwise it is ``ΔWᵀ`` (``Γ`` then scales the output side); a single ``A`` serves all ``n``
terms, the distinct ``Γ_i`` and ``B_i`` make the terms independent.

Initialisation (the authors'): ``λ = 0``, so the model is unchanged at initialisation, and
``γ = 1 / D``; ``alpha / r`` with ``alpha = 20 r`` compensates the small random products.

Adapter-level state: ``A`` and the stacked ``B_i`` are regenerated from ``seed`` (stored in the
config) as non-persistent buffers of the adapter-level module (VeRA's ``VeraBases``, one per
shape, shared by the layers of that shape), so the adapter file holds only ``λ`` and ``γ``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...core.config import BaseConfig, check_number, method_config
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import WeightDelta, weight_dtype
from .lora import DEFAULT_TARGETS
from .vera import VeraBases


@method_config
class RandLoraConfig(BaseConfig):
    """RandLoRA. ``r`` the rank of each random basis, ``alpha`` the scale numerator
    (``alpha / r``), ``seed`` the seed the bases are regenerated from."""

    r: int = 32
    alpha: float = 640.0
    seed: int = 0

    def validate(self) -> None:
        check_number("r", self.r, kind=int, low=1, high=1 << 16)
        check_number("alpha", self.alpha, low=0, low_open=True)
        check_number("seed", self.seed, kind=int, low=0, high=2 ** 63 - 1)


class RandLoraDelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, cfg: RandLoraConfig, bases: VeraBases):
        super().__init__()
        self.kind = kind
        self.bind(base)
        out, fan_in = out_in(base, kind)
        like = weight_dtype(base)
        probe = torch.empty(0, **like)
        # Γ scales the smaller side, so the trained count is n (r + min(out, fan_in))
        self.input_side = fan_in <= out
        d, D = (fan_in, out) if self.input_side else (out, fan_in)
        n = math.ceil(d / cfg.r)
        self.r, self.scale, self.shape_B = cfg.r, cfg.alpha / cfg.r, (D, n, cfg.r)
        # a plain reference, not a submodule: the bases belong to the adapter, listed once
        self.__dict__["bases"] = bases
        self.key_A = bases.matrix("randlora_A", cfg.r, d, probe)
        # the n bases B_i stacked as (D n, r): the bound 1/sqrt(r) is each B_i's own
        self.key_B = bases.matrix("randlora_B", D * n, cfg.r, probe)
        self.randlora_lambda = nn.Parameter(torch.zeros(n, cfg.r, **like))
        self.randlora_gamma = nn.Parameter(torch.full((n, d), 1.0 / D, **like))

    @property
    def randlora_A(self) -> torch.Tensor:
        """The shared frozen ``A``, ``(r, d)``."""
        return self.bases.get_buffer(self.key_A)

    @property
    def randlora_B(self) -> torch.Tensor:
        """The ``n`` frozen ``B_i``, ``(D, n, r)``: ``B_i = randlora_B[:, i]``."""
        return self.bases.get_buffer(self.key_B).view(self.shape_B)

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        dtype = w2.dtype
        lam, gam = self.randlora_lambda.to(dtype), self.randlora_gamma.to(dtype)
        D, n, r = self.shape_B
        # Λ_i A Γ_i for every i at once, (n, r, d); then Σ_i B_i (Λ_i A Γ_i) is one product
        scaled = lam[:, :, None] * self.randlora_A.to(dtype)[None] * gam[:, None, :]
        update = self.randlora_B.to(dtype).reshape(D, n * r) @ scaled.reshape(n * r, -1)
        return self.scale * (update if self.input_side else update.t())


def make_delta(base: nn.Module, kind: str, cfg: RandLoraConfig, name: str, loading: bool = False,
               shared: VeraBases | None = None) -> RandLoraDelta:
    return RandLoraDelta(base, kind, cfg, shared)


def expected_parameters(base: nn.Module, kind: str, cfg: RandLoraConfig, name: str) -> int:
    """``n (r + d)`` per layer, ``d = min(out, fan_in)``, ``n = ceil(d / r)``: the diagonals of Λ_i, Γ_i."""
    d = min(out_in(base, kind))
    return math.ceil(d / cfg.r) * (cfg.r + d)


RANDLORA = register(Method(
    name="randlora",
    config_cls=RandLoraConfig,
    paper="RandLoRA: Full-rank parameter-efficient fine-tuning of large models",
    hook="weight",
    # an Embedding's larger side is its vocabulary: the n stacked B_i would be the size of the table
    kinds=("linear", "conv", "conv1d_gpt2"),
    make_delta=make_delta,
    expected_parameters=expected_parameters,
    default_targets=DEFAULT_TARGETS,
    shared_state=lambda model, cfg: VeraBases(cfg.seed),
    default_lr=1e-2,    # from the paper's recipe as far as we know it (VeRA's rate); not yet swept here
))
