"""Shared pieces of the projected optimizers (GaLore, Flora, APOLLO, COAP).

A projected optimizer keeps its state for an ``m x n`` gradient ``G`` in an ``r``-dimensional
space along the smaller side of ``G`` and maps updates back through a projector ``P``:

- ``projection_side(shape) -> "left" | "right"``: ``"left"`` when ``m <= n``: ``P`` is ``m x r``,
  the projected gradient ``P^T G`` and the states are ``r x n``; ``"right"`` otherwise: ``P`` is
  ``n x r``, the projected gradient ``G P`` and the states are ``m x r``. Projecting the smaller
  side keeps the most state out of memory (``r * max(m, n)`` numbers, not ``r * min(m, n)``).
- ``project(G, P, side)`` and ``project_back(R, P, side)``: ``P^T G`` / ``G P`` and ``P R`` /
  ``R P^T``; with an orthonormal ``P`` (``P^T P = I``) ``project_back(project(G))`` is the
  orthogonal projection of ``G`` onto the subspace.
- ``as_matrix(t) -> Tensor``: the 2-D view an optimizer works on; an N-D tensor (a Conv2d
  kernel ``out x in x kh x kw``) is viewed as ``shape[0] x prod(shape[1:])``; 0-D/1-D tensors
  are not matrices (``ValueError``: callers test ``is_matrix`` first).
- ``resolve_rank(name, rank, shape) -> int``: the rank a specification means for one
  parameter: an ``int >= 1`` is taken as is, a ``float`` in ``(0, 1]`` is the fraction
  ``ceil(rank * min(m, n))``; anything else, or a rank above ``min(m, n)``, is a
  ``DeltatuneError`` naming the parameter, its shape and the largest valid rank.
- ``check_positive_int(what, value)``: a ``DeltatuneError`` unless ``value`` is an int >= 1
  (the projection gap ``T``, for instance).
- ``randomized_svd(A, rank, *, oversample=8, power_iters=2, generator=None) -> LowRankSVD``:
  the top-``rank`` singular triplets ``U (m x r)``, ``S (r)``, ``Vh (r x n)`` of ``A`` by the
  randomised range finder of Halko, Martinsson and Tropp ("Finding structure with randomness",
  2011): a Gaussian sketch ``A Omega`` of ``rank + oversample`` columns, ``power_iters`` power
  iterations ``(A A^T)^q A Omega`` with a QR re-orthonormalisation after every product (without
  it the small singular directions are lost to rounding), then the exact SVD of the small
  ``Q^T A``. Always computed in float32, whatever ``A``'s dtype (bf16 QR is too coarse).
- ``gaussian_projector(dim, rank, seed, device) -> Tensor``: a ``dim x rank`` matrix with
  i.i.d. ``N(0, 1/rank)`` entries drawn from a generator seeded with ``seed``, so that an
  optimizer stores the seed (8 bytes), never the matrix, and regenerates it identically on any
  step, after a reload, on CPU or CUDA (drawn on CPU, then moved).
- ``optimizer_state_bytes(optimizer) -> int``: bytes of every tensor in ``optimizer.state``
  (including tensors inside named records such as quantised states, which report ``nbytes``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..core.errors import DeltatuneError


class LowRankSVD(NamedTuple):
    """``A ~= U @ diag(S) @ Vh`` with ``U`` ``m x r`` and ``Vh`` ``r x n`` orthonormal, float32."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def projection_side(shape: tuple[int, ...] | torch.Size) -> str:
    """``"left"`` when the (matrix view's) rows are the smaller dimension, else ``"right"``."""
    m, n = _matrix_shape(shape)
    return "left" if m <= n else "right"


def is_matrix(t: torch.Tensor) -> bool:
    """Whether ``t`` has a 2-D view to project (2-D or more, no dimension of size 0)."""
    return t.dim() >= 2 and t.numel() > 0


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as ``shape[0] x prod(shape[1:])`` (a view: writes go through)."""
    if t.dim() < 2:
        raise ValueError(f"a {t.dim()}-D tensor is not a matrix")
    return t.reshape(t.shape[0], -1)


def _matrix_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    return int(shape[0]), int(math.prod(shape[1:]))


def project(grad: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    """``P^T G`` (left) or ``G P`` (right)."""
    return proj.T @ grad if side == "left" else grad @ proj


def project_back(low: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    """``P R`` (left) or ``R P^T`` (right)."""
    return proj @ low if side == "left" else low @ proj.T


def check_positive_int(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DeltatuneError(f"{what} must be a positive integer, got {value!r}")
    return value


def resolve_rank(name: str, rank: int | float, shape: tuple[int, ...] | torch.Size) -> int:
    """The rank ``rank`` means for the parameter ``name`` of ``shape`` (see the module docstring)."""
    m, n = _matrix_shape(shape)
    largest = min(m, n)
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise DeltatuneError(f"rank must be an int >= 1 or a fraction in (0, 1], got {rank!r}")
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise DeltatuneError(f"a fractional rank must be in (0, 1], got {rank!r} "
                                 "(give an int for an absolute rank)")
        return max(1, math.ceil(rank * largest))
    if rank < 1:
        raise DeltatuneError(f"rank must be >= 1, got {rank}")
    if rank > largest:
        raise DeltatuneError(f"rank {rank} is too large for parameter {name!r} of shape {tuple(shape)} "
                             f"(matrix view {m}x{n}); the largest valid rank is {largest}")
    return rank


def randomized_svd(matrix: torch.Tensor, rank: int, *, oversample: int = 8, power_iters: int = 2,
                   generator: torch.Generator | None = None) -> LowRankSVD:
    """The top ``rank`` singular triplets of the 2-D ``matrix`` (see the module docstring)."""
    if matrix.dim() != 2:
        raise ValueError(f"randomized_svd needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    a = matrix.detach().float()
    m, n = a.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} outside [1, {min(m, n)}] for a {m}x{n} matrix")
    k = min(rank + oversample, min(m, n))
    # the sketch is drawn on the generator's device (CPU by default) so a seed gives the same
    # sketch on every device
    gen_device = generator.device if generator is not None else torch.device("cpu")
    omega = torch.randn(n, k, generator=generator, device=gen_device).to(a.device)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(a.T @ q).Q
        q = torch.linalg.qr(a @ q).Q
    ub, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return LowRankSVD(U=(q @ ub)[:, :rank], S=s[:rank], Vh=vh[:rank])


def gaussian_projector(dim: int, rank: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A ``dim x rank`` matrix of i.i.d. ``N(0, 1/rank)`` entries, a pure function of ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return (torch.randn(dim, rank, generator=gen) / math.sqrt(rank)).to(device)


def _tensor_bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if hasattr(value, "nbytes") and not isinstance(value, (int, float)):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors of ``optimizer.state`` (Python scalars are not counted)."""
    return sum(_tensor_bytes(s) for s in optimizer.state.values())
