"""BitFit, from "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
Language-models" (Ben Zaken, Ravfogel and Goldberg, 2022).

Only the bias terms of the frozen model train: every layer ``y = W x + b`` becomes
``y = W x + (b + Δb)`` with ``Δb`` starting at zero, so the model is unchanged at
initialisation. The paper trains every bias of a BERT encoder, the LayerNorms' included
(about 0.08 % of BERT-base's parameters), and matches full fine-tuning on GLUE at small data.

The deltas are diffs of existing parameters (the engine's parameter-subset hook,
``SubsetDelta``): the file holds ``Δb`` per layer, merge adds it to ``b``, and ``unload``
without merging gives back the base exactly. Parameter count: the bias's size per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.config import BaseConfig, method_config
from ...core.errors import DeltatuneError
from ...core.layers import layer_kind
from ...core.registry import Method, register
from ...core.wrapper import SubsetDelta

KINDS = ("linear", "conv", "conv1d_gpt2", "norm")


@method_config
class BitFitConfig(BaseConfig):
    """BitFit. ``targets=None``: every layer of a kind in ``KINDS`` that has a bias."""


def default_targets(model: nn.Module) -> list[str]:
    """Every module of a supported kind with a bias tensor, by its exact name."""
    from ...core.engine import unwrap, walk
    names = [n for n, m, _, _ in walk(model)
             if layer_kind(unwrap(m)) in KINDS and isinstance(getattr(unwrap(m), "bias", None), torch.Tensor)]
    if not names:
        raise DeltatuneError(f"bitfit: {type(model).__name__} has no bias terms to train (its layers were built "
                             f"with bias=False, as in Llama); use ln_tuning or a weight method such as lora")
    return names


def make_delta(base: nn.Module, kind: str, cfg: BitFitConfig, name: str, loading: bool = False) -> SubsetDelta:
    if not isinstance(getattr(base, "bias", None), torch.Tensor):
        raise DeltatuneError(f"bitfit: {name} ({type(base).__name__}) has no bias to train; narrow targets "
                             f"(targets=None picks every layer that has one)")
    return SubsetDelta(base, kind, ("bias",))


def expected_parameters(base: nn.Module, kind: str, cfg: BitFitConfig, name: str) -> int:
    return base.bias.numel()


BITFIT = register(Method(
    name="bitfit",
    config_cls=BitFitConfig,
    paper="BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models",
    hook="parameter subset",
    kinds=KINDS,
    make_delta=make_delta,
    expected_parameters=expected_parameters,
    default_targets=default_targets,
    default_lr=1e-3,    # the paper's range for BERT is 1e-4..1e-3; not yet swept here
))
