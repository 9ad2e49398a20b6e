"""Flora: momentum compressed by random projections, on a factored (Adafactor) second moment.

``Flora(model.parameters(), lr=1e-3)`` works in a plain loop; ``--optimizer flora`` in
``deltatune train``.
"""

from __future__ import annotations

import torch

from . import register_optimizer
from ._projection import (ProjectedOptimizer, as_matrix, check_hyperparameters, gaussian_projector, project,
                          project_back, projection_side)
from ..core.errors import DeltatuneError

_SEED_STRIDE = 1_000_003  # seeds of different parameters never meet: refresh k of parameter i is i*stride+k


class Flora(ProjectedOptimizer):
    """Adafactor-style steps with a randomly compressed momentum, after "Flora: Low-Rank Adapters
    Are Secretly Gradient Compressors" (Hao, Cao and Mou, 2024).

    For every parameter with a matrix view (``m x n``; N-D kernels as ``shape[0] x
    prod(shape[1:])``), ``d = min(m, n)`` on the projected side (``projection_side``), ``A_k`` a
    random ``d x r`` projection (i.i.d. ``N(0, 1/r)``, so ``E[A A^T] = I``; regenerated from a
    seed, never stored) resampled every ``T`` steps (``k = t // T``)::

        a_t = b2 a_{t-1} + (1 - b2) rowmean(G_t^2 + eps1),   c_t likewise with colmean
        V_t = a_t c_t^T / mean(a_t) / (1 - b2^t)             factored second moment (Adafactor)
        U_t = G_t / sqrt(V_t)                                 normalised gradient
        D_t = (b1 up(C_{t-1}) + (1 - b1) U_t) / (1 - b1^t)    momentum; only its past is compressed
        C_t = b1 C_{t-1} + (1 - b1) down(U_t)                 down(X) = A^T X, up(Y) = A Y (left)
        D_t <- D_t / max(1, rms(D_t) / clip)                  Adafactor's update clipping
        W  <- W (1 - lr wd) - lr * D_t

    and at a resampling the compressed momentum moves to the new projection,
    ``C <- A_{k+1}^T (A_k C)`` (the paper's transfer; on the right ``C A_k^T A_{k+1}``).
    0-D/1-D parameters take plain AdamW steps (``betas``, ``eps2``).

    State memory per projected ``m x n`` parameter (``D = max(m, n)``): ``4 * r * D`` bytes of
    compressed momentum plus ``4 * (m + n)`` of second-moment factors; AdamW keeps
    ``2 * 4 * m * n``. Arguments: ``rank`` an int or a fraction of ``d`` (``ceil(rank * d)``, at
    least ``min(16, d)``; default ``0.25``); ``update_proj_gap`` ``T`` (the paper's ``kappa``,
    default 1000 as in its release); ``betas`` (momentum, second moment); ``eps``
    (``eps1 = 1e-30`` added to ``G^2`` as in Adafactor, and AdamW's eps for vectors);
    ``clip_threshold`` (default 1.0, Adafactor's); ``seed``. A group may set its own ``rank``
    (``None``: plain AdamW) and ``update_proj_gap``.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, rank: int | float | None = 0.25, update_proj_gap: int = 1000,
                 clip_threshold: float = 1.0, seed: int = 0):
        check_hyperparameters(lr, betas, eps, weight_decay)
        if not clip_threshold > 0:
            raise DeltatuneError(f"clip_threshold must be positive, got {clip_threshold!r}")
        self.seed, self.clip_threshold = seed, clip_threshold
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap)
        super().__init__(params, defaults)

    def projector(self, p: torch.Tensor, group: dict, step: int) -> torch.Tensor:
        """The random projection ``A`` that ``p`` uses at (0-based) ``step``."""
        refresh = step // group["update_proj_gap"]
        seed = self.seed + self._index[p] * _SEED_STRIDE + refresh
        return gaussian_projector(min(as_matrix(p).shape), self._ranks[p], seed, p.device)

    def _projected_step(self, p: torch.Tensor, state: dict, group: dict) -> None:
        grad = as_matrix(p.grad).float()
        side = projection_side(grad.shape)
        beta1, beta2 = group["betas"]
        step = state.get("step", 0)
        proj = self.projector(p, group, step)
        if "momentum" not in state:
            rank = self._ranks[p]
            shape = (rank, grad.shape[1]) if side == "left" else (grad.shape[0], rank)
            state["momentum"] = torch.zeros(shape, device=grad.device)
            state["row_sq"] = torch.zeros(grad.shape[0], device=grad.device)
            state["col_sq"] = torch.zeros(grad.shape[1], device=grad.device)
        elif step % group["update_proj_gap"] == 0:
            # a new projection: carry the compressed momentum over instead of dropping it
            old = self.projector(p, group, step - 1)
            state["momentum"] = project(project_back(state["momentum"], old, side), proj, side)
        state["step"] = t = step + 1

        squared = grad.square().add_(1e-30)
        state["row_sq"].lerp_(squared.mean(dim=1), 1 - beta2)
        state["col_sq"].lerp_(squared.mean(dim=0), 1 - beta2)
        second = torch.outer(state["row_sq"], state["col_sq"]) / state["row_sq"].mean() / (1 - beta2 ** t)
        normalised = grad / second.sqrt()

        momentum = state["momentum"]
        direction = project_back(momentum, proj, side).mul_(beta1).add_(normalised, alpha=1 - beta1)
        direction.div_(1 - beta1 ** t)
        momentum.mul_(beta1).add_(project(normalised, proj, side), alpha=1 - beta1)
        rms = direction.square().mean().sqrt()
        direction.div_(torch.clamp(rms / self.clip_threshold, min=1.0))
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(direction.view_as(p).to(p.dtype), alpha=-group["lr"])


register_optimizer("flora", lambda groups, lr, wd: Flora(groups, lr=lr, weight_decay=wd))

__all__ = ["Flora"]
