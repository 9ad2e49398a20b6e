"""LN tuning, from "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM
Finetuning" (Zhao et al., 2023).

Only the normalisation layers train: each LayerNorm / RMSNorm ``y = γ ⊙ n(x) + β`` computes with
``γ + Δγ`` and ``β + Δβ`` (``Δ`` starting at zero, so the model is unchanged at
initialisation). The paper reports that tuning LayerNorm alone reaches most of full
fine-tuning's quality with a tiny fraction of its parameters (about 0.004 % of a 7B model).

BatchNorm is left out on purpose: its running statistics change whenever the model trains in
training mode, so it cannot be a frozen base with a small delta. The deltas are diffs of the
layers' own parameters (the engine's parameter-subset hook, ``SubsetDelta``); merge adds them.
Parameter count: the size of ``γ`` (and of ``β`` where the layer has one) per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.config import BaseConfig, method_config
from ...core.errors import DeltatuneError
from ...core.layers import layer_kind
from ...core.registry import Method, register
from ...core.wrapper import SubsetDelta


def _tunable(module: nn.Module) -> bool:
    return layer_kind(module) == "norm" and not isinstance(module, nn.modules.batchnorm._BatchNorm)


@method_config
class LNTuningConfig(BaseConfig):
    """LN tuning. ``targets=None``: every LayerNorm / RMSNorm / GroupNorm of the model."""


def default_targets(model: nn.Module) -> list[str]:
    from ...core.engine import unwrap, walk
    names = [n for n, m, _, _ in walk(model) if _tunable(unwrap(m))]
    if not names:
        raise DeltatuneError(f"ln_tuning: {type(model).__name__} has no LayerNorm or RMSNorm layers to train "
                             f"(BatchNorm is left out: its running statistics are not a frozen base)")
    return names


def _names(base: nn.Module) -> tuple[str, ...]:
    return tuple(n for n in ("weight", "bias") if isinstance(getattr(base, n, None), torch.Tensor))


def make_delta(base: nn.Module, kind: str, cfg: LNTuningConfig, name: str, loading: bool = False) -> SubsetDelta:
    if not _tunable(base) or not _names(base):
        raise DeltatuneError(f"ln_tuning: {name} ({type(base).__name__}) is not a LayerNorm / RMSNorm with "
                             f"affine parameters; narrow targets (targets=None picks every one)")
    return SubsetDelta(base, kind, _names(base))


def expected_parameters(base: nn.Module, kind: str, cfg: LNTuningConfig, name: str) -> int:
    return sum(getattr(base, n).numel() for n in _names(base))


LN_TUNING = register(Method(
    name="ln_tuning",
    config_cls=LNTuningConfig,
    paper="Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning",
    hook="parameter subset",
    kinds=("norm",),
    make_delta=make_delta,
    expected_parameters=expected_parameters,
    default_targets=default_targets,
    default_lr=1e-3,    # not yet swept here
))
