"""Rank-allocation methods (DyLoRA, IncreLoRA): their papers' parameter counts and default targets."""

from __future__ import annotations

from torch import nn

from expected_targets import _ATTENTION_QV, Target
from formulas import out_and_in


def dylora(model: nn.Module, cfg, targets: dict[str, Target]) -> int:
    """DyLoRA: LoRA's ``A`` (r x in) and ``B`` (out x r) at the maximum rank r; every rank below
    is a leading block of them, not more parameters."""
    return sum(cfg.r * sum(out_and_in(t.module)) for t in targets.values())


FORMULAS = {"dylora": dylora}
DEFAULT_ROLES = {"dylora": _ATTENTION_QV}
