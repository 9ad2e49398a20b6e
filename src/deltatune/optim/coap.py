"""COAP: Memory-Efficient Training with Correlation-Aware Gradient Projection (Xiao et al.,
CVPR 2025): ``CoapAdamW`` and ``CoapAdafactor``, each with 8-bit states.

For an ``m x n`` weight (embeddings included) with gradient ``G_t``, ``a = max(m, n)``,
``b = min(m, n)``, COAP keeps an orthonormal projection ``P`` (``b x r``) onto the smaller side
and runs the optimizer on the projected gradient (shown for ``m > n``; ``P^T G`` otherwise)::

    R_t = G_t P                           # m x r
    M_t = b1 M_{t-1} + (1 - b1) R_t       # Adam moments, m x r
    V_t = b2 V_{t-1} + (1 - b2) R_t^2
    W  <- W (1 - lr wd) - lr (M_t / (1 - b1^t)) / (sqrt(V_t / (1 - b2^t)) + eps) P^T

``P`` starts as the top-``r`` right singular vectors of the first gradient (randomised SVD).
Every ``T = update_interval`` steps it takes one gradient step (rate ``proj_lr``) on the
correlation-aware objective ``||G P P^T - G||^2 / ||G||^2 * (1 - mean_i cos((M P^T)_i, G_i))``
and is re-orthonormalised; every ``T * reproject_factor`` steps it is re-projected by a
randomised SVD sketched with the previous ``P``. Either way the moments move into the new basis
(``C = P_old^T P_new``: ``M C`` and ``V (C o C)``). Conv2d kernels get a Tucker projector on their
output and input channel modes (``conv_rank``); other parameters, and matrices with a side under
16 (classifier heads), get the plain optimizer. Details: ``_coap_projector`` and ``_coap_base``.

``CoapAdafactor`` runs Adafactor (Shazeer & Stern: factored second moment ``row x col`` of the
state, relative decay ``1 - t^decay_rate``, update RMS-clipped to ``clip_threshold``, first
moment ``beta1`` on the clipped update, decoupled weight decay) in the same projected space.

State memory, in bytes, of one ``m x n`` matrix (``a``, ``b`` as above; AdamW needs ``8 m n``):

- ``CoapAdamW``:      ``4 (2 a r + b r)``
- 8-bit:              ``2 (a r + 4 ceil(a r / 256)) + 4 b r``
- ``CoapAdafactor``:  ``4 (a r + a + r + b r)`` (8-bit: ``a r + 4 ceil(a r / 256)`` for the first moment)

Conv2d (``out x in x kh x kw``, ranks ``r_o``, ``r_i``): moments ``r_o r_i kh kw`` each, plus
``4 (out r_o + in r_i)`` for the factors; other parameters (and matrices with a side under 16):
the plain optimizer's states.
``state_bytes()`` counts the live states, ``planned_state_bytes()`` predicts them from shapes.

Defaults: ``rank=0.25`` (a quarter of each matrix's smaller side, rounded up), so a matrix's
states are ``r/b (1 + b / 2a)`` of AdamW's: a quarter for a tall embedding, 0.375 for a square
matrix. ``update_interval=32``, ``reproject_factor=5`` (the paper's), ``conv_rank=0.5`` per mode
(a core a quarter of the kernel), ``proj_lr=0.1``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core.errors import DeltatuneError
from . import register_optimizer
from ._coap_base import Carry, CoapOptimizer, ParamLayout


def _check_beta(name: str, value: Any, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and (0.0 < value < 1.0 if low_open else 0.0 <= value < 1.0)
    if not ok:
        raise DeltatuneError(f"{name} must be in {'(0' if low_open else '[0'}, 1), got {value!r}")


class CoapAdamW(CoapOptimizer):
    """AdamW in COAP's projected space (module docstring: update rule and state bytes)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, rank: int | float = 0.25, update_interval: int = 32,
                 reproject_factor: int = 5, conv_rank: int | float = 0.5, proj_lr: float = 0.1, state_bits: int = 32):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_interval=update_interval, reproject_factor=reproject_factor,
                        conv_rank=conv_rank, proj_lr=proj_lr)
        super().__init__(params, defaults, state_bits)

    def _check_group(self, group: dict[str, Any]) -> None:
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise DeltatuneError(f"betas must be a pair, got {betas!r}")
        _check_beta("betas[0]", betas[0])
        _check_beta("betas[1]", betas[1])
        if not isinstance(group["eps"], (int, float)) or group["eps"] < 0:
            raise DeltatuneError(f"eps must be >= 0, got {group['eps']!r}")

    def _moment_numels(self, layout: ParamLayout) -> list[tuple[int, bool]]:
        numel = math.prod(layout.low_shape)
        return [(numel, True), (numel, True)]

    def _first_moment(self, state: dict[str, Any], layout: ParamLayout) -> torch.Tensor:
        return self._read(state, "exp_avg", layout.low_shape, True)

    def _carry(self, state: dict[str, Any], layout: ParamLayout, carry: Carry) -> None:
        for key, second in (("exp_avg", False), ("exp_avg_sq", True)):
            self._write(state, key, carry(self._read(state, key, layout.low_shape, not second), second), not second)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        seed = 0
        for gi, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            live: list[tuple[torch.Tensor, ParamLayout]] = []
            lows, ms, vs, c1, c2 = [], [], [], [], []
            for p, layout in self._layouts(group, gi):
                seed += 1
                if p.grad is None:
                    continue
                low = self._projected_grad(p, group, layout, seed)
                state = self.state[p]
                if "exp_avg" not in state and "exp_avg_codes" not in state:
                    self._zeros(state, "exp_avg", layout.low_shape, True, p.device)
                    self._zeros(state, "exp_avg_sq", layout.low_shape, False, p.device)
                state["step"] += 1
                live.append((p, layout))
                lows.append(low)
                ms.append(self._read(state, "exp_avg", layout.low_shape, True))
                vs.append(self._read(state, "exp_avg_sq", layout.low_shape, False))
                c1.append(1.0 - beta1 ** state["step"])
                c2.append(1.0 - beta2 ** state["step"])
            if not live:
                continue
            # multi-tensor kernels: the per-step cost beyond AdamW is the two thin matmuls per matrix
            torch._foreach_lerp_(ms, lows, 1.0 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, lows, lows, 1.0 - beta2)
            denoms = torch._foreach_sqrt(vs)
            torch._foreach_div_(denoms, [math.sqrt(c) for c in c2])
            torch._foreach_add_(denoms, group["eps"])
            updates = torch._foreach_div(ms, denoms)
            torch._foreach_mul_(updates, [-lr / c for c in c1])
            deltas = []
            for (p, layout), m, v, upd in zip(live, ms, vs, updates):
                state = self.state[p]
                self._write(state, "exp_avg", m, True)
                self._write(state, "exp_avg_sq", v, False)
                deltas.append(self._back(state, layout, upd).to(p.dtype))
            params = [p for p, _ in live]
            if wd != 0:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            torch._foreach_add_(params, deltas)
        return loss


class CoapAdafactor(CoapOptimizer):
    """Adafactor in COAP's projected space (module docstring: update rule and state bytes)."""

    def __init__(self, params, lr: float = 1e-3, beta1: float = 0.9, decay_rate: float = -0.8,
                 eps: float = 1e-30, clip_threshold: float = 1.0, weight_decay: float = 0.0,
                 rank: int | float = 0.25, update_interval: int = 32, reproject_factor: int = 5,
                 conv_rank: int | float = 0.5, proj_lr: float = 0.1, state_bits: int = 32):
        defaults = dict(lr=lr, beta1=beta1, decay_rate=decay_rate, eps=eps, clip_threshold=clip_threshold,
                        weight_decay=weight_decay, rank=rank, update_interval=update_interval,
                        reproject_factor=reproject_factor, conv_rank=conv_rank, proj_lr=proj_lr)
        super().__init__(params, defaults, state_bits)

    def _check_group(self, group: dict[str, Any]) -> None:
        # the correlation-aware objective needs a first moment
        _check_beta("beta1", group["beta1"], low_open=True)
        if not isinstance(group["decay_rate"], (int, float)) or not -1.0 <= group["decay_rate"] < 0.0:
            raise DeltatuneError(f"decay_rate must be in [-1, 0), got {group['decay_rate']!r}")
        if not isinstance(group["clip_threshold"], (int, float)) or group["clip_threshold"] <= 0:
            raise DeltatuneError(f"clip_threshold must be > 0, got {group['clip_threshold']!r}")
        if not isinstance(group["eps"], (int, float)) or group["eps"] < 0:
            raise DeltatuneError(f"eps must be >= 0, got {group['eps']!r}")

    @staticmethod
    def _factored(layout: ParamLayout) -> tuple[int, int] | None:
        """(rows, cols) of the 2-D view whose second moment is factored, or None (1-D)."""
        if len(layout.low_shape) < 2:
            return None
        return layout.low_shape[0], math.prod(layout.low_shape[1:])

    def _moment_numels(self, layout: ParamLayout) -> list[tuple[int, bool]]:
        numel = math.prod(layout.low_shape)
        f = self._factored(layout)
        return [(numel, True)] + ([(f[0], False), (f[1], False)] if f else [(numel, False)])

    def _first_moment(self, state: dict[str, Any], layout: ParamLayout) -> torch.Tensor:
        return self._read(state, "exp_avg", layout.low_shape, True)

    def _carry(self, state: dict[str, Any], layout: ParamLayout, carry: Carry) -> None:
        self._write(state, "exp_avg", carry(self._first_moment(state, layout), False), True)
        f = self._factored(layout)
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        # carry the rank-one second moment the factors stand for, then factor it again (exact
        # for a rank-one matrix: its row and column means give back the same product)
        approx = (row.unsqueeze(1) * col.unsqueeze(0) / row.mean().clamp_min(1e-30)).reshape(layout.low_shape)
        approx = carry(approx, True).reshape(f)
        row.copy_(approx.mean(dim=1))
        col.copy_(approx.mean(dim=0))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        seed = 0
        for gi, group in enumerate(self.param_groups):
            lr, wd = group["lr"], group["weight_decay"]
            for p, layout in self._layouts(group, gi):
                seed += 1
                if p.grad is None:
                    continue
                low = self._projected_grad(p, group, layout, seed)
                state = self.state[p]
                f = self._factored(layout)
                if "exp_avg" not in state and "exp_avg_codes" not in state:
                    self._zeros(state, "exp_avg", layout.low_shape, True, p.device)
                    if f:
                        state["exp_avg_sq_row"] = torch.zeros(f[0], device=p.device)
                        state["exp_avg_sq_col"] = torch.zeros(f[1], device=p.device)
                    else:
                        state["exp_avg_sq"] = torch.zeros(layout.low_shape, device=p.device)
                state["step"] += 1
                beta2t = 1.0 - state["step"] ** group["decay_rate"]
                sq = low * low + group["eps"]
                if f:
                    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                    sq2 = sq.reshape(f)
                    row.mul_(beta2t).add_(sq2.mean(dim=1), alpha=1.0 - beta2t)
                    col.mul_(beta2t).add_(sq2.mean(dim=0), alpha=1.0 - beta2t)
                    r_factor = (row / row.mean()).rsqrt().unsqueeze(1)
                    upd = (low.reshape(f) * r_factor * col.rsqrt().unsqueeze(0)).reshape(layout.low_shape)
                else:
                    v = state["exp_avg_sq"]
                    v.mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
                    upd = low * v.rsqrt()
                rms = upd.norm() / math.sqrt(upd.numel())
                upd = upd / (rms / group["clip_threshold"]).clamp(min=1.0) * lr
                m = self._first_moment(state, layout)
                m.mul_(group["beta1"]).add_(upd, alpha=1.0 - group["beta1"])
                self._write(state, "exp_avg", m, True)
                if wd != 0:
                    p.mul_(1.0 - lr * wd)
                p.sub_(self._back(state, layout, m).to(p.dtype))
        return loss


class CoapAdamW8bit(CoapAdamW):
    """``CoapAdamW`` with block-wise 8-bit moments (``state_bits=8``)."""

    def __init__(self, params, **kwargs):
        kwargs.setdefault("state_bits", 8)
        super().__init__(params, **kwargs)


class CoapAdafactor8bit(CoapAdafactor):
    """``CoapAdafactor`` with a block-wise 8-bit first moment (``state_bits=8``)."""

    def __init__(self, params, **kwargs):
        kwargs.setdefault("state_bits", 8)
        super().__init__(params, **kwargs)


register_optimizer("coap_adamw", lambda groups, lr, wd: CoapAdamW(groups, lr=lr, weight_decay=wd))
register_optimizer("coap_adamw8bit", lambda groups, lr, wd: CoapAdamW8bit(groups, lr=lr, weight_decay=wd))
register_optimizer("coap_adafactor", lambda groups, lr, wd: CoapAdafactor(groups, lr=lr, weight_decay=wd))
register_optimizer("coap_adafactor8bit", lambda groups, lr, wd: CoapAdafactor8bit(groups, lr=lr, weight_decay=wd))

__all__ = ["CoapAdafactor", "CoapAdafactor8bit", "CoapAdamW", "CoapAdamW8bit"]
