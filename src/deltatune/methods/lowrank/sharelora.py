"""ShareLoRA, from "ShareLoRA: Parameter Efficient and Robust Large Language Model Fine-tuning via
Shared Low-Rank Adaptation" (Song, Zhao, Liu and Yoneda, 2024).

LoRA with a factor shared across the layers of one projection type: every layer's query projection
uses the same ``A``, every value projection another, and each layer keeps its own ``B``::

    ΔW_ℓ = (alpha / r) B_ℓ A_type(ℓ)            (share="A", the paper's main variant)

``share="B"`` shares ``B`` instead (``ΔW_ℓ = s B_type A_ℓ``), ``share="AB"`` both (every layer of a
type gets the same update). A projection type is the layer's name without its layer indices
(``encoder.layer.3.attention.self.query`` -> ``encoder.layer.attention.self.query``), with the
factor's shape: layers of a type with different shapes cannot share one matrix, and get one each.

Everything is trained; nothing is frozen but the model. The shared factors are parameters of the
adapter-level module (one per projection type, listed once by ``model.parameters()``, saved once
under ``shared.`` keys); the per-layer factors are the deltas' own. Initialisation is LoRA's:
``A`` Kaiming-uniform (``|A| <= 1/sqrt(fan_in)``), ``B = 0``, so the model is unchanged at
initialisation. Parameter count (share="A"): ``out r`` per layer plus ``r fan_in`` once per
projection type (share="B": ``r fan_in`` per layer plus ``out r`` per type; "AB": both per type).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ...core.config import BaseConfig, check_choice, check_number, method_config
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import WeightDelta, weight_dtype
from .lora import DEFAULT_TARGETS

SHARE = ("A", "B", "AB")


@method_config
class ShareLoraConfig(BaseConfig):
    """ShareLoRA. ``r`` rank, ``alpha`` scale numerator (``alpha / r``), ``share`` which factor is
    shared across the layers of a projection type: "A" (the paper's), "B" or "AB"."""

    r: int = 8
    alpha: float = 16.0
    share: str = "A"

    def validate(self) -> None:
        check_number("r", self.r, kind=int, low=1, high=1 << 16)
        check_number("alpha", self.alpha, low=0, low_open=True)
        check_choice("share", self.share, SHARE)


def projection_type(name: str) -> str:
    """The module name without its layer indices, as a parameter name (dots are not allowed there)."""
    return "__".join(part for part in name.split(".") if not part.isdigit())


def kaiming(t: torch.Tensor) -> torch.Tensor:
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class SharedFactors(nn.Module):
    """The adapter-level module: one trained factor per (factor, projection type, shape)."""

    def factor(self, which: str, role: str, shape: tuple[int, int], like: dict,
               init: Callable[[torch.Tensor], torch.Tensor]) -> str:
        key = f"{which}__{role}__{shape[0]}x{shape[1]}"
        if key not in self._parameters:
            self.register_parameter(key, nn.Parameter(init(torch.empty(shape, **like))))
        return key


class ShareLoraDelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, cfg: ShareLoraConfig, name: str, shared: SharedFactors):
        super().__init__()
        self.kind = kind
        self.bind(base)
        out, fan_in = out_in(base, kind)
        like = weight_dtype(base)
        role = projection_type(name)
        self.scale = cfg.alpha / cfg.r
        # a plain reference, not a submodule: the shared factors belong to the adapter, listed once
        self.__dict__["shared"] = shared
        self.key_A = self.key_B = None
        if "A" in cfg.share:
            self.key_A = shared.factor("A", role, (cfg.r, fan_in), like, kaiming)
            self.register_parameter("lora_A", None)
        else:
            self.lora_A = nn.Parameter(kaiming(torch.empty(cfg.r, fan_in, **like)))
        if "B" in cfg.share:
            self.key_B = shared.factor("B", role, (out, cfg.r), like, nn.init.zeros_)
            self.register_parameter("lora_B", None)
        else:
            self.lora_B = nn.Parameter(torch.zeros(out, cfg.r, **like))

    @property
    def A(self) -> torch.Tensor:
        return self.lora_A if self.key_A is None else self.shared.get_parameter(self.key_A)

    @property
    def B(self) -> torch.Tensor:
        return self.lora_B if self.key_B is None else self.shared.get_parameter(self.key_B)

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        return self.scale * (self.B.to(w2.dtype) @ self.A.to(w2.dtype))


def make_delta(base: nn.Module, kind: str, cfg: ShareLoraConfig, name: str, loading: bool = False,
               shared: SharedFactors | None = None) -> ShareLoraDelta:
    return ShareLoraDelta(base, kind, cfg, name, shared)


def expected_parameters(base: nn.Module, kind: str, cfg: ShareLoraConfig, name: str) -> int:
    """The layer's own factors: ``out r`` with share="A", ``r fan_in`` with "B", none with "AB"
    (the shared ones, counted once per projection type, are the adapter-level module's)."""
    out, fan_in = out_in(base, kind)
    return ("A" not in cfg.share) * cfg.r * fan_in + ("B" not in cfg.share) * out * cfg.r


SHARELORA = register(Method(
    name="sharelora",
    config_cls=ShareLoraConfig,
    paper="ShareLoRA: Parameter Efficient and Robust Large Language Model Fine-tuning via Shared Low-Rank Adaptation",
    hook="weight",
    # one Embedding per model: nothing to share a factor with
    kinds=("linear", "conv", "conv1d_gpt2"),
    make_delta=make_delta,
    expected_parameters=expected_parameters,
    default_targets=DEFAULT_TARGETS,
    shared_state=lambda model, cfg: SharedFactors(),
    variants=[{"share": "B"}, {"share": "AB"}],
    default_lr=3e-3,    # from the paper's recipe (LoRA's rates); not yet swept here
))
