"""Conformance statements for the quantisation-aware deltas: LoftQ (LoRA's factors, its quantised
weight a regenerated buffer) and L4Q (LoRA's factors and one learned step per output row)."""

from __future__ import annotations

from expected_targets import _ATTENTION_QV
from formulas import out_and_in


def loftq(model, cfg, targets) -> int:
    """``r (in + out)`` per layer; ``Q_T - W`` is a buffer, not trained."""
    return sum(cfg.r * sum(out_and_in(t.module)) for t in targets.values())


def l4q(model, cfg, targets) -> int:
    """``r (in + out)`` for A and B, plus one LSQ step per output row."""
    return sum(cfg.r * sum(out_and_in(t.module)) + out_and_in(t.module)[0] for t in targets.values())


FORMULAS = {"loftq": loftq, "l4q": l4q}
DEFAULT_ROLES = {"loftq": _ATTENTION_QV, "l4q": _ATTENTION_QV}
_NF4 = ("LoftQ quantises the float weight jointly with its factors; on a dt.quantize base that weight is gone "
        "(quant(W) again has no error to correct), so attach refuses it by name (tests/test_quant_deltas.py)")
NOT_APPLICABLE = {("loftq", "defaults", "llama_nf4"): _NF4, ("loftq", "iters=2", "llama_nf4"): _NF4}
