"""Conformance statements for LoRA's data- and weight-driven initialisations as methods of their
own: CorDA, OLoRA (both train LoRA's A and B) and LoRA-SB (trains only the r x r core R)."""

from __future__ import annotations

from expected_targets import _ATTENTION_QV
from formulas import out_and_in


def lora_factors(model, cfg, targets) -> int:
    """CorDA and OLoRA: LoRA's factors, ``r (in + out)`` per layer (A is r x in, B is out x r); the
    frozen start factors B0, A0 are buffers, not trained."""
    return sum(cfg.r * sum(out_and_in(t.module)) for t in targets.values())


def lora_sb(model, cfg, targets) -> int:
    """LoRA-SB: only the square core R between the frozen B and A, ``r^2`` per layer."""
    return sum(cfg.r * cfg.r for _ in targets.values())


FORMULAS = {"corda": lora_factors, "olora": lora_factors, "lora_sb": lora_sb}
DEFAULT_ROLES = {"corda": _ATTENTION_QV, "olora": _ATTENTION_QV, "lora_sb": _ATTENTION_QV}
# the stacking suite perturbs trained tensors without calibrating: uncalibrated LoRA-SB has B = A = 0,
# so two of them on one layer would change nothing; its seeded init has B, A from the start
STACK_OPTIONS = {"lora_sb": {"init": "random"}}
