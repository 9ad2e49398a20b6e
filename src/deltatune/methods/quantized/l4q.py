"""L4Q, from "L4Q: Parameter Efficient Quantization-Aware Training on LLMs via LoRA-wise LSQ"
(Jeon et al., 2024).

QLoRA's deltas are trained on a quantised base but stay float: merging them breaks the
quantisation, and keeping them apart costs a float path at inference. L4Q quantises the merged
weight itself during training, so the fine-tuned model is a quantised model. On the 2-D view
``W (out, fan_in)``, with LoRA's ``s B A`` (``s = alpha / r``)::

    W' = q(W + s B A),      q(v) = a * clamp(round(v / a), -Qn, Qp)

LSQ's learned step ``a`` (one per output row, ``quant.lsq``) on a ``bits``-bit signed grid;
gradients straight through ``round`` to ``W + s B A`` (zero where clamped) and LSQ's gradient to
``a``. Trained: ``A``, ``B`` and ``a``; frozen: ``W``. At init ``B = 0``: the layer is ``q(W)``
with ``a`` at each row's ``max |W| / Qp`` (not the float model: training starts from the
quantised one, as in the paper). The weight delta is ``dW = q(W + s B A) - W``; merging writes
``q(W + s B A)``, a weight on the grid of its step, deployable as ``bits``-bit codes and ``out``
steps. The rounding is computed in float64 in forward and merge alike, so they agree.

Parameters per layer: ``r (fan_in + out) + out``. Defaults: rank 8, alpha 16 as LoRA here,
4 bits (the paper's main setting).
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.config import BaseConfig, check_number, method_config
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import WeightDelta, frozen_2d
from ...quant.lsq import initial_step, lsq_quantize
from ..lowrank.lora import DEFAULT_TARGETS
from ..lowrank.lora_init import check_rank
from ..spectral._svd import trained


@method_config
class L4qConfig(BaseConfig):
    """L4Q. ``r`` the rank, ``alpha`` the scale numerator, ``bits`` the width of the quantised
    weight."""

    r: int = 8
    alpha: float = 16.0
    bits: int = 4

    def validate(self) -> None:
        check_number("r", self.r, kind=int, low=1, high=1 << 16)
        check_number("alpha", self.alpha, low=0, low_open=True)
        check_number("bits", self.bits, kind=int, low=2, high=16)


class L4qDelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, cfg: L4qConfig, loading: bool):
        super().__init__()
        self.bind(base)
        self.kind, self.scale, self.bits = kind, cfg.alpha / cfg.r, cfg.bits
        w = frozen_2d(base, kind).detach()
        out, fan_in = w.shape
        A = torch.zeros(cfg.r, fan_in, dtype=torch.float64)
        if not loading:     # LoRA's start: A Kaiming-uniform, B zero
            nn.init.kaiming_uniform_(A, a=5 ** 0.5)
        self.lora_A = trained(A, base)
        self.lora_B = trained(torch.zeros(out, cfg.r), base)
        self.l4q_step = trained(initial_step(w, cfg.bits), base)

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        """``q(W + s B A) - W``."""
        merged = w2.to(torch.float64) + self.scale * (self.lora_B.to(torch.float64) @ self.lora_A.to(torch.float64))
        return (lsq_quantize(merged, self.l4q_step, self.bits) - w2.to(torch.float64)).to(w2.dtype)


def make_delta(base: nn.Module, kind: str, cfg: L4qConfig, name: str, loading: bool = False,
               shared=None) -> L4qDelta:
    check_rank(base, kind, cfg.r, "default", name)
    return L4qDelta(base, kind, cfg, loading)


def expected_parameters(base: nn.Module, kind: str, cfg: L4qConfig, name: str) -> int:
    """``r (fan_in + out) + out`` per layer: A, B and one step per output row."""
    out, fan_in = out_in(base, kind)
    return cfg.r * (fan_in + out) + out


L4Q = register(Method(
    name="l4q", config_cls=L4qConfig,
    paper="L4Q: Parameter Efficient Quantization-Aware Training on LLMs via LoRA-wise LSQ",
    hook="weight", kinds=("linear", "conv1d_gpt2"), make_delta=make_delta, expected_parameters=expected_parameters,
    default_targets=DEFAULT_TARGETS, variants=[{"bits": 3, "r": 4}],
    identity_at_init=False,
    default_lr=3e-3,    # LoRA's rate; not yet swept here
))
