"""An adapter's life: plan (build every delta without touching the model), install, attach, delete.

Each attached adapter may also own one *adapter-level* module for state shared across its layers
(``Method.shared_state``: VeRA's random bases, routers, side networks). It lives in the model at
``deltatune_shared.<adapter>``, so it moves with ``model.to(...)``, is listed once by
``model.parameters()`` and saved once, under ``shared.`` keys; a buffer there is *regenerated*
(``persistent=False``, rebuilt from the config's seed) or *saved* (persistent).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import NamedTuple

import torch
from torch import nn

from .config import BaseConfig
from .errors import DeltatuneError
from .layers import layer_kind
from .matching import _closest, _under, adapters, copies, match_modules, match_pattern, resolve_targets, \
    unwrap, walk, wrappers
from .registry import Method, get_method
from ..kernels import SHARED_INPUT_SETS, SharedInput
from .wrapper import BiasDelta, DeltaLayer, ModuleCopies

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
SHARED = "deltatune_shared"     # the root model's child holding adapter-level modules


class PlannedDelta(NamedTuple):
    name: str
    module: nn.Module       # the module to wrap (or its existing wrapper)
    parent: nn.Module
    attr: str
    kind: str
    delta: nn.Module


class PlannedCopy(NamedTuple):
    name: str
    module: nn.Module
    parent: nn.Module
    attr: str
    copy: nn.Module


@dataclasses.dataclass
class Plan:
    """What attach will do, built without touching the model so that errors change nothing."""
    name: str
    method: Method
    cfg: BaseConfig
    deltas: list[PlannedDelta]
    copies: list[PlannedCopy]
    shared: nn.Module | None = None


class SharedStates(nn.ModuleDict):
    """Adapter name -> that adapter's adapter-level module (see the module docstring)."""

    def forward(self, x):       # a root nn.Sequential runs every child, this holder included
        return x


def shared_state(model: nn.Module, name: str) -> nn.Module | None:
    holder = getattr(model, SHARED, None)
    return holder[name] if isinstance(holder, SharedStates) and name in holder else None


def _check_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise DeltatuneError(f"adapter name {name!r} is not valid: use letters, digits, '_' or '-', "
                             f"not starting with a digit")
    if name in adapters(model):
        raise DeltatuneError(f"an adapter named {name!r} is already attached; pick another name "
                             f"or call dt.delete_adapter(model, {name!r}) first")


def plan(model: nn.Module, cfg: BaseConfig, name: str, loading: bool = False,
         exact: list[str] | None = None) -> Plan:
    """Build the deltas ``attach`` would install. ``exact``: wrap exactly these module names
    (used when loading a file, which records the modules it was trained on)."""
    if not isinstance(cfg, BaseConfig):
        raise DeltatuneError(f"expected a config from dt.config(...), got {type(cfg).__name__}")
    _check_name(model, name)
    method = get_method(cfg.method)
    if exact is None:
        matched = match_modules(model, cfg, resolve_targets(model, method, cfg))
    else:
        by_name = {e.name: e for e in walk(model)}
        absent = [n for n in exact if n not in by_name]
        if absent:
            raise DeltatuneError(f"modules {absent[:5]} do not exist in {type(model).__name__}. Closest: "
                                 f"{_closest(model, absent[:3])}")
        matched = [by_name[n] for n in exact]
    shared = method.shared_state(model, cfg) if method.shared_state is not None else None
    extra = {"shared": shared} if shared is not None else {}
    planned, unsupported = [], []
    for e in matched:
        base = unwrap(e.module)
        kind = layer_kind(base) or "block"
        if kind not in method.kinds:
            unsupported.append(f"{e.name} ({type(base).__name__})")
            continue
        planned.append(PlannedDelta(*e, kind, method.make_delta(base, kind, cfg, e.name, loading, **extra)))
    if getattr(cfg, "bias", "none") == "all":
        planned.extend(_bias_deltas(model, cfg, {p.name for p in planned}))
    if unsupported:
        raise DeltatuneError(
            f"{method.name} cannot wrap {', '.join(unsupported[:8])}{' ...' if len(unsupported) > 8 else ''}: "
            f"it applies to layer kinds {', '.join(method.kinds)}. Narrow targets or add these to exclude")
    planned_copies = []
    for pattern in cfg.trainable_modules:
        hits = [e for e in walk(model) if match_pattern(e.name, e.module, pattern)
                and not isinstance(e.parent, (DeltaLayer, ModuleCopies))]
        if not hits:
            raise DeltatuneError(f"trainable_modules entry {pattern!r} matched no module. Closest: "
                                 f"{_closest(model, [pattern])}")
        for e in hits:
            if isinstance(e.module, DeltaLayer):
                raise DeltatuneError(f"trainable_modules entry {e.name!r} is wrapped by a method; a module "
                                     f"cannot be both a target and a trainable module")
            planned_copies.append(PlannedCopy(*e, copy.deepcopy(unwrap(e.module))))
    return Plan(name, method, cfg, planned, planned_copies, shared)


def _bias_deltas(model: nn.Module, cfg: BaseConfig, taken: set[str]) -> list[PlannedDelta]:
    """``bias="all"``: every other layer with a bias gets a trainable bias shift."""
    found = []
    for e in walk(model):
        base = unwrap(e.module)
        bias = getattr(base, "bias", None)
        kind = layer_kind(base)
        if e.name in taken or kind is None or not isinstance(bias, torch.Tensor):
            continue
        if _under(e.name, cfg.exclude + cfg.trainable_modules):
            continue
        found.append(PlannedDelta(*e, kind, BiasDelta(bias.shape[0], kind)))
    return found


def _follow_mode(container: nn.Module, inner: nn.Module) -> None:
    """Give a new wrapper (and its module dicts) the mode of the module it wraps, without
    touching the modes inside that module."""
    inner_modules = set(map(id, inner.modules()))
    for m in container.modules():
        if id(m) not in inner_modules:
            m.training = inner.training


def _group_shared_inputs(model: nn.Module) -> None:
    """Link sibling wrappers that read the same input (q/k/v, gate/up: SHARED_INPUT_SETS) so their
    deltas can be computed in one pass over it. Only a speed-up: see SharedInput."""
    for parent in model.modules():
        children = {n: c for n, c in parent.named_children() if isinstance(c, DeltaLayer)}
        for names in SHARED_INPUT_SETS:
            layers = [children[n] for n in sorted(names) if n in children]
            same = len({(layer.kind, getattr(layer.base, "in_features", None)) for layer in layers}) == 1
            group = SharedInput(layers) if len(layers) > 1 and same and layers[0].kind == "linear" else None
            for layer in layers:
                layer.shared = group


def _device(module: nn.Module) -> torch.device | None:
    # a quantised layer holds its weight in buffers (codes, scales), possibly with no parameter
    p = next(iter(module.parameters()), None)
    p = next(iter(module.buffers()), None) if p is None else p
    return None if p is None else p.device


def install(model: nn.Module, p: Plan, trainable: bool) -> None:
    from .activation import set_active
    for d in p.deltas:
        wrapper = d.module if isinstance(d.module, DeltaLayer) else DeltaLayer(d.module, d.kind)
        device = _device(wrapper.base)
        if device is not None:
            d.delta.to(device=device)
        wrapper.deltas[p.name] = d.delta
        if wrapper is not d.module:
            _follow_mode(wrapper, d.module)
            setattr(d.parent, d.attr, wrapper)
        d.delta.train(model.training)     # a new delta follows the model's mode (no dropout in eval)
    for c in p.copies:
        holder = c.module if isinstance(c.module, ModuleCopies) else ModuleCopies(c.module)
        holder.copies[p.name] = c.copy
        if holder is not c.module:
            _follow_mode(holder, c.module)
            setattr(c.parent, c.attr, holder)
        c.copy.train(model.training)
    if p.shared is not None:
        if not isinstance(getattr(model, SHARED, None), SharedStates):
            model.add_module(SHARED, SharedStates())
        device = _device(p.deltas[0].module) if p.deltas else None
        getattr(model, SHARED)[p.name] = p.shared.to(device) if device is not None else p.shared
        p.shared.train(model.training)
    adapters(model)[p.name] = p.cfg
    _group_shared_inputs(model)
    for param in model.parameters():
        param.requires_grad_(False)
    if trainable:
        for param in adapter_parameters(model, p.name):
            param.requires_grad_(True)
    if p.method.on_attach is not None:
        p.method.on_attach(model, p.name)
    set_active(model, [p.name])


def attach(model: nn.Module, cfg: BaseConfig, name: str = "default") -> nn.Module:
    """Wrap the modules ``cfg`` targets with a new adapter called ``name``, in place.

    Everything but the new adapter's deltas and trainable modules is frozen, and the new
    adapter becomes the active one. Nothing is changed if any check fails.
    """
    install(model, plan(model, cfg, name), trainable=True)
    return model


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    params = []
    for _, w in wrappers(model):
        if name in w.deltas:
            params.extend(w.deltas[name].parameters())
    for _, c in copies(model):
        if name in c.copies:
            params.extend(c.copies[name].parameters())
    shared = shared_state(model, name)
    if shared is not None:
        params.extend(shared.parameters())
    return list({id(p): p for p in params}.values())


def remove_shared(model: nn.Module, name: str) -> None:
    holder = getattr(model, SHARED, None)
    if isinstance(holder, SharedStates) and name in holder:
        del holder[name]
        if not len(holder):
            delattr(model, SHARED)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``: its deltas, its trainable module copies and its hooks."""
    from .activation import _require, active_adapters
    _require(model, [name])
    if any(name in w.merged for _, w in wrappers(model)):
        raise DeltatuneError(f"adapter {name!r} is merged; call dt.unmerge(model) before deleting it")
    method = get_method(adapters(model)[name].method)
    if method.on_remove is not None:
        method.on_remove(model, name)
    for e in list(walk(model)):
        holder = e.module.deltas if isinstance(e.module, DeltaLayer) else \
            e.module.copies if isinstance(e.module, ModuleCopies) else None
        if holder is not None and name in holder:
            del holder[name]
            e.module.active = [n for n in e.module.active if n != name]
            if not len(holder):
                setattr(e.parent, e.attr, e.module.base)
    remove_shared(model, name)
    del adapters(model)[name]
    model.__dict__["_deltatune_active"] = [n for n in active_adapters(model) if n != name]
    _group_shared_inputs(model)

