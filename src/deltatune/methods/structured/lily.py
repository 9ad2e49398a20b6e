"""Lily, from "Low-Rank Interconnected Adaptation across Layers" (Zhong, Zhao and Zhou, 2025).

LoRA's per-layer pairs are taken apart: each layer ``l`` keeps a low-dimensional projector
``LP_l = A_l (r, fan_in)``, and every layer of the same role (all query projections, say) draws on one
set of ``n`` high-dimensional projector experts ``HP_1..HP_n (out, r)`` shared across the depth of the
model, mixed by the layer's own router ``R_l (n, r)``::

    h = A_l x,    p = softmax(R_l h),    w = mean of p over every token of the batch,
    y = W x + s Σ_i w_i HP_i h

as the authors' code and PEFT's (the routing weights are the batch's average expert distribution).
The router reads the data, so ``ΔW = s Σ_i w_i HP_i A_l`` changes with every batch: Lily cannot be folded
into the weights (``foldable=False``), and since ``w`` averages over the whole batch a sample's output
depends on the other samples, so mixed-adapter batches are refused (``per_sample_safe=False``).

``stride_A`` consecutive layers share one ``A`` (the paper's locally shared LPs): layer ``l`` uses the
``A`` of its role's group ``l // stride_A``, ``l`` the module's layer index (its first integer name
component). Trained: the ``A``s, the ``HP``s and the routers; ``A`` and ``R`` start Kaiming-uniform
(bound ``1 / sqrt(fan_in)`` and ``1 / sqrt(r)``), the ``HP``s at zero, so the model is unchanged at
initialisation. Per layer ``n r`` (the router); per role ``n out r`` (the experts, once) and ``r fan_in`` per
LP group. The ``A``s and ``HP``s are adapter-level state (``LilyProjectors``), saved once under ``shared.``.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import BaseConfig, check_number, method_config
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import weight_dtype
from ...core.wrapper import Delta
from ..lowrank.lora import DEFAULT_TARGETS


@method_config
class LilyConfig(BaseConfig):
    """Lily. ``r`` the rank, ``num_experts`` the shared HP experts per role (``n``), ``stride_A`` the
    consecutive layers sharing one LP, ``scaling`` the factor ``s`` on the update."""

    r: int = 32
    num_experts: int = 2
    stride_A: int = 1
    scaling: float = 1.0

    def validate(self) -> None:
        check_number("r", self.r, kind=int, low=1)
        check_number("num_experts", self.num_experts, kind=int, low=2)     # one expert leaves the router nothing to learn
        check_number("stride_A", self.stride_A, kind=int, low=1)
        check_number("scaling", self.scaling)


class Placement(NamedTuple):
    role: str       # the module's name without layer indices, as a key: the same module in every block
    layer: int      # its layer index, the first integer name component (0 if none)


class ProjectorKeys(NamedTuple):
    lp: str
    hp: str


def placement(name: str) -> Placement:
    parts = name.split(".")
    return Placement(re.sub(r"\W", "_", "_".join(p for p in parts if not p.isdigit())),
                     next((int(p) for p in parts if p.isdigit()), 0))


class LilyProjectors(nn.Module):
    """The adapter-level module: the LPs (``lp.<role>__<shape>__<group>``) and the HP experts
    (``hp.<role>__<shape>``), each made when the first layer that uses it is attached."""

    def __init__(self, cfg: LilyConfig):
        super().__init__()
        self.r, self.n, self.stride = cfg.r, cfg.num_experts, cfg.stride_A
        self.lp = nn.ParameterDict()
        self.hp = nn.ParameterDict()

    def keys_for(self, name: str, out: int, fan_in: int, like: dict) -> ProjectorKeys:
        where = placement(name)
        hp_key = f"{where.role}__{out}x{fan_in}"
        lp_key = f"{hp_key}__{where.layer // self.stride}"
        if hp_key not in self.hp:
            self.hp[hp_key] = nn.Parameter(torch.zeros(self.n, out, self.r, **like))
        if lp_key not in self.lp:
            A = torch.empty(self.r, fan_in, **like)
            self.lp[lp_key] = nn.Parameter(nn.init.kaiming_uniform_(A, a=math.sqrt(5)))
        return ProjectorKeys(lp_key, hp_key)


class LilyDelta(Delta):
    def __init__(self, base: nn.Module, kind: str, cfg: LilyConfig, name: str, shared: LilyProjectors):
        super().__init__()
        self.kind, self.scaling = kind, cfg.scaling
        out, fan_in = out_in(base, kind)
        like = weight_dtype(base)
        # a plain reference, not a submodule: the projectors belong to the adapter, listed once
        self.__dict__["projectors"] = shared
        self.projector_keys = shared.keys_for(name, out, fan_in, like)
        router = torch.empty(cfg.num_experts, cfg.r, **like)
        self.lily_router = nn.Parameter(nn.init.kaiming_uniform_(router, a=math.sqrt(5)))

    @property
    def lily_A(self) -> torch.Tensor:
        return self.projectors.lp[self.projector_keys.lp]

    @property
    def lily_HP(self) -> torch.Tensor:
        return self.projectors.hp[self.projector_keys.hp]

    def routing(self, h: torch.Tensor) -> torch.Tensor:
        """The expert weights ``w (n,)``: the batch's mean routing distribution."""
        return F.softmax(F.linear(h, self.lily_router), dim=-1).reshape(-1, self.lily_router.shape[0]).mean(0)

    def forward(self, x, y, base):
        h = F.linear(x, self.lily_A)
        hp = torch.einsum("e,eor->or", self.routing(h), self.lily_HP)
        return y + self.scaling * F.linear(h, hp)


def make_delta(base: nn.Module, kind: str, cfg: LilyConfig, name: str, loading: bool = False,
               shared: LilyProjectors | None = None) -> LilyDelta:
    return LilyDelta(base, kind, cfg, name, shared)


def expected_parameters(base: nn.Module, kind: str, cfg: LilyConfig, name: str) -> int:
    """The layer's own router, ``n r``; the shared LPs and HPs are counted once per adapter, not per layer."""
    return cfg.num_experts * cfg.r


LILY = register(Method(
    name="lily", config_cls=LilyConfig, paper="Low-Rank Interconnected Adaptation across Layers",
    hook="weight", kinds=("linear", "conv1d_gpt2"), make_delta=make_delta,
    expected_parameters=expected_parameters, default_targets=DEFAULT_TARGETS,
    shared_state=lambda model, cfg: LilyProjectors(cfg),
    # the routing weights depend on the batch: no fixed ΔW to fold, and no per-sample mixing
    foldable=False, per_sample_safe=False,
    default_lr=5e-3,    # from the paper's recipe; not yet swept here
    variants=[{"stride_A": 2, "num_experts": 3}]))
