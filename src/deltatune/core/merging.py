"""Merging: folding adapters into the base weights (in the one order forward composes them),
restoring the weights exactly, and unloading every wrapper."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .activation import _require, active_adapters
from .errors import DeltatuneError
from .layers import from_2d, kind_of, to_2d
from .lifecycle import remove_shared
from .matching import adapters, walk, wrappers
from .registry import get_method
from .wrapper import DeltaLayer, ModuleCopies, stage


def merge(model: nn.Module, name: str | list[str] | None = None, quantized: str | None = None) -> nn.Module:
    """Fold the named (default: active) adapters into the base weights.

    The arithmetic runs in float64 and is cast back once. The base weights are copied first,
    so ``unmerge`` restores them bit-for-bit. A quantised base layer (``dt.quantize``) needs
    ``quantized="requantize"`` (stays quantised; the error is reported) or ``"dequantize"``
    (becomes a float layer).
    """
    names = active_adapters(model) if name is None else ([name] if isinstance(name, str) else list(name))
    _require(model, names)
    for n in names:
        method = get_method(adapters(model)[n].method)
        if not method.foldable:
            why = ("it changes the input sequence, not a layer's weights" if method.changes_sequence
                   else "its delta is not a function of the weights alone (e.g. a nonlinear bottleneck)")
            raise DeltatuneError(f"adapter {n!r} ({method.name}) cannot be merged into weights: {why}; keep it "
                                 f"unmerged (dt.unload(model, merge=False) removes it)")
    # Forward and merge compose in one order (wrapper.stage): parameter diffs, then input
    # transforms (IA3 on a feed-forward input, fed to the frozen layer only), then output deltas
    # in activation order, each reading the original input: W' = out_k(...out_1((W + dW) diag(l))).
    # A delta is folded only if no unmerged running delta acts at an earlier stage: that one
    # would otherwise apply on top of the folded delta in the forward (e.g. rescale its input).
    # Within stages 0 and 1 deltas commute (diffs add, input scalings multiply); output deltas
    # do not (a scaling after a low-rank update also scales the update), so their key is their
    # position in the activation order.
    def position(w: DeltaLayer, n: str) -> tuple[int, int]:
        s = stage(w.deltas[n])
        return s, (w.active.index(n) if n in w.active else len(w.active)) if s == 2 else 0

    plans = []
    for mod_name, w in wrappers(model):
        todo = [n for n in names if n in w.deltas and n not in w.merged]
        todo.sort(key=lambda n: position(w, n))
        left = [n for n in w.active if n in w.deltas and n not in w.merged and n not in todo]
        blocking = [n for n in left if todo and position(w, n) < max(position(w, t) for t in todo)]
        if blocking:
            raise DeltatuneError(f"{mod_name}: merging {', '.join(todo)} while {', '.join(blocking)} (which acts on the "
                                 f"layer before them) stays unmerged would change the outputs; merge them together "
                                 f"(dt.merge(model, [{', '.join(repr(n) for n in blocking + todo)}])) or deactivate "
                                 f"{', '.join(blocking)} first")
        if todo:
            plans.append((mod_name, w, todo))
    for _, w, _ in plans:       # e.g. a quantised layer without a merge policy: refuse before any change
        kind_of(w.base).check_store(w.base, quantized)
    lossy = {}
    for mod_name, w, todo in plans:
        kind = kind_of(w.base)
        if w.backup is None:
            w.backup = kind.backup(w.base)
        with torch.no_grad():
            weight, bias = kind.weight(w.base), getattr(w.base, "bias", None)
            w2 = to_2d(weight, w.kind).double()
            b = None if bias is None else bias.double()
            for n in todo:
                w2, b = w.deltas[n].merge(w2, b)
            w.base, lossy[mod_name] = kind.store(w.base, from_2d(w2, weight, w.kind), b, quantized)
        w.merged.extend(todo)
    lossy = [f"{n}: {e}" for n, e in lossy.items() if e is not None]
    if lossy:
        warnings.warn(f"dt.merge re-quantised {len(lossy)} layers ({'; '.join(lossy[:3])}{' ...' if len(lossy) > 3 else ''}); "
                      f"deltatune.quant.requantization_errors(model) lists each", stacklevel=2)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore every merged layer's base weight and bias exactly."""
    for _, w in wrappers(model):
        if w.backup is None:
            continue
        w.base = w.backup.restore(w.base)
        w.backup = None
        w.merged = []
    return model


def unload(model: nn.Module, merge: bool = True, quantized: str | None = None) -> nn.Module:
    """Remove every wrapper and return the plain model: with ``merge=True`` the active adapters
    (and their trainable modules) are folded in; with ``merge=False`` the original model."""
    if merge:
        globals()["merge"](model, quantized=quantized)
    else:
        unmerge(model)
    for n in list(adapters(model)):
        hook = get_method(adapters(model)[n].method).on_remove
        if hook is not None:
            hook(model, n)
        remove_shared(model, n)
    for _, module, parent, attr in list(walk(model)):
        if isinstance(module, DeltaLayer):
            setattr(parent, attr, module.base)
        elif isinstance(module, ModuleCopies):
            setattr(parent, attr, module.current() if merge else module.base)
    adapters(model).clear()
    model.__dict__["_deltatune_active"] = []
    return model
