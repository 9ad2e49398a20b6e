"""BOFT, from "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization" (Liu, Qiu et
al., ICLR 2024).

OFT's orthogonal matrix (oft.py: ``W2' = W2 R`` on the input side, ``ΔW = W2 (R - I)``) becomes a
product of ``m`` sparse orthogonal butterfly factors::

    R = B_0 B_1 ... B_{m-1},        B_k = P_k D_k P_kᵀ

Each ``D_k`` is block-diagonal with ``d / b`` Cayley blocks ``(I + Q)(I - Q)^-1`` of size ``b``
(``d = fan_in``), and ``P_k`` a permutation: factor 0 mixes contiguous blocks of ``b`` features;
factor ``k > 0`` works on groups of ``b 2^k`` features, each block taking the same run of ``b / 2``
features from the group's two halves, so it mixes features ``b 2^(k-1)`` apart (the Cooley-Tukey
butterfly with ``b x b`` blocks in place of ``2 x 2`` ones). ``m = 1 + log2(d / b)`` factors make
``R`` dense with ``O(d log d)`` parameters; ``m = 1`` is OFT with blocks of ``b``. The product is
orthogonal for any ``Q``. The permutations are reshapes (``_rotation.butterfly_gather``), nothing is
stored but the ``Q``.

Trained: the strict upper triangles of every block's skew-symmetric ``Q`` (``boft_Q``, ``(m, d/b,
b(b-1)/2)``), zero at initialisation, so ``R = I`` and the model is unchanged at init; frozen: the
layer. ``boft_block_size`` ``b`` or ``boft_block_num`` blocks (one of the two, as PEFT's
BOFTConfig), ``boft_n_butterfly_factor`` ``m``. With ``m > 1``, ``b`` must be even and ``b 2^(m-1)``
must divide ``d`` (checked at attach, by layer); with ``m = 1`` a ``b`` that does not divide ``d``
leaves one last, smaller block as in OFT. PEFT's extra per-output scale ``boft_s`` is not part of
the paper's orthogonal update and is left out.

Parameters per layer: ``m (d / b) b(b-1)/2`` (``m = 1``: OFT's count, last block included).
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.config import BaseConfig, check, check_number, method_config
from ...core.errors import DeltatuneError
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import WeightDelta, weight_dtype
from ..lowrank.lora import DEFAULT_TARGETS
from ._rotation import (Blocks, butterfly_gather, butterfly_scatter, cayley_minus_identity, check_conv, compute_dtype,
                        divisors, n_skew, times_blocks)


@method_config
class BOFTConfig(BaseConfig):
    """BOFT. ``boft_block_size``: features per block, or ``boft_block_num``: blocks per factor (give
    one, the other 0); ``boft_n_butterfly_factor``: the number of butterfly factors ``m``."""

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1

    def validate(self) -> None:
        check_number("boft_block_size", self.boft_block_size, kind=int, low=0)
        check_number("boft_block_num", self.boft_block_num, kind=int, low=0)
        check((self.boft_block_size == 0) != (self.boft_block_num == 0),
              f"give either boft_block_size or boft_block_num, the other 0: got boft_block_size="
              f"{self.boft_block_size}, boft_block_num={self.boft_block_num}; e.g. dt.config('boft', "
              f"boft_block_num=8, boft_block_size=0)")
        check_number("boft_n_butterfly_factor", self.boft_n_butterfly_factor, kind=int, low=1, high=32)
        check(self.boft_n_butterfly_factor == 1 or self.boft_block_size % 2 == 0,
              f"boft_block_size={self.boft_block_size} must be even with boft_n_butterfly_factor > 1 (each "
              f"butterfly block joins two halves of b/2 features)")


def layout(base: nn.Module, kind: str, cfg: BOFTConfig, name: str) -> Blocks:
    """The blocks of every factor; a layer whose width the butterfly cannot split fails by name."""
    _, d = out_in(base, kind)
    m = cfg.boft_n_butterfly_factor
    if cfg.boft_block_num:
        if d % cfg.boft_block_num:
            raise DeltatuneError(f"boft on {name}: boft_block_num={cfg.boft_block_num} does not divide its {d} input "
                                 f"features; use one of {', '.join(map(str, divisors(d)[:8]))}")
        b = d // cfg.boft_block_num
    else:
        b = cfg.boft_block_size
    if m == 1:
        return Blocks.of(d, b)
    span = b * 2 ** (m - 1)
    if b % 2 or d % span:
        valid = [k for k in range(2, d + 1, 2) if d % (k * 2 ** (m - 1)) == 0]
        fix = (f"use boft_block_size among {', '.join(map(str, valid[:6]))}" if valid
               else f"use fewer butterfly factors ({d} is not a multiple of 2^{m})")
        raise DeltatuneError(f"boft on {name}: {m} butterfly factors of blocks of {b} need an even block size whose "
                             f"{span}-feature span divides its {d} input features; {fix}")
    return Blocks(b, d // b)


class BOFTDelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, cfg: BOFTConfig, name: str):
        super().__init__()
        check_conv(base, kind, "boft", name)
        self.kind = kind
        self.bind(base)
        self.blocks = layout(base, kind, cfg, name)
        like = weight_dtype(base)
        m, b = cfg.boft_n_butterfly_factor, self.blocks
        self.boft_Q = nn.Parameter(torch.zeros(m, b.count, n_skew(b.size), **like))
        rest = n_skew(b.rest)       # only with m = 1 (layout)
        self.boft_Q_rest = nn.Parameter(torch.zeros(rest, **like)) if rest else None

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        """``W2 (B_0 ... B_{m-1} - I)``, accumulated as ``Δ += (W2 + Δ)(B_k - I)`` factor by factor."""
        dtype, b = compute_dtype(w2), self.blocks
        w = w2.to(dtype)
        full = cayley_minus_identity(self.boft_Q.to(dtype), b.size)
        rest = None if self.boft_Q_rest is None else cayley_minus_identity(self.boft_Q_rest.to(dtype), b.rest)
        delta = torch.zeros_like(w)
        for level in range(full.shape[0]):
            gathered = butterfly_gather(w + delta, level, b.size)
            delta = delta + butterfly_scatter(times_blocks(gathered, b, full[level], rest), level, b.size)
        return delta.to(w2.dtype)


def make_delta(base: nn.Module, kind: str, cfg: BOFTConfig, name: str, loading: bool = False) -> BOFTDelta:
    return BOFTDelta(base, kind, cfg, name)


def expected_parameters(base: nn.Module, kind: str, cfg: BOFTConfig, name: str) -> int:
    """``m (d / b) b(b-1)/2``, plus ``c(c-1)/2`` for a last block of c features (m = 1 only)."""
    b = layout(base, kind, cfg, name)
    return cfg.boft_n_butterfly_factor * b.count * n_skew(b.size) + n_skew(b.rest)


BOFT = register(Method(
    name="boft", config_cls=BOFTConfig, paper="Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization",
    hook="weight", kinds=("linear", "conv", "conv1d_gpt2"), make_delta=make_delta,
    expected_parameters=expected_parameters, default_targets=DEFAULT_TARGETS,
    variants=[{"boft_n_butterfly_factor": 2},
              {"boft_block_num": 4, "boft_block_size": 0, "boft_n_butterfly_factor": 2}],
    # HRA's GLUE recipe (9e-4..4e-3) trains the same kind of rotation of a DeBERTa-v3 layer
    default_lr=3e-3,    # not yet swept here
))
