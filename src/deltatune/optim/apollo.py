"""APOLLO and APOLLO-Mini: SGD-sized state, AdamW-like steps through a learned gradient scaling.

``Apollo(model.parameters(), lr=1e-3)`` / ``ApolloMini(...)`` work in a plain loop;
``--optimizer apollo`` / ``apollo_mini`` in ``deltatune train``.
"""

from __future__ import annotations

import math

import torch

from . import register_optimizer
from ._projection import (ProjectedOptimizer, adam_direction, as_matrix, check_hyperparameters, gaussian_projector,
                          project, projection_side)
from ..core.errors import DeltatuneError

SCALE_TYPES = ("channel", "tensor")
_TINY = 1e-8             # keeps a ratio of norms finite where a projected gradient column is zero
_SEED_STRIDE = 1_000_003  # seeds of different parameters never meet: refresh k of parameter i is i*stride+k


class Apollo(ProjectedOptimizer):
    """AdamW-like steps from a scaled raw gradient, after "APOLLO: SGD-like Memory, AdamW-level
    Performance" (Zhu et al., 2025).

    For every parameter with a matrix view (``m x n``; N-D kernels as ``shape[0] x
    prod(shape[1:])``), ``d = min(m, n)`` on the projected side (``projection_side``): a random
    projection ``P`` (``d x r``, i.i.d. ``N(0, 1/r)``, regenerated from a stored seed, resampled
    every ``T`` steps) carries an auxiliary AdamW state, used only to estimate how AdamW would
    rescale each channel of the gradient::

        R_t = P^T G_t  (left; G_t P on the right),  M_t, V_t Adam moments of R_t
        Rt_t = (M_t / (1 - b1^t)) / (sqrt(V_t / (1 - b2^t)) + eps)
        s_j = ||Rt_t[:, j]|| / ||R_t[:, j]||   one factor per column j of G (left; per row on the
                                               right), "channel"; or s = ||Rt_t|| / ||R_t||, "tensor"
        S_t = G_t * s                          the raw, full-rank gradient, rescaled
        if ||S_t|| > gamma ||S_{t-1}||: S_t <- S_t * gamma ||S_{t-1}|| / ||S_t||   (norm-growth limiter)
        W  <- W (1 - lr wd) - lr * alpha * S_t

    ``alpha`` (``scale``): a random projection to ``r`` of ``d`` dimensions keeps the gradient's
    norm but shrinks Adam's normalised direction's by ``sqrt(r / d)``, so ``s`` (and the step)
    comes out ``sqrt(r / d)`` too small. The default ``scale=None`` undoes exactly that,
    ``alpha = sqrt(d / r)`` per parameter, so that the loop's AdamW learning rate applies; the
    paper tunes a constant instead (APOLLO-Mini's ``sqrt(128)``), which ``scale=`` gives. As in the
    paper the moments are kept across a resampling. 0-D/1-D parameters take plain AdamW steps.

    State memory per projected ``m x n`` parameter (``D = max(m, n)``): ``2 * 4 * r * D`` bytes of
    moments plus 4 of the limiter's previous norm; the projector is regenerated, never stored.
    Arguments: ``rank`` an int or a fraction of ``d`` (``ceil(rank * d)``, at least
    ``min(16, d)``; default ``0.25``, the paper's quarter of the dimension); ``update_proj_gap``
    ``T`` (default 200); ``scale_type`` ``"channel"`` or ``"tensor"``; ``norm_growth_limit``
    ``gamma`` (default 1.01, the paper's; ``None`` disables the limiter); ``seed``. A group may
    set its own ``rank`` (``None``: plain AdamW), ``update_proj_gap``, ``scale``, ``scale_type``.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, rank: int | float | None = 0.25, update_proj_gap: int = 200,
                 scale: float | None = None, scale_type: str = "channel", norm_growth_limit: float | None = 1.01,
                 seed: int = 0):
        check_hyperparameters(lr, betas, eps, weight_decay)
        if scale_type not in SCALE_TYPES:
            raise DeltatuneError(f"scale_type must be one of {', '.join(SCALE_TYPES)}, got {scale_type!r}")
        if norm_growth_limit is not None and not norm_growth_limit >= 1.0:
            raise DeltatuneError(f"norm_growth_limit must be >= 1 (or None), got {norm_growth_limit!r}")
        self.seed = seed
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        rank=rank, update_proj_gap=update_proj_gap,
                        scale=scale, scale_type=scale_type, norm_growth_limit=norm_growth_limit)
        super().__init__(params, defaults)

    def check_param(self, name: str, group: dict, p: torch.Tensor) -> None:
        if group["scale"] is not None and not group["scale"] > 0:
            raise DeltatuneError(f"scale must be positive (or None for sqrt(d / r)), got {group['scale']!r}")
        super().check_param(name, group, p)

    def projector(self, p: torch.Tensor, group: dict, step: int) -> torch.Tensor:
        """The random projector ``p`` uses at (0-based) ``step``: resampled every ``T`` steps."""
        grad_shape = as_matrix(p).shape
        refresh = step // group["update_proj_gap"]
        seed = self.seed + self._index[p] * _SEED_STRIDE + refresh
        return gaussian_projector(min(grad_shape), self._ranks[p], seed, p.device)

    def _projected_step(self, p: torch.Tensor, state: dict, group: dict) -> None:
        grad = as_matrix(p.grad).float()
        side = projection_side(grad.shape)
        step = state.get("step", 0)
        low = project(grad, self.projector(p, group, step), side)
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(low), torch.zeros_like(low)
        state["step"] = step + 1
        direction = adam_direction(state["exp_avg"], state["exp_avg_sq"], low, group["betas"], group["eps"],
                                   state["step"])
        if group["scale_type"] == "tensor":
            factor = direction.norm() / (low.norm() + _TINY)
        else:
            # the channels are the unprojected side: columns of G on the left, rows on the right
            dim = 0 if side == "left" else 1
            factor = direction.norm(dim=dim, keepdim=True) / (low.norm(dim=dim, keepdim=True) + _TINY)
        scaled = grad * factor
        limit = group["norm_growth_limit"]
        if limit is not None:
            norm = scaled.norm()
            if "prev_norm" in state:
                # shrink only when the norm grew by more than `limit` since the last step
                shrink = torch.clamp(limit * state["prev_norm"] / (norm + _TINY), max=1.0)
                scaled.mul_(shrink)
                norm = norm * shrink
            state["prev_norm"] = norm
        alpha = group["scale"] if group["scale"] is not None else math.sqrt(min(grad.shape) / self._ranks[p])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(scaled.view_as(p).to(p.dtype), alpha=-group["lr"] * alpha)


class ApolloMini(Apollo):
    """APOLLO-Mini, from "APOLLO: SGD-like Memory, AdamW-level Performance" (Zhu et al., 2025):
    ``Apollo`` with a rank-1 auxiliary space and one tensor-wise factor
    ``s = ||Rt_t|| / ||R_t||`` per matrix (see ``Apollo`` for the update rule). State memory per
    projected ``m x n`` parameter: ``2 * 4 * max(m, n) + 4`` bytes (SGD-like). Defaults:
    ``rank=1``, ``scale_type="tensor"``, ``scale=None`` (``alpha = sqrt(d)``, see ``Apollo``).
    """

    def __init__(self, params, lr: float = 1e-3, *, rank: int | float | None = 1, scale_type: str = "tensor",
                 **kwargs):
        super().__init__(params, lr, rank=rank, scale_type=scale_type, **kwargs)


register_optimizer("apollo", lambda groups, lr, wd: Apollo(groups, lr=lr, weight_decay=wd))
register_optimizer("apollo_mini", lambda groups, lr, wd: ApolloMini(groups, lr=lr, weight_decay=wd))

__all__ = ["Apollo", "ApolloMini"]
