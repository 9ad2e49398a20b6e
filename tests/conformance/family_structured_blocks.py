"""Conformance statements of the block-structured methods (miss, hira, gralora, lily): each paper's
parameter count written from the targeted modules' shapes, their default targets, and the refused cases."""

from __future__ import annotations

from expected_targets import _ATTENTION_QV, Target
from formulas import out_and_in


def miss(model, cfg, targets: dict[str, Target]) -> int:
    """MiSS: one shard D (out x r) per layer; "mini": D is mini_r x r; Bone's "bat": out/r blocks of r x r."""
    total = 0
    for t in targets.values():
        out, _ = out_and_in(t.module)
        total += cfg.r * cfg.mini_r if cfg.mode == "mini" else (out // cfg.r) * cfg.r * cfg.r if cfg.mode == "bat" \
            else out * cfg.r
    return total


def hira(model, cfg, targets: dict[str, Target]) -> int:
    """HiRA: A (r x in) and B (out x r), LoRA's shapes; the frozen weight modulates their product."""
    return sum(cfg.r * (out_and_in(t.module)[0] + out_and_in(t.module)[1]) for t in targets.values())


def gralora(model, cfg, targets: dict[str, Target]) -> int:
    """GraLoRA: k x k blocks, block (i, j) a pair of rank r/k: (r/k)(in/k + out/k) each, summed over the k^2
    blocks r (in + out); the hybrid LoRA pair adds hybrid_r (in + out)."""
    total = 0
    for t in targets.values():
        out, fan_in = out_and_in(t.module)
        per_block = cfg.r // cfg.k * (fan_in / cfg.k + out / cfg.k)
        total += round(cfg.k * cfg.k * per_block) + cfg.hybrid_r * (fan_in + out)
    return total


def lily(model, cfg, targets: dict[str, Target]) -> int:
    """Lily: a router (n x r) per layer; per role (the same module in every block, same shape) n HP experts
    (out x r) once, and one LP (r x in) per run of stride_A consecutive layers."""
    routers = len(targets) * cfg.num_experts * cfg.r
    roles: dict[tuple, set[int]] = {}
    shapes: dict[tuple, tuple[int, int]] = {}
    for name, t in targets.items():
        parts = name.split(".")
        layer = next((int(p) for p in parts if p.isdigit()), 0)
        role = (tuple(p for p in parts if not p.isdigit()), out_and_in(t.module))
        roles.setdefault(role, set()).add(layer // cfg.stride_A)
        shapes[role] = out_and_in(t.module)
    shared = sum(cfg.num_experts * shapes[role][0] * cfg.r + len(groups) * cfg.r * shapes[role][1]
                 for role, groups in roles.items())
    return routers + shared


FORMULAS = {"miss": miss, "hira": hira, "gralora": gralora, "lily": lily}
DEFAULT_ROLES = {name: _ATTENTION_QV for name in FORMULAS}      # each paper adapts query and value
NOT_APPLICABLE = {
    ("miss", "mode=bat", "cnn"): "Bone's block-affine mode cuts the weight into r x r blocks; the CNN's first "
                                 "convolution has 27 inputs (3 x 3 x 3), divisible by no block size above 1, so "
                                 "attach refuses it by name (tests/test_structured_blocks.py)",
}
