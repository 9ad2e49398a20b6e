"""GaLore: AdamW whose moments live in the top singular subspace of each weight's gradient.

``GaLoreAdamW(model.parameters(), lr=1e-3)`` works in a plain loop; ``--optimizer galore_adamw``
(and ``galore_adamw8bit``, moments stored in 8 bits) in ``deltatune train``.
"""

from __future__ import annotations

import torch

from . import register_optimizer
from ._projection import (ProjectedOptimizer, adam_direction, as_matrix, check_hyperparameters, project,
                          project_back, projection_side, randomized_svd)
from ._state8bit import QuantizedState, quantize_state
from ..core.errors import DeltatuneError

SVD_METHODS = ("randomized", "exact")
_MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))        # (name, signed) of the two moments


class GaLoreAdamW(ProjectedOptimizer):
    """AdamW with gradient low-rank projection, after "GaLore: Memory-Efficient LLM Training by
    Gradient Low-Rank Projection" (Zhao et al., 2024).

    For every parameter with a matrix view (2-D; an N-D kernel is viewed as
    ``shape[0] x prod(shape[1:])``), ``m x n`` with ``d = min(m, n)`` on the projected side
    (``projection_side``), at steps ``t = 0, T, 2T, ...`` the projector ``P`` (``d x r``) is
    refreshed to the top ``r`` left (``m <= n``) or right singular vectors of the current
    gradient ``G_t``; then every step::

        R_t = P^T G_t            (left; G_t P on the right)    r x n projected gradient
        M_t = b1 M_{t-1} + (1 - b1) R_t,   V_t = b2 V_{t-1} + (1 - b2) R_t^2
        N_t = (M_t / (1 - b1^t)) / (sqrt(V_t / (1 - b2^t)) + eps)
        W  <- W (1 - lr wd) - lr * scale * P N_t          (N_t P^T on the right)

    As in the paper the moments are kept across a projector refresh. 0-D and 1-D parameters
    (biases, norms), and groups whose ``rank`` is ``None``, take plain AdamW steps, equal to
    ``torch.optim.AdamW``'s.

    State memory per projected ``m x n`` parameter (``d = min(m, n)``, ``D = max(m, n)``):
    ``4 * d * r`` bytes of projector plus ``2 * 4 * r * D`` of moments (``state_bits=32``) or
    ``2 * (r * D + 4 * ceil(r * D / 256))`` (``state_bits=8``: one byte per element and a
    float32 scale per block of 256, see ``_state8bit``); AdamW keeps ``2 * 4 * m * n``.

    Arguments: ``rank``: an int ``r`` for every matrix, or a fraction of each matrix's smaller
    side, ``r = ceil(rank * d)`` but at least ``min(16, d)`` (default ``0.25``: a quarter of the
    directions, which keeps the state near a quarter of AdamW's); ``update_proj_gap`` ``T``
    (default 200, the paper's); ``scale`` (default 1.0: with ``rank=1.0`` and a projector that
    is the identity this is AdamW exactly); ``svd``: ``"randomized"`` (default, ``randomized_svd``
    with 8 oversampled columns and 2 power iterations: the top ``r`` directions for a fraction
    of a full SVD's time on large matrices) or ``"exact"`` (``torch.linalg.svd``, the paper's);
    ``state_bits``: 32 or 8. ``betas``, ``eps``, ``weight_decay`` are AdamW's (decoupled decay,
    applied before the update as torch does). A group may set its own ``rank``,
    ``update_proj_gap`` and ``scale``.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, rank: int | float | None = 0.25, update_proj_gap: int = 200,
                 scale: float = 1.0, svd: str = "randomized", state_bits: int = 32, seed: int = 0):
        check_hyperparameters(lr, betas, eps, weight_decay)
        if svd not in SVD_METHODS:
            raise DeltatuneError(f"svd must be one of {', '.join(SVD_METHODS)}, got {svd!r}")
        if state_bits not in (8, 32):
            raise DeltatuneError(f"state_bits must be 32 or 8, got {state_bits!r}")
        self.svd, self.state_bits, self.seed = svd, state_bits, seed
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale)
        super().__init__(params, defaults)

    def check_param(self, name: str, group: dict, p: torch.Tensor) -> None:
        if not group["scale"] > 0:
            raise DeltatuneError(f"scale must be positive, got {group['scale']!r}")
        super().check_param(name, group, p)

    def _projected_step(self, p: torch.Tensor, state: dict, group: dict) -> None:
        grad = as_matrix(p.grad).float()
        side = projection_side(grad.shape)
        step = state.get("step", 0)
        if step % group["update_proj_gap"] == 0:
            state["proj"] = self._top_subspace(grad, self._ranks[p], side, step)
        low = project(grad, state["proj"], side)
        moments = self._load_moments(state, low)
        state["step"] = step + 1
        direction = adam_direction(*moments, low, group["betas"], group["eps"], state["step"])
        self._store_moments(state, moments)
        update = project_back(direction, state["proj"], side).view_as(p)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-group["lr"] * group["scale"])

    def _top_subspace(self, grad: torch.Tensor, rank: int, side: str, step: int) -> torch.Tensor:
        """The ``d x r`` orthonormal projector onto ``grad``'s top ``rank`` singular directions."""
        if self.svd == "exact":
            u, _, vh = torch.linalg.svd(grad, full_matrices=False)
            u, vh = u[:, :rank], vh[:rank]
        else:
            # the sketch's seed follows the step, so a resumed run draws the same sketches
            gen = torch.Generator(device=grad.device).manual_seed(self.seed + step)
            u, _, vh = randomized_svd(grad, rank, generator=gen)
        return (u if side == "left" else vh.T).contiguous()

    def _load_moments(self, state: dict, like: torch.Tensor) -> list[torch.Tensor]:
        """The two moments as float32 tensors of ``like``'s shape (zeros on the first step)."""
        if "exp_avg_codes" not in state and "exp_avg" not in state:
            return [torch.zeros_like(like), torch.zeros_like(like)]
        if self.state_bits == 32:
            return [state["exp_avg"], state["exp_avg_sq"]]
        return [QuantizedState(state[f"{key}_codes"], state[f"{key}_scales"], like.shape, signed).dequantize()
                for key, signed in _MOMENTS]

    def _store_moments(self, state: dict, moments: list[torch.Tensor]) -> None:
        for (key, signed), value in zip(_MOMENTS, moments):
            if self.state_bits == 32:
                state[key] = value
            else:
                q = quantize_state(value, signed=signed)
                state[f"{key}_codes"], state[f"{key}_scales"] = q.codes, q.scales


register_optimizer("galore_adamw", lambda groups, lr, wd: GaLoreAdamW(groups, lr=lr, weight_decay=wd))
register_optimizer("galore_adamw8bit", lambda groups, lr, wd: GaLoreAdamW(groups, lr=lr, weight_decay=wd,
                                                                           state_bits=8))

__all__ = ["GaLoreAdamW"]
