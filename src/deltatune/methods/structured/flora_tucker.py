"""FLoRA, from "FLoRA: Low-Rank Core Space for N-dimension" (Si, Wang et al., 2024).

The update of an N-dimensional weight keeps its N-dimensional structure: a Tucker decomposition,
a small core ``G (r₁, ..., r_N)`` multiplied along each mode ``n`` by a factor ``U_n (I_n, r_n)``::

    ΔW = s · G ×₁ U₁ ×₂ U₂ ... ×_N U_N

For a convolution kernel ``(out, in / groups, k₁, k₂)`` that is four modes (the kernel is never
flattened, unlike LoRA on the 2-D view); for a Linear or GPT-2 ``Conv1D`` the two modes of the 2-D
view ``(out, fan_in)``, ``ΔW = s · U₁ G U₂ᵀ`` with an ``r × r`` core. ``ΔW`` is computed in the
weight's own shape and read on the 2-D view (a conv's view is ``reshape(out, -1)``).

Ranks: ``r`` for the channel modes and ``kernel_r`` for each spatial mode (None: the kernel's own
size, the spatial modes kept whole); a mode's rank is at most its size (``r_n = min(rank, I_n)``),
since a Tucker rank above it adds parameters and nothing it could express. ``s`` is ``scale``
(the authors' released example uses 4).

Trained: ``G`` (``flora_core``) and every ``U_n`` (``flora_factors``); nothing of the layer is read.
Initialisation (as the authors' code): ``G`` zero and each ``U_n`` He-normal over its rank
(a = sqrt(3): std ``1 / sqrt(2 r_n)``), so the model is unchanged at init; the core gets a gradient
on the first step, the factors from the second. Parameter count per layer: ``Π r_n + Σ I_n r_n``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...core.config import BaseConfig, check_number, method_config
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import WeightDelta, weight_dtype
from ..lowrank.lora import DEFAULT_TARGETS
from ._kron import check_layer


@method_config
class FloraTuckerConfig(BaseConfig):
    """FLoRA. ``r`` the rank of the channel modes, ``kernel_r`` of each spatial mode of a conv kernel
    (None: the kernel size), ``scale`` the factor ``s`` on ``ΔW``."""

    r: int = 8
    kernel_r: int | None = None
    scale: float = 4.0

    def validate(self) -> None:
        check_number("r", self.r, kind=int, low=1, high=1 << 16)
        if self.kernel_r is not None:
            check_number("kernel_r", self.kernel_r, kind=int, low=1, high=1 << 16)
        check_number("scale", self.scale, low=0, low_open=True)


def mode_shape(base: nn.Module, kind: str) -> tuple[int, ...]:
    """The modes Tucker runs over: the kernel's own shape for a conv, the 2-D view otherwise."""
    return tuple(base.weight.shape) if kind == "conv" else out_in(base, kind)


def ranks(shape: tuple[int, ...], cfg: FloraTuckerConfig) -> tuple[int, ...]:
    wanted = [cfg.r, cfg.r] + [cfg.kernel_r or size for size in shape[2:]]
    return tuple(min(w, size) for w, size in zip(wanted, shape))


def tucker(core: torch.Tensor, factors) -> torch.Tensor:
    """``G ×₁ U₁ ... ×_N U_N``: mode ``n`` of the core contracted with ``U_n``'s rank dimension."""
    t = core
    for n, u in enumerate(factors):
        t = torch.movedim(torch.tensordot(u, t, dims=([1], [n])), 0, n)
    return t


class FloraTuckerDelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, cfg: FloraTuckerConfig, name: str, loading: bool = False):
        super().__init__()
        check_layer(base, kind, "flora_tucker", name)
        self.kind = kind
        self.bind(base)
        self.scale = cfg.scale
        shape = mode_shape(base, kind)
        rank = ranks(shape, cfg)
        like = weight_dtype(base)
        self.flora_core = nn.Parameter(torch.zeros(*rank, **like))
        self.flora_factors = nn.ParameterList(
            [nn.Parameter(torch.zeros(size, r, **like)) for size, r in zip(shape, rank)])
        if not loading:
            with torch.no_grad():
                for u in self.flora_factors:
                    u.normal_(0.0, 1.0 / math.sqrt(2 * u.shape[1]))

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        d = w2.dtype
        full = tucker(self.flora_core.to(d), [u.to(d) for u in self.flora_factors])
        return self.scale * full.reshape(w2.shape)


def make_delta(base: nn.Module, kind: str, cfg: FloraTuckerConfig, name: str, loading: bool = False,
               shared=None) -> FloraTuckerDelta:
    return FloraTuckerDelta(base, kind, cfg, name, loading)


def expected_parameters(base: nn.Module, kind: str, cfg: FloraTuckerConfig, name: str) -> int:
    """``Π r_n + Σ I_n r_n``: the core and one factor per mode."""
    shape = mode_shape(base, kind)
    rank = ranks(shape, cfg)
    return math.prod(rank) + sum(size * r for size, r in zip(shape, rank))


FLORA_TUCKER = register(Method(
    name="flora_tucker", config_cls=FloraTuckerConfig, paper="FLoRA: Low-Rank Core Space for N-dimension",
    hook="weight", kinds=("linear", "conv", "conv1d_gpt2"), make_delta=make_delta,
    expected_parameters=expected_parameters, default_targets=DEFAULT_TARGETS,
    default_lr=1e-3,    # from the paper's recipe; not yet swept here
    variants=[{"r": 4, "kernel_r": 2}]))
