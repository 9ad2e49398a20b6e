"""Rank-allocation methods (DyLoRA, IncreLoRA): their papers' parameter counts and default targets."""

from __future__ import annotations

from torch import nn

from expected_targets import _ATTENTION_QV, Target
from formulas import out_and_in


def dylora(model: nn.Module, cfg, targets: dict[str, Target]) -> int:
    """DyLoRA: LoRA's ``A`` (r x in) and ``B`` (out x r) at the maximum rank r; every rank below
    is a leading block of them, not more parameters."""
    return sum(cfg.r * sum(out_and_in(t.module)) for t in targets.values())


def increlora(model: nn.Module, cfg, targets: dict[str, Target]) -> int:
    """IncreLoRA: P (out x max_r), λ (max_r) and Q (max_r x in), allocated at the most components
    a layer may grow to (``max_r``, 4 x target_rank unless set); the mask says which are active."""
    max_r = cfg.max_r if cfg.max_r is not None else 4 * cfg.target_rank
    return sum(max_r * (sum(out_and_in(t.module)) + 1) for t in targets.values())


FORMULAS = {"dylora": dylora, "increlora": increlora}
# DyLoRA adapts LoRA's query and value; IncreLoRA defaults to them too, as adalora here (its paper
# adapts every projection of a block: pass targets for that)
DEFAULT_ROLES = {"dylora": _ATTENTION_QV, "increlora": _ATTENTION_QV}
