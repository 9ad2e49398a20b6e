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
- ``resolve_rank(name, rank, shape, *, min_rank=1) -> int``: the rank a specification means
  for one parameter: an ``int >= 1`` is taken as is, a ``float`` in ``(0, 1]`` is the fraction
  ``max(ceil(rank * min(m, n)), min(min_rank, min(m, n)))`` (``min_rank`` keeps a fraction of a
  tiny matrix, such as a head over five classes, from cutting it to one or two directions);
  anything else, or an int above ``min(m, n)``, is a ``DeltatuneError`` naming the parameter,
  its shape and the largest valid rank.
- ``check_positive_int(what, value)``: a ``DeltatuneError`` unless ``value`` is an int >= 1
  (the projection gap ``T``, for instance).
- ``randomized_svd(A, rank, *, oversample=8, power_iters=2, generator=None) -> LowRankSVD``:
  the top-``rank`` singular triplets ``U (m x r)``, ``S (r)``, ``Vh (r x n)`` of ``A`` by the
  randomised range finder of Halko, Martinsson and Tropp ("Finding structure with randomness",
  2011): a Gaussian sketch ``A Omega`` of ``rank + oversample`` columns, ``power_iters`` power
  iterations ``(A A^T)^q A Omega`` with a QR re-orthonormalisation after every product (without
  it the small singular directions are lost to rounding), then the exact SVD of the small
  ``Q^T A``. Always computed in float32, whatever ``A``'s dtype (bf16 QR is too coarse).
- ``gaussian_projector(dim, rank, seed, device) -> Tensor``: a ``dim x rank`` float32 matrix
  of i.i.d. ``N(0, 1/rank)`` entries (so ``E[P P^T] = I``: ``P P^T G`` is an unbiased estimate
  of ``G``) drawn from a generator seeded with ``seed`` on ``device``: an optimizer stores the
  seed, never the matrix, and regenerates it each step. Drawing on the parameter's own device
  keeps that cheap; the same seed gives the same matrix on every run on one device type (CPU
  and CUDA generators differ, so a checkpoint resumed on another device type continues with
  other random directions).
- ``ProjectedOptimizer``: the base class of the projected optimizers: ``state_bytes()``,
  ``check_param(name, group, p)`` (a hook called for every parameter as its group is added,
  so bad options fail before any step), ``named_params()`` (each parameter with a name for
  error messages: the group's ``param_names`` when given, else ``param_groups[g][i]``),
  ``adamw_step`` (plain AdamW, as ``torch.optim.AdamW`` computes it, for the parameters that
  are not projected), and a ``load_state_dict`` that keeps
  every state tensor's saved dtype (torch casts them to the parameter's, which would turn the
  float32 moments of a bf16 weight into bf16).
- ``adam_direction(exp_avg, exp_avg_sq, grad, betas, eps, step) -> Tensor``: updates the two
  moments in place and returns ``m_hat / (sqrt(v_hat) + eps)`` with torch's bias corrections.
- ``optimizer_state_bytes(optimizer) -> int``: bytes of every tensor in ``optimizer.state``
  (including tensors inside named records such as quantised states, which report ``nbytes``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..core.errors import DeltatuneError

# the floor the projected optimizers pass as ``min_rank``: a rank fraction leaves at least this many
# directions (or the whole side, when shorter)
MIN_RANK = 16


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


def resolve_rank(name: str, rank: int | float, shape: tuple[int, ...] | torch.Size, *, min_rank: int = 1) -> int:
    """The rank ``rank`` means for the parameter ``name`` of ``shape`` (see the module docstring)."""
    m, n = _matrix_shape(shape)
    largest = min(m, n)
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise DeltatuneError(f"rank must be an int >= 1 or a fraction in (0, 1], got {rank!r}")
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise DeltatuneError(f"a fractional rank must be in (0, 1], got {rank!r} "
                                 "(give an int for an absolute rank)")
        return max(1, math.ceil(rank * largest), min(min_rank, largest))
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
    """A ``dim x rank`` matrix of i.i.d. ``N(0, 1/rank)`` entries, a function of ``seed`` (and the
    device type)."""
    gen = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randn(dim, rank, generator=gen, device=device).div_(math.sqrt(rank))


def adam_direction(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
                   betas: tuple[float, float], eps: float, step: int) -> torch.Tensor:
    """Adam's moment updates (in place) and its bias-corrected direction, as torch computes it."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
    return (exp_avg / (1 - beta1 ** step)).div_(denom)


def check_hyperparameters(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """A ``DeltatuneError`` for a negative rate, eps or decay, or a beta outside ``[0, 1)``."""
    if not lr >= 0:
        raise DeltatuneError(f"lr must be >= 0, got {lr!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise DeltatuneError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not eps >= 0:
        raise DeltatuneError(f"eps must be >= 0, got {eps!r}")
    if not weight_decay >= 0:
        raise DeltatuneError(f"weight_decay must be >= 0, got {weight_decay!r}")


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


class ProjectedOptimizer(torch.optim.Optimizer):
    """Common ground of the projected optimizers (see the module docstring)."""

    def check_param(self, name: str, group: dict, p: torch.Tensor) -> None:
        """Validate ``p``'s options in ``group`` and resolve its rank; called for every parameter
        as its group is added, so bad options fail before any step. Subclasses extend it."""
        check_positive_int("update_proj_gap", group["update_proj_gap"])
        self._index[p] = len(self._index)       # a parameter's position: its seed stream
        if group["rank"] is not None and is_matrix(p):
            self._ranks[p] = resolve_rank(name, group["rank"], p.shape, min_rank=MIN_RANK)

    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "_ranks"):     # torch's __init__ adds the first groups, before a subclass could
            self._ranks: dict[torch.Tensor, int] = {}
            self._index: dict[torch.Tensor, int] = {}
        super().add_param_group(param_group)
        g, group = len(self.param_groups) - 1, self.param_groups[-1]
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            self.check_param(names[i] if names else f"param_groups[{g}][{i}]", group, p)

    def state_bytes(self) -> int:
        """Bytes of this optimizer's state tensors (moments, projectors, quantisation scales)."""
        return optimizer_state_bytes(self)

    def named_params(self):
        """``(name, group, parameter)`` for every parameter, in group order."""
        for g, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                yield (names[i] if names else f"param_groups[{g}][{i}]"), group, p

    def load_state_dict(self, state_dict: dict) -> None:
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        dtypes = {i: {k: v.dtype for k, v in state_dict["state"].get(i, {}).items() if isinstance(v, torch.Tensor)}
                  for i in saved_ids}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(saved_ids, params):
            state = self.state.get(p, {})
            for key, dtype in dtypes[i].items():
                state[key] = state[key].to(dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for name, group, p in self.named_params():
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise DeltatuneError(f"{type(self).__name__} does not take sparse gradients ({name})")
            step = self._projected_step if p in self._ranks else self.adamw_step
            step(p, self.state[p], group)
        return loss

    def _projected_step(self, p: torch.Tensor, state: dict, group: dict) -> None:
        """One step of a projected matrix ``p``; each optimizer's own rule."""
        raise NotImplementedError

    @staticmethod
    def adamw_step(p: torch.Tensor, state: dict, group: dict) -> None:
        """One ``torch.optim.AdamW`` step of ``p`` (float32 moments kept in ``state``)."""
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        state["step"] = state.get("step", 0) + 1
        direction = adam_direction(state["exp_avg"], state["exp_avg_sq"], p.grad.float(), group["betas"],
                                   group["eps"], state["step"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(direction.to(p.dtype), alpha=-group["lr"])
