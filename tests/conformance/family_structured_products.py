"""Conformance statements for the structured products: LoKr (Kronecker), LoHa (Hadamard), FLoRA
(Tucker) and FourierFT (sparse spectrum). Each count is its paper's, written here from the modules'
own attributes (out/in features, channels, kernel sizes), never from the methods' code."""

from __future__ import annotations

import math

from torch import nn

from expected_targets import _ATTENTION_QV, Target
from formulas import out_and_in


def _split(dim: int, factor: int) -> tuple[int, int]:
    """LyCORIS's split of a dimension into ``small x large``: ``factor`` itself where it divides,
    else the divisor pair closest to balanced whose first member is at most ``factor``."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    pairs = [(a, dim // a) for a in range(1, dim + 1) if dim % a == 0 and a <= dim // a
             and (factor == -1 or a <= factor)]
    return min(pairs, key=lambda p: p[1] - p[0])


def _channels_and_kernel(module: nn.Module) -> tuple[int, int, int]:
    """(out, input channels the split runs over, kernel elements a factor's columns carry)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.out_channels, module.in_channels // module.groups, math.prod(module.kernel_size)
    out, fan_in = out_and_in(module)
    return out, fan_in, 1


def lokr(model: nn.Module, cfg, targets: dict[str, Target]) -> int:
    """KronA / LoKr: ``C (out1 x in1) ⊗ M (out2 x in2·k)``; ``M`` low-rank (``r (out2 + in2·k)``)
    when ``r < max(out2, in2) / 2``, ``C`` low-rank (``r (out1 + in1)``) only with decompose_both
    when ``r < max(out1, in1) / 2``; otherwise each is a full matrix."""
    total = 0
    for t in targets.values():
        out, channels, kernel = _channels_and_kernel(t.module)
        (o1, o2), (i1, i2) = _split(out, cfg.factor), _split(channels, cfg.factor)
        c_low = cfg.decompose_both and cfg.r < max(o1, i1) / 2
        m_low = cfg.r < max(o2, i2) / 2
        total += cfg.r * (o1 + i1) if c_low else o1 * i1
        total += cfg.r * (o2 + i2 * kernel) if m_low else o2 * i2 * kernel
    return total


def loha(model: nn.Module, cfg, targets: dict[str, Target]) -> int:
    """FedPara / LoHa: two rank-r pairs, ``2 r (out + in)`` per layer."""
    return sum(2 * cfg.r * sum(out_and_in(t.module)) for t in targets.values())


def flora_tucker(model: nn.Module, cfg, targets: dict[str, Target]) -> int:
    """FLoRA: a core of the mode ranks and a factor ``I_n x r_n`` per mode; a conv kernel has four
    modes (out, in / groups, k1, k2) ranked (r, r, kernel_r, kernel_r), a matrix two ranked (r, r),
    each rank at most its mode's size."""
    total = 0
    for t in targets.values():
        m = t.module
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            modes = [m.out_channels, m.in_channels // m.groups, *m.kernel_size]
            wanted = [cfg.r, cfg.r] + [cfg.kernel_r or k for k in m.kernel_size]
        else:
            modes, wanted = list(out_and_in(m)), [cfg.r, cfg.r]
        rank = [min(w, size) for w, size in zip(wanted, modes)]
        total += math.prod(rank) + sum(size * r for size, r in zip(modes, rank))
    return total


def fourierft(model: nn.Module, cfg, targets: dict[str, Target]) -> int:
    """FourierFT: ``n`` spectral coefficients per layer."""
    return cfg.n_frequency * len(targets)


FORMULAS = {"lokr": lokr, "loha": loha, "flora_tucker": flora_tucker, "fourierft": fourierft}
DEFAULT_ROLES = {name: _ATTENTION_QV for name in FORMULAS}
# the stacking suite's host layers are 16 x 24: 384 spectral entries, fewer than the default 1000
STACK_OPTIONS = {"fourierft": {"n_frequency": 64}}
