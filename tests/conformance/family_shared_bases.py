"""Shared and random bases (nola, randlora, sharelora, mos): the papers' parameter counts, written
from the modules' shapes, and their default targets (query/value, as LoRA).

Adapter-level trained tensors (ShareLoRA's shared factors, MoS's pools) are counted once for the
whole adapter, from all the targets together.
"""

from __future__ import annotations

import math
import re

from expected_targets import _ATTENTION_QV
from formulas import out_and_in


def nola(model, cfg, targets) -> int:
    """NOLA: the ``k`` coefficients of A and the ``l`` of B per layer; the bases are frozen."""
    return sum(cfg.k + cfg.l for _ in targets.values())


def randlora(model, cfg, targets) -> int:
    """RandLoRA: ``n = ceil(d / r)`` bases, each with a diagonal Λ_i (r) and Γ_i (d) on the smaller
    side ``d`` of the layer; the random A and B_i are frozen."""
    total = 0
    for t in targets.values():
        d = min(out_and_in(t.module))
        total += math.ceil(d / cfg.r) * (cfg.r + d)
    return total


def _projection_type(name: str) -> str:
    """A layer's projection type: its name with the layer indices taken out."""
    return re.sub(r"\.\d+(?=\.|$)", "", name)


def sharelora(model, cfg, targets) -> int:
    """ShareLoRA: a shared factor counts once per projection type (and shape), the other once per
    layer: share="A": ``out r`` per layer plus ``r in`` per type; "B": the converse; "AB": both per type."""
    per_layer, per_type = 0, {}
    for name, t in targets.items():
        out, fan_in = out_and_in(t.module)
        for which, size, shape in (("A", cfg.r * fan_in, fan_in), ("B", out * cfg.r, out)):
            if which in cfg.share:
                per_type[(which, _projection_type(name), shape)] = size
            else:
                per_layer += size
    return per_layer + sum(per_type.values())


def mos(model, cfg, targets) -> int:
    """MoS: LoRA's budget at rank ``equivalent_r``, in shards: each layer has ``equivalent_r l``
    shards of length ``ceil(in / l)`` for A and of ``ceil(out / l)`` for B (``l`` the shards per
    vector), ``private_r l`` of each its own, the rest added to the public pools."""
    l = cfg.shards_per_vector
    return sum(cfg.equivalent_r * l * (math.ceil(fan_in / l) + math.ceil(out / l))
               for out, fan_in in (out_and_in(t.module) for t in targets.values()))


FORMULAS = {"nola": nola, "randlora": randlora, "sharelora": sharelora, "mos": mos}
DEFAULT_ROLES = {name: _ATTENTION_QV for name in FORMULAS}
