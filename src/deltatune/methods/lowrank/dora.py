"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024).

The weight is split into a magnitude and a direction: ``W' = m * (W + s B A) / ||W + s B A||_c``,
where ``||.||_c`` is the norm of each output unit's weight vector (a row of the 2-D view
``(out, fan_in)``, the paper's column of ``W^T``), ``m`` is trainable and starts at ``||W||_c``
(so the model is unchanged at init), and ``B A`` is a LoRA update: ``r (fan_in + out) + out``
parameters per layer. DoRA is LoRA with this magnitude term: the same delta (``lora.py``), every
LoRA option (inits, bias, rsLoRA, LoRA+) included; ``MagnitudeTerm`` below is all DoRA adds.

Two savings over the plain definition, both from the paper's own reading:
- the norm is detached from the graph (the paper's Section 4.3: treat ``||W + s B A||_c`` as a
  constant), so it costs no backward memory;
- it is computed from low-rank terms without materialising ``W + s B A``:
  ``||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s <(W A^T)_i, B_i> + s^2 B_i (A A^T) B_i^T``,
  which needs ``W A^T (out, r)`` and ``A A^T (r, r)`` instead of an ``(out, fan_in)`` matrix.
The output is then ``(m / n) * (W x + s B A x) + b = y + (m/n - 1)(y - b) + (m/n) s B A x``
with ``y = W x + b`` the frozen layer's output, so the frozen matmul runs once. LoRA's fused
single-layer path takes ``m`` and ``n`` folded in; DoRA stays out of LoRA's q/k/v group pass
(``FusedLoraGroup``): measured on SmolLM2 (r=16, all linear layers) it raised peak memory by
0.75 GB and gained no time.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ...core.config import method_config
from ...core.layers import channel_view, out_in, to_2d
from ...core.registry import Method, register
from ...core.wrapper import fold
from .lora import DEFAULT_TARGETS, LoraConfig, LoraDelta, calibrate, lr_multipliers, make_delta
from .lora import expected_parameters as lora_expected_parameters


class MagnitudeTerm:
    """DoRA's part of a ``LoraDelta`` whose ``magnitude`` holds ``m``: the initial ``m``, the
    norm, the forward and the merge."""

    @staticmethod
    @torch.no_grad()
    def initial(base: nn.Module, kind: str) -> torch.Tensor:
        return to_2d(base.weight, kind).norm(dim=1)

    @staticmethod
    @torch.no_grad()
    def norm(delta: LoraDelta, base: nn.Module) -> torch.Tensor:
        """``||W + s B A||_c`` per output unit, from low-rank terms, detached."""
        w2 = to_2d(base.weight, delta.kind)
        A, B = delta.factors()
        cross = ((w2 @ A.t()) * B).sum(dim=1)
        quad = ((B @ (A @ A.t())) * B).sum(dim=1)
        sq = (w2 * w2).sum(dim=1) + 2 * delta.scale * cross + delta.scale ** 2 * quad
        return sq.clamp_min(0).sqrt().clamp_min(1e-12)

    @staticmethod
    def forward(delta: LoraDelta, x: torch.Tensor, y: torch.Tensor, base: nn.Module, preceding=()) -> torch.Tensor:
        """``(m / n) (y - b) + b + (m / n) s B A x``. Stacked after other deltas on the layer, DoRA
        decomposes the weight they leave (``W'``, bias ``b'``, folded in float64 as merge does), so
        forward and merge agree: ``n = ||W' + s B A||_c`` and only ``y - b'`` is rescaled."""
        if preceding:
            w_eff, b_eff = fold(base, delta.kind, preceding)
            with torch.no_grad():
                norm = (w_eff + delta.delta_2d()).norm(dim=1).clamp_min(1e-12).to(y.dtype)
            bias = None if b_eff is None else b_eff.to(y.dtype)
        else:
            norm, bias = MagnitudeTerm.norm(delta, base), getattr(base, "bias", None)
        g = channel_view(delta.magnitude / norm, y, delta.kind)
        y_no_bias = y if bias is None else y - channel_view(bias, y, delta.kind)
        return y + (g - 1) * y_no_bias + g * delta.lora_out(x, base)

    @staticmethod
    def merge(delta: LoraDelta, full: torch.Tensor) -> torch.Tensor:
        """``m`` times the direction of the merged float64 ``W + s B A`` (its exact norm)."""
        return full * (delta.magnitude.double() / full.norm(dim=1))[:, None]


@method_config
class DoraConfig(LoraConfig):
    """DoRA: the LoRA options plus a trainable magnitude per output unit."""

    magnitude_term: ClassVar[Any] = MagnitudeTerm


def expected_parameters(base: nn.Module, kind: str, cfg: DoraConfig, name: str) -> int:
    """LoRA's ``r (fan_in + out)`` (+ ``out`` with a trained bias) plus the magnitude (``out``)."""
    return lora_expected_parameters(base, kind, cfg, name) + out_in(base, kind)[0]


DORA = register(Method(
    name="dora",
    config_cls=DoraConfig,
    paper="DoRA: Weight-Decomposed Low-Rank Adaptation",
    hook="weight",
    kinds=("linear", "conv", "conv1d_gpt2"),
    make_delta=make_delta,
    expected_parameters=expected_parameters,
    default_targets=DEFAULT_TARGETS,
    default_lr=3e-3,     # LoRA's rate (same factors); fashion 85.6 % at 3e-3
    variants=[{"init": "pissa"}, {"dropout": 0.1}],
    lr_multipliers=lr_multipliers,
    calibrate=calibrate,
))
