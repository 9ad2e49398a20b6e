"""MoS, from "MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards"
(Wang, Chen, Chen, Dong, Xue, Jiang, Kong and Wu, 2025).

Each layer's LoRA factors are assembled from *shards* retrieved from global trainable pools shared
by all the adapted layers::

    A_ℓ[i] = concat_t P_A[idx_A(ℓ, i, t)],    B_ℓ[:, i] = concat_t P_B[idx_B(ℓ, i, t)],
    ΔW_ℓ = (alpha / r) B_ℓ A_ℓ

with the paper's four differentiation strategies, as we read them: *vector sharding*, each of the
``r`` rank vectors is the concatenation of ``l = shards_per_vector`` shards (length
``ceil(dim / l)``, the concatenation cut to ``dim``); *subset selection*, each layer retrieves
its own subset of the pool through a fixed index matrix (the MoE-like router); *pair
dissociation*, ``A`` and ``B`` draw from separate pools with independent indices; *shard
privatisation*, the first ``private_r`` rank vectors of every layer are its own shards, which no
other layer reads. The budget is LoRA's at rank ``equivalent_r``: every layer adds
``(equivalent_r - private_r) l`` shards to the public pool of its shard length, for ``A`` and for
``B``, and keeps ``private_r l`` private ones. A layer's ``(r - private_r) l`` public slots take
the public shards in seeded random orders (a fresh permutation once the pool is used up), so no
shard repeats within a layer while the pool is large enough. The paper's optional random scaling
of the rank vectors is left out.

Trained: the public pools (the adapter-level module, one tensor per factor and shard length:
listed once, saved once under ``shared.``) and each layer's private shards (its own parameters);
frozen: nothing but the model. The index matrices are regenerated from ``seed`` and the layer
names (non-persistent buffers). Initialisation is LoRA's: ``A``'s shards Kaiming-uniform
(``|.| <= 1/sqrt(l ceil(fan_in / l))``), ``B``'s zero, so the model is unchanged at
initialisation. Parameter count: ``equivalent_r l (ceil(fan_in / l) + ceil(out / l))`` per layer,
of which ``private_r l (...)`` are the layer's own and the rest rows of the pools.
"""

from __future__ import annotations

import hashlib
import math
from typing import NamedTuple

import torch
from torch import nn

from ...core.config import BaseConfig, check, check_number, method_config
from ...core.errors import DeltatuneError
from ...core.layers import layer_kind, out_in
from ...core.matching import match_modules, resolve_targets, unwrap
from ...core.registry import Method, get_method, register
from ...core.weights import WeightDelta, weight_dtype
from .lora import DEFAULT_TARGETS


@method_config
class MosConfig(BaseConfig):
    """MoS. ``r`` each layer's rank, ``alpha`` scale numerator (``alpha / r``), ``equivalent_r``
    the parameter budget as a LoRA rank, ``private_r`` rank vectors per layer made of private
    shards, ``shards_per_vector`` shards per rank vector, ``seed`` the seed of the index matrices.
    The defaults (a quarter of LoRA-8's parameters at rank 8) are ours: the paper's full settings
    were not at hand, only its abstract and the authors' README."""

    r: int = 8
    alpha: float = 16.0
    equivalent_r: int = 2
    private_r: int = 1
    shards_per_vector: int = 2
    seed: int = 0

    def validate(self) -> None:
        check_number("r", self.r, kind=int, low=1, high=1 << 16)
        check_number("alpha", self.alpha, low=0, low_open=True)
        check_number("equivalent_r", self.equivalent_r, kind=int, low=1, high=1 << 16)
        check_number("private_r", self.private_r, kind=int, low=0, high=self.r)
        check(self.private_r < self.equivalent_r,
              f"private_r={self.private_r} must be below equivalent_r={self.equivalent_r}: the public pools hold "
              f"the (equivalent_r - private_r) rank vectors each layer adds; lower private_r or raise equivalent_r")
        check_number("shards_per_vector", self.shards_per_vector, kind=int, low=1, high=1 << 16)
        check_number("seed", self.seed, kind=int, low=0, high=2 ** 63 - 1)


class Shards(NamedTuple):
    """A pool's identity: the factor it builds ("A" or "B") and its shard length."""
    which: str
    length: int

    @classmethod
    def of(cls, which: str, dim: int, l: int) -> "Shards":
        return cls(which, math.ceil(dim / l))

    @property
    def name(self) -> str:
        return f"pool_{self.which}_{self.length}"

    def initial(self, rows: int, l: int, like: dict) -> torch.Tensor:
        """LoRA's initialisation, shard by shard: A Kaiming-uniform over the assembled fan_in, B zero."""
        t = torch.zeros(rows, self.length, **like)
        if self.which == "A":
            bound = 1 / math.sqrt(self.length * l)
            nn.init.uniform_(t, -bound, bound)
        return t


class Route(NamedTuple):
    """Where one factor of one layer reads its public shards: the pool, and ``(r - private_r, l)``
    row indices in it."""
    pool: Shards
    index: torch.Tensor


def _generator(seed: int, *parts: str) -> torch.Generator:
    digest = hashlib.sha256(":".join(("deltatune-mos", str(seed), *parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class MosPools(nn.Module):
    """The adapter-level module: one trained public pool per (factor, shard length), sized from
    every target at once, and each layer's index matrices into it."""

    def __init__(self, cfg: MosConfig, layers: list[tuple[str, int, int]], like: dict):
        super().__init__()
        l = cfg.shards_per_vector
        factors = {name: {"A": Shards.of("A", fan_in, l), "B": Shards.of("B", out, l)} for name, out, fan_in in layers}
        sizes: dict[Shards, int] = {}
        for pools in factors.values():
            for pool in pools.values():
                sizes[pool] = sizes.get(pool, 0) + (cfg.equivalent_r - cfg.private_r) * l
        for pool, rows in sizes.items():
            self.register_parameter(pool.name, nn.Parameter(pool.initial(rows, l, like)))
        need = (cfg.r - cfg.private_r) * l
        self.routes: dict[str, dict[str, Route]] = {}
        for name, pools in factors.items():
            self.routes[name] = {}
            for which, pool in pools.items():
                g = _generator(cfg.seed, which, name)
                # a fresh permutation once the pool is used up: no repeat while the pool suffices
                drawn = [torch.randperm(sizes[pool], generator=g) for _ in range(-(-need // sizes[pool]))]
                index = torch.cat(drawn + [torch.zeros(0, dtype=torch.long)])[:need]
                self.routes[name][which] = Route(pool, index.view(cfg.r - cfg.private_r, l))

    def route(self, name: str, which: str) -> Route:
        if name not in self.routes:
            raise DeltatuneError(f"mos sized its shard pools for the layers its targets match, and {name} is not one "
                                 f"of them ({', '.join(list(self.routes)[:5])} ...); attach with targets that "
                                 f"name it")
        return self.routes[name][which]


def shared_state(model: nn.Module, cfg: MosConfig) -> MosPools:
    method = get_method("mos")
    layers, like = [], None
    for e in match_modules(model, cfg, resolve_targets(model, method, cfg)):
        base = unwrap(e.module)
        kind = layer_kind(base)
        if kind in method.kinds:    # plan refuses the others by name
            layers.append((e.name, *out_in(base, kind)))
            like = like or weight_dtype(base)
    return MosPools(cfg, layers, like or {})


class MosDelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, cfg: MosConfig, name: str, pools: MosPools):
        super().__init__()
        self.kind = kind
        self.bind(base)
        self.out, self.fan_in = out_in(base, kind)
        self.r, self.scale = cfg.r, cfg.alpha / cfg.r
        like = weight_dtype(base)
        # a plain reference, not a submodule: the pools belong to the adapter, listed once
        self.__dict__["pools"] = pools
        route_A, route_B = pools.route(name, "A"), pools.route(name, "B")
        self.pool_A, self.pool_B = route_A.pool.name, route_B.pool.name
        self.register_buffer("index_A", route_A.index.to(like["device"]), persistent=False)
        self.register_buffer("index_B", route_B.index.to(like["device"]), persistent=False)
        l, own = cfg.shards_per_vector, cfg.private_r * cfg.shards_per_vector
        for which, route in (("A", route_A), ("B", route_B)):
            private = nn.Parameter(route.pool.initial(own, l, like)) if own else None
            self.register_parameter(f"mos_private_{which}", private)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)``, ``(r, fan_in)`` and ``(out, r)``: the private rank vectors, then the shards
        gathered from the pools, each row of ``l`` shards cut to the layer's width."""
        A, B = (torch.cat([t for t in (private, self.pools.get_parameter(pool)[index].flatten(0, 1))
                           if t is not None])
                for private, pool, index in ((self.mos_private_A, self.pool_A, self.index_A),
                                             (self.mos_private_B, self.pool_B, self.index_B)))
        return A.reshape(self.r, -1)[:, :self.fan_in], B.reshape(self.r, -1)[:, :self.out].t()

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        A, B = self.factors()
        return self.scale * (B.to(w2.dtype) @ A.to(w2.dtype))


def make_delta(base: nn.Module, kind: str, cfg: MosConfig, name: str, loading: bool = False,
               shared: MosPools | None = None) -> MosDelta:
    return MosDelta(base, kind, cfg, name, shared)


def expected_parameters(base: nn.Module, kind: str, cfg: MosConfig, name: str) -> int:
    """The layer's own, private shards: ``private_r l (ceil(fan_in / l) + ceil(out / l))`` (its
    ``(equivalent_r - private_r) l`` public shards per factor are rows of the adapter-level pools)."""
    out, fan_in = out_in(base, kind)
    l = cfg.shards_per_vector
    return cfg.private_r * l * (math.ceil(fan_in / l) + math.ceil(out / l))


MOS = register(Method(
    name="mos",
    config_cls=MosConfig,
    paper="MoS: Unleashing Parameter Efficiency of Low-Rank Adaptation with Mixture of Shards",
    hook="weight",
    kinds=("linear", "conv", "conv1d_gpt2"),
    make_delta=make_delta,
    expected_parameters=expected_parameters,
    default_targets=DEFAULT_TARGETS,
    shared_state=shared_state,
    variants=[{"private_r": 0, "shards_per_vector": 1}],
    default_lr=3e-3,    # from the paper's recipe as far as we know it (LoRA's rate here); not yet swept here
))
