"""The spectral family's statements for the conformance suite: each paper's trainable-parameter
count, written from the layers' shapes (formulas.out_and_in), and its default targets (the
query and value projections, as LoRA's)."""

from __future__ import annotations

from expected_targets import _ATTENTION_QV
from formulas import out_and_in


def _components(t, r) -> int:
    """The rank a layer uses: ``r``, or all ``min(out, in)`` singular components for ``r=None``."""
    return min(out_and_in(t.module)) if r is None else r


def loldu(model, cfg, targets) -> int:
    """LoLDU: the diagonal ``D`` of the ``r`` LDU components and one scalar scale per layer."""
    return sum(_components(t, cfg.r) + 1 for t in targets.values())


def svft(model, cfg, targets) -> int:
    """SVFT: the free entries of the ``k x k`` coefficient matrix ``M`` (``k = min(out, in)``): the
    diagonal (plain), the entries at most ``off_diag`` from it (banded, 2 by default), or
    ``per_row`` entries in each row (random, 5 by default)."""
    total = 0
    for t in targets.values():
        k = min(out_and_in(t.module))
        if cfg.pattern == "plain":
            total += k
        elif cfg.pattern == "banded":
            d = 2 if cfg.off_diag is None else cfg.off_diag
            total += sum(1 for i in range(k) for j in range(k) if abs(i - j) <= d)
        else:
            total += k * (5 if cfg.per_row is None else cfg.per_row)
    return total


def svfit(model, cfg, targets) -> int:
    """SVFit: the top ``r`` singular values (all of them for ``r=None``)."""
    return sum(_components(t, cfg.r) for t in targets.values())


def sorsa(model, cfg, targets) -> int:
    """SORSA: ``U_p (out x r)``, ``S_p (r)``, ``V_p (in x r)``."""
    return sum(cfg.r * (out + fan_in + 1) for out, fan_in in (out_and_in(t.module) for t in targets.values()))


def lamda(model, cfg, targets) -> int:
    """LaMDA at attach: the ``r x r`` core ``S`` and ``B (out x r)``, which is trainable until the
    schedule freezes it (``A`` is frozen throughout)."""
    return sum(cfg.r * cfg.r + out_and_in(t.module)[0] * cfg.r for t in targets.values())


FORMULAS = {"loldu": loldu, "svft": svft, "svfit": svfit, "sorsa": sorsa, "lamda": lamda}
DEFAULT_ROLES = {name: _ATTENTION_QV for name in FORMULAS}
