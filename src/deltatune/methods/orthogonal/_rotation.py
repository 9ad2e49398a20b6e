"""The shared math of the orthogonal family: skew-symmetric matrices stored as their strict upper
triangle, the Cayley transform, block-diagonal rotations of the 2-D view's input side (OFT, each
butterfly factor of BOFT) and BOFT's butterfly permutations.

Every rotation here multiplies the frozen weight view ``W2 (out, fan_in)`` from the right,
``W2' = W2 R``, and is applied as its difference from the identity, ``ΔW = W2 (R - I)``: at
``R = I`` that is exactly zero (no ``W2 R - W2`` cancellation), so the model is unchanged at
initialisation bit for bit, and a small rotation loses no precision against the large ``W2``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...core.errors import DeltatuneError


def n_skew(b: int) -> int:
    """Free entries of a ``b x b`` skew-symmetric matrix: its strict upper triangle."""
    return b * (b - 1) // 2


def skew(vec: torch.Tensor, b: int) -> torch.Tensor:
    """``(..., b(b-1)/2) -> (..., b, b)``: ``Q[i, j] = vec[k]`` for the k-th pair ``i < j`` in
    row-major order, ``Q[j, i] = -vec[k]``."""
    rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
    q = vec.new_zeros(*vec.shape[:-1], b, b)
    q[..., rows, cols] = vec
    return q - q.transpose(-1, -2)


def cayley_minus_identity(vec: torch.Tensor, b: int) -> torch.Tensor:
    """``R - I`` for the Cayley transform ``R = (I + Q)(I - Q)^-1`` of ``Q = skew(vec)``.

    ``R - I = ((I + Q) - (I - Q))(I - Q)^-1 = 2 (I - Q)^-1 Q`` (Q commutes with ``(I - Q)^-1``),
    one solve per block. ``I - Q`` is always invertible: a skew matrix's eigenvalues are imaginary.
    """
    q = skew(vec, b)
    eye = torch.eye(b, dtype=q.dtype, device=q.device)
    return torch.linalg.solve(eye - q, 2 * q)


def compute_dtype(w2: torch.Tensor) -> torch.dtype:
    """Rotations are solved in at least float32: a half-precision solve is not orthogonal enough."""
    return torch.promote_types(w2.dtype, torch.float32)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """How the input side (``fan_in``) splits: ``count`` blocks of ``size`` and, where ``size`` does
    not divide ``fan_in``, one last block of the ``rest`` features."""
    size: int
    count: int
    rest: int = 0

    @classmethod
    def of(cls, fan_in: int, size: int) -> "Blocks":
        size = min(size, fan_in)    # a layer narrower than a block is rotated as one block
        return cls(size, fan_in // size, fan_in % size)


def times_blocks(w: torch.Tensor, blocks: Blocks, full: torch.Tensor, rest: torch.Tensor | None) -> torch.Tensor:
    """``w @ blockdiag(full[0], ..., full[count - 1], rest)`` for ``w (out, fan_in)``; ``rest``
    None stands for a zero last block (a one-feature block, whose only rotation is the identity)."""
    out, n = w.shape[0], blocks.count * blocks.size
    head = torch.einsum("onk,nkc->onc", w[:, :n].reshape(out, blocks.count, blocks.size), full).reshape(out, n)
    if not blocks.rest:
        return head
    return torch.cat([head, torch.zeros_like(w[:, n:]) if rest is None else w[:, n:] @ rest], dim=1)


def butterfly_gather(w: torch.Tensor, level: int, b: int) -> torch.Tensor:
    """The columns of ``w (out, d)`` reordered so butterfly factor ``level`` is block-diagonal.

    Factor ``level`` works on groups of ``g = b 2^level`` features; block ``t`` of a group holds
    the ``t``-th run of ``b/2`` features of the group's first half followed by the ``t``-th run of
    its second half, so each block mixes features ``g/2`` apart (factor 0: contiguous blocks).
    This is the permutation ``P`` of ``W2 (P D Pᵀ)``; ``butterfly_scatter`` is ``Pᵀ``."""
    if level == 0:
        return w
    out, d, stride = w.shape[0], w.shape[1], 2 ** level
    return w.reshape(out, d // (b * stride), 2, stride, b // 2).transpose(2, 3).reshape(out, d)


def butterfly_scatter(w: torch.Tensor, level: int, b: int) -> torch.Tensor:
    if level == 0:
        return w
    out, d, stride = w.shape[0], w.shape[1], 2 ** level
    return w.reshape(out, d // (b * stride), stride, 2, b // 2).transpose(2, 3).reshape(out, d)


def check_conv(base: nn.Module, kind: str, method: str, name: str) -> None:
    """The rotated kernel runs through the layer's own convolution, zero-padded only."""
    if kind == "conv" and base.padding_mode != "zeros":
        raise DeltatuneError(f"{method} on {name}: padding_mode={base.padding_mode!r} is not supported (the "
                             f"rotated weight runs as a zero-padded convolution); exclude {name} from targets")


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]
