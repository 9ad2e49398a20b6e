"""HiRA, from "HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language Models"
(Huang et al., 2025).

The update is the frozen weight modulated entry by entry by a low-rank product::

    W' = W + ΔW,    ΔW = W ⊙ (B A)

on the 2-D view ``W (out, fan_in)``, with ``A (r, fan_in)`` and ``B (out, r)`` trained and ``W`` frozen.
``rank(W ⊙ BA) <= rank(W) rank(BA)``, so the update is high-rank although only ``r (out + fan_in)``
parameters per layer are trained, LoRA's count at rank ``r``. ``A`` starts Kaiming-uniform (bound
``1 / sqrt(fan_in)``, as LoRA) and ``B`` at zero, so the model is unchanged at initialisation; on an
Embedding the roles swap (``A`` zero, ``B`` standard normal, as LoRA's embedding), so that the
gradient still reaches both. No scale factor: ``W`` itself sets the update's size.

The forward builds ``ΔW`` from the frozen weight (there is no low-rank shortcut through a Hadamard
product); merge folds the same ``ΔW``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...core.config import BaseConfig, check_number, method_config
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import WeightDelta, weight_dtype
from ..lowrank.lora import DEFAULT_TARGETS
from ._blocks import check_padding


@method_config
class HiraConfig(BaseConfig):
    """HiRA. ``r`` the rank of the factors ``B A`` that modulate the frozen weight."""

    r: int = 32

    def validate(self) -> None:
        check_number("r", self.r, kind=int, low=1)


class HiraDelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, cfg: HiraConfig, name: str):
        super().__init__()
        check_padding(base, kind, "hira", name)
        self.bind(base)
        self.kind = kind
        out, fan_in = out_in(base, kind)
        like = weight_dtype(base)
        self.hira_A = nn.Parameter(torch.zeros(cfg.r, fan_in, **like))
        self.hira_B = nn.Parameter(torch.zeros(out, cfg.r, **like))
        with torch.no_grad():
            if kind == "embedding":
                self.hira_B.normal_()
            else:
                nn.init.kaiming_uniform_(self.hira_A, a=math.sqrt(5))

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        return w2 * (self.hira_B.to(w2.dtype) @ self.hira_A.to(w2.dtype))


def make_delta(base: nn.Module, kind: str, cfg: HiraConfig, name: str, loading: bool = False,
               shared: None = None) -> HiraDelta:
    return HiraDelta(base, kind, cfg, name)


def expected_parameters(base: nn.Module, kind: str, cfg: HiraConfig, name: str) -> int:
    """``r (out + fan_in)`` per layer."""
    out, fan_in = out_in(base, kind)
    return cfg.r * (out + fan_in)


HIRA = register(Method(
    name="hira", config_cls=HiraConfig,
    paper="HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language Models",
    hook="weight", kinds=("linear", "conv", "embedding", "conv1d_gpt2"), make_delta=make_delta,
    expected_parameters=expected_parameters, default_targets=DEFAULT_TARGETS,
    default_lr=3e-3))   # BBC sweep (docs/results/README.md): above the probe at 3e-3 and 3e-2, tied at 1e-2
