"""Learned step size quantisation (LSQ), the quantiser L4Q trains: from "Learned Step Size
Quantization" (Esser et al.), as used by "L4Q: Parameter Efficient Quantization-Aware Training on
LLMs via LoRA-wise LSQ".

``q(v) = a * clamp(round(v / a), -Qn, Qp)`` for a ``bits``-bit signed grid (``Qn = 2^(b-1)``,
``Qp = 2^(b-1) - 1``) and a trained step ``a`` (one per row of a weight). Gradients: to ``v``
straight through inside the grid's range and 0 where clamped; to ``a``
``round(v/a) - v/a`` inside and ``-Qn`` / ``Qp`` at the clamps, scaled by ``1 / sqrt(n Qp)`` with
``n`` the number of values per step (LSQ's gradient scale). Computed in float64 so that the same
weights round the same way in a float32 forward and in a float64 merge.
"""

from __future__ import annotations

import math

import torch


def grid(bits: int) -> tuple[int, int]:
    """``(Qn, Qp)`` of a signed ``bits``-bit grid."""
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


class _Lsq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, step, bits):
        qn, qp = grid(bits)
        v64, a = v.to(torch.float64), step.to(torch.float64)[:, None]
        scaled = v64 / a
        codes = torch.round(scaled).clamp(-qn, qp)
        ctx.save_for_backward(scaled, codes)
        ctx.qn, ctx.qp, ctx.dtypes = qn, qp, (v.dtype, step.dtype)
        ctx.scale = 1.0 / math.sqrt(v.shape[1] * qp)
        return codes * a

    @staticmethod
    def backward(ctx, grad):
        scaled, codes = ctx.saved_tensors
        inside = (scaled >= -ctx.qn) & (scaled <= ctx.qp)
        grad64 = grad.to(torch.float64)
        grad_v = (grad64 * inside).to(ctx.dtypes[0])
        d_step = torch.where(inside, codes - scaled, codes)          # codes = -Qn or Qp at the clamps
        grad_step = ((grad64 * d_step).sum(dim=1) * ctx.scale).to(ctx.dtypes[1])
        return grad_v, grad_step, None


def lsq_quantize(v: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """``v`` (rows x columns) on the ``bits``-bit grid of its row's ``step``, in float64."""
    return _Lsq.apply(v, step, bits)


def initial_step(w: torch.Tensor, bits: int) -> torch.Tensor:
    """One step per row that puts the row's largest magnitude on the grid's top level."""
    top = w.detach().abs().amax(dim=1).to(torch.float64)
    return torch.where(top > 0, top / grid(bits)[1], torch.ones_like(top))
