"""LoftQ, from "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models" (Li et al.,
2023).

QLoRA trains ``s B A`` on ``Q = quant(W)`` from ``B A = 0``, so fine-tuning starts from the
quantised model, ``quant(W)``'s error included. LoftQ chooses the quantised weight and the
starting factors together, to make ``Q + s B A`` close to ``W``, alternating ``T`` times (on the
2-D view ``W (out, fan_in)``, ``s = alpha / r``)::

    Q_t = quant(W - s B_{t-1} A_{t-1})          (B_0 A_0 = 0: Q_1 is QLoRA's base)
    s B_t A_t = SVD_r(W - Q_t)                   (the residual's best rank-r part)

with ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T``. ``quant`` is ``dt.quantize``'s
block-wise absmax scheme (``scheme``: NF4 or int8, blocks of 64). The layer then computes
``Q_T + s B A``: here as the weight delta ``dW = (Q_T - W) + s B A`` on the frozen float layer, so
that the function is LoftQ's exactly, and merging writes ``Q_T + s B A``. ``Q_T``'s codes and scales
are non-persistent buffers, recomputed from ``W`` at attach and at load (the alternation is
deterministic: float64 SVDs with fixed signs): the file holds ``A`` and ``B`` only. A model stored
quantised for its memory saving would hold ``Q_T`` instead of ``W``; this delta keeps ``W``
(attach it to a float base: on a ``dt.quantize`` base ``W`` is already ``quant(W)`` and LoftQ
has nothing to correct).

Parameters per layer: ``r (fan_in + out)``, as LoRA. Not the model at init (it is ``Q_T + s B0
A0``, nearer ``W`` than QLoRA's ``Q_1``). Defaults: rank 8 and alpha 16 as LoRA here, NF4,
``T = 1`` (the paper reports T = 1 to 5 close; 1 is its cheapest).
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.config import BaseConfig, check_number, check_choice, method_config
from ...core.errors import DeltatuneError
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import WeightDelta, frozen_2d
from ...quant.blockwise import SCHEMES, dequantize_tensor, quantize_tensor
from ..lowrank._factor_inits import normalised_svd
from ..lowrank.lora import DEFAULT_TARGETS
from ..lowrank.lora_init import check_rank
from ..spectral._svd import frozen, trained


@method_config
class LoftqConfig(BaseConfig):
    """LoftQ. ``r`` the rank, ``alpha`` the scale numerator, ``scheme`` the quantisation of W
    (``nf4`` or ``int8``), ``iters`` the number of alternations T."""

    r: int = 8
    alpha: float = 16.0
    scheme: str = "nf4"
    iters: int = 1

    def validate(self) -> None:
        check_number("r", self.r, kind=int, low=1, high=1 << 16)
        check_number("alpha", self.alpha, low=0, low_open=True)
        check_choice("scheme", self.scheme, SCHEMES)
        check_number("iters", self.iters, kind=int, low=1, high=100)


def alternate(w: torch.Tensor, r: int, scale: float, scheme: str, iters: int):
    """LoftQ's alternation on a 2-D float64 weight: ``(Q_T dequantised, B, A)``."""
    low_rank = torch.zeros_like(w)
    for _ in range(iters):
        q = dequantize_tensor(quantize_tensor(w - low_rank, scheme), torch.float64)
        U, S, Vh = normalised_svd(w - q)
        root = torch.sqrt(S[:r] / scale)
        B, A = U[:, :r] * root, root[:, None] * Vh[:r]
        low_rank = scale * B @ A
    return q, B, A


class LoftqDelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, cfg: LoftqConfig):
        super().__init__()
        self.bind(base)
        self.kind, self.scale = kind, cfg.alpha / cfg.r
        w = frozen_2d(base, kind).detach().double()
        q, B, A = alternate(w, cfg.r, self.scale, cfg.scheme, cfg.iters)
        frozen(self, "loftq_error", q - w, base)     # Q_T - W: rebuilt at load, never saved
        self.lora_B, self.lora_A = trained(B, base), trained(A, base)

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        """``(Q_T - W) + s B A``."""
        return self.loftq_error.to(w2.dtype) + self.scale * (self.lora_B.to(w2.dtype) @ self.lora_A.to(w2.dtype))


def make_delta(base: nn.Module, kind: str, cfg: LoftqConfig, name: str, loading: bool = False,
               shared=None) -> LoftqDelta:
    check_rank(base, kind, cfg.r, "default", name)
    if not isinstance(base.weight, nn.Parameter):
        raise DeltatuneError(f"loftq: {name} is stored quantised already (dt.quantize), so its float weight, which "
                             f"LoftQ quantises jointly with the factors, is gone; attach loftq to the float model")
    return LoftqDelta(base, kind, cfg)


def expected_parameters(base: nn.Module, kind: str, cfg: LoftqConfig, name: str) -> int:
    """``r (fan_in + out)`` per layer: A and B."""
    out, fan_in = out_in(base, kind)
    return cfg.r * (fan_in + out)


LOFTQ = register(Method(
    name="loftq", config_cls=LoftqConfig,
    paper="LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models",
    hook="weight", kinds=("linear", "conv1d_gpt2"), make_delta=make_delta, expected_parameters=expected_parameters,
    default_targets=DEFAULT_TARGETS, variants=[{"iters": 2}],     # int8: tests/test_quant_deltas.py (its error is too
    # small on the tiny conformance models for the suite's "changes the output at init" check)
    identity_at_init=False,
    default_lr=3e-3,    # LoRA's rate (the paper trains as LoRA does); not yet swept here
))
