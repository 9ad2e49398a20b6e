"""Which adapters run: the active list (in order), the base model alone (``disabled``), and one
adapter per sample of a batch (``per_sample_adapters``)."""

from __future__ import annotations

import contextlib

from torch import nn

from .errors import DeltatuneError
from .matching import adapters, copies, wrappers
from .registry import get_method
from .wrapper import DeltaLayer


def _require(model: nn.Module, names: list[str]) -> None:
    known = adapters(model)
    for n in names:
        if n not in known:
            raise DeltatuneError(f"no adapter named {n!r}; attached: {', '.join(known) or 'none'}")


def set_active(model: nn.Module, names: list[str] | str) -> None:
    """Choose which named adapters run (in this order); [] runs the base model."""
    names = [names] if isinstance(names, str) else list(names)
    _require(model, names)
    for _, w in wrappers(model) + copies(model):
        w.active = [n for n in names if n in (w.deltas if isinstance(w, DeltaLayer) else w.copies)]
    model.__dict__["_deltatune_active"] = names


def active_adapters(model: nn.Module) -> list[str]:
    return list(model.__dict__.get("_deltatune_active", []))


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Run the plain base model inside the block."""
    merged = sorted({n for _, w in wrappers(model) for n in w.merged})
    if merged:
        raise DeltatuneError(f"adapters {merged} are merged into the base weights, so they cannot be "
                             f"disabled; call dt.unmerge(model) first")
    previous = active_adapters(model)
    set_active(model, [])
    try:
        yield model
    finally:
        set_active(model, previous)


@contextlib.contextmanager
def per_sample_adapters(model: nn.Module, names: list[str | None]):
    """Inside the block, sample ``i`` of the batch runs adapter ``names[i]`` (``None``: the base
    model). LoRA computes this in one batched pass per layer (each sample's factors gathered,
    then batched matrix products, in the spirit of punica's BGMV); other methods run one pass
    per distinct adapter over its samples."""
    names = list(names)
    _require(model, sorted({n for n in names if n is not None}))
    merged = sorted({n for _, w in wrappers(model) for n in w.merged})
    if merged:
        raise DeltatuneError(f"adapters {merged} are merged into the base weights; call dt.unmerge(model) "
                             f"before mixing adapters per sample")
    for n in {n for n in names if n is not None}:
        if not get_method(adapters(model)[n].method).per_sample_safe:
            raise DeltatuneError(f"adapter {n!r} ({adapters(model)[n].method}) "
                                 + ("changes the input sequence" if get_method(adapters(model)[n].method).changes_sequence
                                    else "cannot run on part of a batch") + " and cannot be mixed per sample")
    layers = wrappers(model) + copies(model)
    for _, w in layers:
        w.per_sample = names
    try:
        yield model
    finally:
        for _, w in layers:
            w.per_sample = None
