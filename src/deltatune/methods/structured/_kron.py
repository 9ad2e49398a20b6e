"""What the structured products (lokr, loha, flora_tucker, fourierft) share: the attach-time check of
a layer they cannot run on, the He-uniform initialisation the LyCORIS products use, and the
validation of a rank and its scale numerator."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...core.config import check_number
from ...core.errors import DeltatuneError


def check_layer(base: nn.Module, kind: str, method: str, name: str) -> None:
    """A product delta runs through the layer's own operation with weight ΔW (core.weights.apply_2d),
    which has no circular or reflect padding: say so at attach, not at the first forward."""
    if kind == "conv" and base.padding_mode != "zeros":
        raise DeltatuneError(f"{method} cannot wrap {name!r}: it is a convolution with "
                             f"padding_mode={base.padding_mode!r}, and weight deltas support zero padding only; "
                             f"exclude it from targets")


def he_uniform_(p: torch.Tensor) -> torch.Tensor:
    """Kaiming-uniform with a = sqrt(5) (bound 1 / sqrt(fan_in), fan_in = the last dimension's size),
    the initialisation LyCORIS and PEFT give the non-zero factors of LoKr and LoHa."""
    return nn.init.kaiming_uniform_(p, a=math.sqrt(5))


def check_rank_alpha(r: int, alpha: float) -> None:
    check_number("r", r, kind=int, low=1, high=1 << 16)
    check_number("alpha", alpha, low=0, low_open=True)
