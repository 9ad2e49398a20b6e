"""Conformance statements for the orthogonal and multiplicative methods (oft, boft, hra, ssf):
the papers' parameter counts from the layers' shapes, the roles of their default targets, and the
cases refused by design."""

from __future__ import annotations

from torch import nn

from expected_targets import _ATTENTION_QV
from formulas import out_and_in


def _skew(b: int) -> int:
    """A b x b skew-symmetric matrix is trained as its strict upper triangle."""
    return b * (b - 1) // 2


def _blocks(d: int, size: int) -> tuple[int, int, int]:
    """(block size, full blocks, features left for one smaller last block): blocks of ``size``
    across ``d`` input features; a layer narrower than a block is one block."""
    size = min(size, d)
    return size, d // size, d % size


def oft(model: nn.Module, cfg, targets) -> int:
    """OFT: one Cayley block Q_i (b(b-1)/2 entries) per block of the input features; ``r`` blocks of
    ``d / r``, or blocks of ``block_size`` with a smaller last one; one shared block with block_share."""
    total = 0
    for t in targets.values():
        d = out_and_in(t.module)[1]
        b, count, rest = (d // cfg.r, cfg.r, 0) if cfg.r else _blocks(d, cfg.block_size)
        total += (1 if cfg.block_share else count) * _skew(b) + _skew(rest)
    return total


def boft(model: nn.Module, cfg, targets) -> int:
    """BOFT: m butterfly factors, each d/b Cayley blocks of b(b-1)/2 entries (m = 1: OFT's blocks)."""
    total = 0
    for t in targets.values():
        d = out_and_in(t.module)[1]
        if cfg.boft_block_num:
            b, count, rest = d // cfg.boft_block_num, cfg.boft_block_num, 0
        else:
            b, count, rest = _blocks(d, cfg.boft_block_size)
        total += cfg.boft_n_butterfly_factor * count * _skew(b) + _skew(rest)
    return total


def hra(model: nn.Module, cfg, targets) -> int:
    """HRA: r reflection vectors of the input width."""
    return sum(cfg.r * out_and_in(t.module)[1] for t in targets.values())


def ssf(model: nn.Module, cfg, targets) -> int:
    """SSF: a scale and a shift per output channel (per normalised feature for a LayerNorm)."""
    return sum(2 * (t.module.weight.numel() if isinstance(t.module, nn.LayerNorm) else out_and_in(t.module)[0])
               for t in targets.values())


FORMULAS = {"oft": oft, "boft": boft, "hra": hra, "ssf": ssf}

_SSF = ["query", "key", "value", "attention_out", "ffn_out"]
DEFAULT_ROLES = {
    "oft": _ATTENTION_QV, "boft": _ATTENTION_QV, "hra": _ATTENTION_QV,
    "ssf": {"bert": _SSF, "llama": _SSF, "vit": _SSF, "ast": _SSF, "gpt2": ["qkv", "attention_out", "ffn_out"]},
}

_ODD = ("the CNN's conv1 has 27 input features (3 channels x 3 x 3), which {what}; attach refuses it by name "
        "(tests/test_orthogonal.py)")
NOT_APPLICABLE = {
    ("oft", "r=2", "cnn"): _ODD.format(what="2 blocks cannot split"),
    ("oft", "block_share=True", "cnn"): _ODD.format(what="shared blocks of 8 cannot tile"),
    ("boft", "boft_n_butterfly_factor=2", "cnn"): _ODD.format(what="butterfly pairs of blocks cannot split"),
}
