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


FORMULAS = {"nola": nola}
DEFAULT_ROLES = {"nola": _ATTENTION_QV}
