"""Quantised frozen bases: ``dt.quantize(model, "nf4" | "int8", targets=...)`` (QLoRA's base);
trainable fixed point: ``dt.qfx`` (``qfx``), ``dt.qfx_export`` and ``integer_infer`` (``integer``),
on the HLS types of ``fixed_point``.

``quantize`` replaces the targeted ``nn.Linear`` modules, in place, by ``QuantLinear`` (block-wise
absmax, see ``blockwise``); any weight method then attaches on top (LoRA on an NF4 base is
QLoRA). Quantise before attaching adapters. Merging onto a quantised layer needs
``dt.merge(model, quantized="requantize" | "dequantize")``; after a re-quantising merge,
``requantization_errors(model)`` lists each layer's error.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..core.config import _pattern_list
from ..core.errors import DeltatuneError
from ..core.matching import adapters, match_modules, unwrap, walk
from ..core.wrapper import DeltaLayer, ModuleCopies
from .blockwise import BLOCK_SIZE, SCHEMES, QuantLinear, RequantizationError, nf4_levels
from .integer import IntegerResult, integer_infer, qfx_export
from .qfx import QfxConfig, qfx

__all__ = ["SCHEMES", "IntegerResult", "QfxConfig", "QuantLinear", "RequantizationError", "integer_infer", "nf4_levels",
           "qfx", "qfx_export", "quantize", "requantization_errors"]


@dataclasses.dataclass
class _Selection:
    """What ``match_modules`` reads of a config besides the targets."""
    exclude: list = dataclasses.field(default_factory=list)
    trainable_modules: list = dataclasses.field(default_factory=list)
    layers: list | None = None


def quantize(model: nn.Module, scheme: str, targets: list[str] | str | None = None) -> nn.Module:
    """Store the targeted Linear layers of ``model`` quantised (``scheme``: "nf4" or "int8"), in
    place; returns the model. ``targets`` are patterns as in a method config (default
    ``"all-linear"``: every ``nn.Linear`` except the output head, e.g. ``lm_head``/``classifier``)."""
    if scheme not in SCHEMES:
        raise DeltatuneError(f"quantisation scheme {scheme!r} is not known: use one of {', '.join(SCHEMES)}")
    attached = list(adapters(model)) or [n for n, m in model.named_modules() if isinstance(m, (DeltaLayer, ModuleCopies))]
    if attached:
        raise DeltatuneError(f"adapters are attached ({', '.join(attached[:3])}): quantize the base model first, then "
                             f"attach (dt.unload(model, merge=False) removes them)")
    patterns = ["all-linear"] if targets is None else _pattern_list(targets, "targets")
    if not patterns:
        raise DeltatuneError("targets is an empty list: give at least one pattern, or None for every Linear layer")
    found = match_modules(model, _Selection(), patterns)
    if targets is None:     # "all-linear" also matches GPT-2's Conv1D, which is not stored quantised
        found = [e for e in found if isinstance(unwrap(e.module), (nn.Linear, QuantLinear))]
    done = [e.name for e in found if isinstance(unwrap(e.module), QuantLinear)]
    if done:
        raise DeltatuneError(f"{', '.join(done[:5])}{' ...' if len(done) > 5 else ''}: already quantised; quantize "
                             f"each layer once (pass targets= to quantise only the others)")
    other = [f"{e.name} ({type(e.module).__name__})" for e in found if not isinstance(e.module, nn.Linear)]
    if other or not found:
        raise DeltatuneError(f"dt.quantize stores nn.Linear layers only; {', '.join(other[:5]) or 'this model has none'}"
                             f"{' is' if len(other) == 1 else ' are' if other else ''}: narrow targets")
    for entry in found:
        setattr(entry.parent, entry.attr, QuantLinear.from_linear(entry.module, scheme, BLOCK_SIZE))
    return model


def requantization_errors(model: nn.Module) -> dict[str, RequantizationError]:
    """Each layer re-quantised by ``dt.merge(..., quantized="requantize")``: its error record."""
    return {n: unwrap(m).requantization_error for n, m, _, _ in walk(model)
            if isinstance(unwrap(m), QuantLinear) and unwrap(m).requantization_error is not None}
