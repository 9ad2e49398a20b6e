"""OLoRA, from "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models" (Büyükakyüz, 2024).

LoRA's factors start from a QR decomposition of the frozen weight. On the 2-D view
``W (out, fan_in)``, with the thin ``W = Q R`` (``Q`` orthonormal columns, ``R`` upper triangular)::

    B0 = Q[:, :r]   (out, r),      A0 = R[:r, :]   (r, fan_in),

so ``B`` starts orthonormal and ``B0 A0 = Q_r Q_r^T W`` is W's projection onto the span of its
first r columns. The paper trains ``B, A`` from these values on the residual weight
``W - s B0 A0`` (``s = alpha / r``); here W is never modified: the frozen ``B0, A0`` are kept and
the layer computes ``W + s (B A - B0 A0)``, the same function with the same gradients, so the model
is unchanged at init. Trained: ``A`` and ``B``, ``r (fan_in + out)`` parameters per layer, as LoRA;
frozen: ``W``, ``B0``, ``A0``.

``B0, A0`` are regenerated from the frozen weight, not saved: non-persistent buffers computed at
attach and again at load (QR in float64, signs fixed so that ``diag(R) >= 0``: the same numbers
each time; on a quantised base, from the dequantised weight). The file holds ``A`` and ``B`` only,
and an adapter loads onto the base model it was trained on (as every adapter does).

Defaults are LoRA's (the paper keeps LoRA's hyper-parameters and changes only the start).
"""

from __future__ import annotations

from torch import nn

from ...core.config import BaseConfig, check_number, method_config
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import frozen_2d
from ._factor_inits import FrozenStartLora, check_layer, normalised_qr
from .lora import DEFAULT_TARGETS


@method_config
class OloraConfig(BaseConfig):
    """OLoRA. ``r`` the rank, ``alpha`` the scale numerator (``s = alpha / r``), ``dropout`` on the
    adapter's input."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def validate(self) -> None:
        check_number("r", self.r, kind=int, low=1, high=1 << 16)
        check_number("alpha", self.alpha, low=0, low_open=True)
        check_number("dropout", self.dropout, low=0, high=1, high_open=True)


def make_delta(base: nn.Module, kind: str, cfg: OloraConfig, name: str, loading: bool = False,
               shared=None) -> FrozenStartLora:
    check_layer(base, kind, cfg.r, "olora", name)
    delta = FrozenStartLora(base, kind, cfg.r, cfg.alpha / cfg.r, cfg.dropout, "olora", persistent=False)
    Q, R = normalised_qr(frozen_2d(base, kind).detach())
    # also when loading: B0, A0 are not in the file; the file's A, B then replace the start values
    delta.start(Q[:, :cfg.r], R[:cfg.r])
    return delta


def expected_parameters(base: nn.Module, kind: str, cfg: OloraConfig, name: str) -> int:
    """``r (fan_in + out)`` per layer: A and B."""
    out, fan_in = out_in(base, kind)
    return cfg.r * (fan_in + out)


OLORA = register(Method(
    name="olora", config_cls=OloraConfig, paper="OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models",
    hook="weight", kinds=("linear", "conv", "embedding", "conv1d_gpt2"), make_delta=make_delta,
    expected_parameters=expected_parameters, default_targets=DEFAULT_TARGETS,
    default_lr=1e-3,    # swept on BBC: 96.40 % at 1e-3, 95.95 % at LoRA's 3e-3, 91.44 % at 1e-2 (the paper trains as LoRA does)
))
