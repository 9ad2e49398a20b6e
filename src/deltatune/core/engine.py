"""The engine: matching, wrapping, freezing, naming, activation and merging.

Methods never do any of this themselves; they only build a delta for one layer.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import re
from typing import Any, Iterator

import torch
from torch import nn

from .config import BaseConfig
from .errors import DeltatuneError
from .layers import layer_kind
from .registry import Method, get_method
from .wrapper import SHARED_INPUT_SETS, DeltaLayer, ModuleCopies, SharedInput, stage

_ADAPTERS = "_deltatune_adapters"      # plain attribute on the root model: name -> config
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_OUTPUT_HEADS = ("lm_head", "classifier", "score", "cls", "head", "output_projection")


# ----------------------------------------------------------------------------- naming

def walk(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module | None, str]]:
    """Yield (logical name, module, parent, attribute name) for every module of the model as
    it was before wrapping: a wrapper stands for the module it wraps, and its deltas and
    copies are not listed."""

    def rec(prefix: str, module: nn.Module) -> Iterator:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            yield name, child, module, child_name
            inner = child.base if isinstance(child, (DeltaLayer, ModuleCopies)) else child
            yield from rec(name, inner)

    yield from rec("", model)


def adapters(model: nn.Module) -> dict[str, BaseConfig]:
    """The named adapters attached to ``model``: name -> config."""
    return model.__dict__.setdefault(_ADAPTERS, {})


def wrappers(model: nn.Module) -> list[tuple[str, DeltaLayer]]:
    return [(n, m) for n, m, _, _ in walk(model) if isinstance(m, DeltaLayer)]


def copies(model: nn.Module) -> list[tuple[str, ModuleCopies]]:
    return [(n, m) for n, m, _, _ in walk(model) if isinstance(m, ModuleCopies)]


def unwrap(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, (DeltaLayer, ModuleCopies)) else module


# ----------------------------------------------------------------------------- matching

def layer_index(name: str) -> int | None:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def match_pattern(name: str, module: nn.Module | None, pattern: str) -> bool:
    """One target pattern against one logical module name (and module, for type patterns)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if pattern.startswith("type:"):
        return module is not None and type(unwrap(module)).__name__ == pattern[5:]
    if pattern == "all-linear":
        return module is not None and layer_kind(unwrap(module)) in ("linear", "conv1d_gpt2")
    return name == pattern or name.endswith("." + pattern)


def pattern_value(name: str, patterns: dict[str, Any], default: Any) -> Any:
    """Per-layer override (e.g. ``rank_pattern``): the value of the first matching pattern."""
    for pattern, value in patterns.items():
        if match_pattern(name, None, pattern):
            return value
    return default


def _under(name: str, patterns: list[str]) -> bool:
    """Whether ``name`` or one of its parents matches a pattern (exclusions cover children)."""
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(match_pattern(n, None, p) for n in prefixes for p in patterns if not p.startswith("type:"))


def model_type(model: nn.Module) -> str | None:
    """The transformers ``model_type`` of the first submodule with a config (``None``: no config);
    what default targets and per-architecture learning rates are keyed by."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "model_type", None):
            return cfg.model_type
    return None


def _output_head_names(model: nn.Module) -> set[str]:
    names = set()
    for m in model.modules():
        get = getattr(m, "get_output_embeddings", None)
        if callable(get):
            try:
                head = get()
            except (NotImplementedError, AttributeError):
                head = None
            if head is not None:
                for n, mod, _, _ in walk(model):
                    if unwrap(mod) is head:
                        names.add(n)
    return names


def resolve_targets(model: nn.Module, method: Method, cfg: BaseConfig) -> list[str]:
    if cfg.targets is not None:
        return cfg.targets
    defaults = method.default_targets
    if callable(defaults):
        return defaults(model)
    kind = model_type(model)
    if kind in defaults:
        return defaults[kind]
    known = ", ".join(sorted(defaults)) or "none"
    raise DeltatuneError(
        f"{method.name}: no default targets for model type {kind!r} (defaults exist for: {known}); "
        f"pass targets=[...] (see `deltatune inspect` for the module names)")


def _closest(model: nn.Module, patterns: list[str]) -> str:
    names = [n for n, _, _, _ in walk(model)]
    suffixes = sorted({n.split(".")[-1] for n in names})
    hints = []
    for p in patterns:
        key = p[3:] if p.startswith("re:") else p
        close = difflib.get_close_matches(key, suffixes, n=5, cutoff=0.3) or \
            difflib.get_close_matches(key, names, n=5, cutoff=0.3)
        hints.extend(close)
    if not hints:
        hints = suffixes[:10]
    return ", ".join(dict.fromkeys(hints))


def match_modules(model: nn.Module, cfg: BaseConfig, targets: list[str],
                  skip_heads: bool = True) -> list[tuple[str, nn.Module, nn.Module, str]]:
    heads = _output_head_names(model) if "all-linear" in targets else set()
    found = []
    for name, module, parent, attr in walk(model):
        if isinstance(module, ModuleCopies):
            continue
        if not any(match_pattern(name, module, p) for p in targets):
            continue
        if any(match_pattern(name, module, p) for p in cfg.exclude if p.startswith("type:")) \
                or _under(name, cfg.exclude + cfg.trainable_modules):
            continue
        if "all-linear" in targets and not any(match_pattern(name, module, p) for p in targets if p != "all-linear"):
            if name in heads or name.split(".")[-1] in _OUTPUT_HEADS:
                continue
        if cfg.layers is not None and layer_index(name) not in cfg.layers:
            continue
        found.append((name, module, parent, attr))
    if not found:
        what = f"targets {targets}" + (f" within layers {cfg.layers}" if cfg.layers is not None else "")
        raise DeltatuneError(
            f"{what} matched no module of {type(model).__name__}. Closest module names: "
            f"{_closest(model, targets)}. Targets match an exact name, a dotted suffix, 're:<regex>', "
            f"'type:<Class>' or 'all-linear'")
    return found


# ----------------------------------------------------------------------------- attach

@dataclasses.dataclass
class Plan:
    """What attach will do, built without touching the model so that errors change nothing."""
    name: str
    method: Method
    cfg: BaseConfig
    deltas: list[tuple[str, nn.Module, nn.Module, str, str, nn.Module]]  # name, target, parent, attr, kind, delta
    copies: list[tuple[str, nn.Module, nn.Module, str, nn.Module]]       # name, module, parent, attr, copy


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
        by_name = {n: (n, m, p, a) for n, m, p, a in walk(model)}
        absent = [n for n in exact if n not in by_name]
        if absent:
            raise DeltatuneError(f"modules {absent[:5]} do not exist in {type(model).__name__}. Closest: "
                                 f"{_closest(model, absent[:3])}")
        matched = [by_name[n] for n in exact]
    planned = []
    unsupported = []
    for mod_name, module, parent, attr in matched:
        base = unwrap(module)
        kind = layer_kind(base)
        if kind not in method.kinds:
            unsupported.append(f"{mod_name} ({type(base).__name__})")
            continue
        delta = method.make_delta(base, kind, cfg, mod_name, loading)
        planned.append((mod_name, module, parent, attr, kind, delta))
    if getattr(cfg, "bias", "none") == "all":
        planned.extend(_bias_deltas(model, cfg, {n for n, *_ in planned}))
    if unsupported:
        raise DeltatuneError(
            f"{method.name} cannot wrap {', '.join(unsupported[:8])}{' ...' if len(unsupported) > 8 else ''}: "
            f"it applies to layer kinds {', '.join(method.kinds)}. Narrow targets or add these to exclude")
    planned_copies = []
    if cfg.trainable_modules:
        for pattern in cfg.trainable_modules:
            hits = [(n, m, p, a) for n, m, p, a in walk(model) if match_pattern(n, m, pattern)
                    and not isinstance(p, (DeltaLayer, ModuleCopies))]
            if not hits:
                raise DeltatuneError(f"trainable_modules entry {pattern!r} matched no module. Closest: "
                                     f"{_closest(model, [pattern])}")
            for n, m, p, a in hits:
                if isinstance(m, DeltaLayer):
                    raise DeltatuneError(f"trainable_modules entry {n!r} is wrapped by a method; a module "
                                         f"cannot be both a target and a trainable module")
                original = unwrap(m)
                dup = copy.deepcopy(original)
                planned_copies.append((n, m, p, a, dup))
    return Plan(name, method, cfg, planned, planned_copies)


def _bias_deltas(model: nn.Module, cfg: BaseConfig, taken: set[str]) -> list:
    """``bias="all"``: every other layer with a bias gets a trainable bias shift."""
    from .wrapper import BiasDelta
    found = []
    for mod_name, module, parent, attr in walk(model):
        base = unwrap(module)
        bias = getattr(base, "bias", None)
        kind = layer_kind(base)
        if mod_name in taken or kind is None or not isinstance(bias, torch.Tensor):
            continue
        if _under(mod_name, cfg.exclude + cfg.trainable_modules):
            continue
        found.append((mod_name, module, parent, attr, kind, BiasDelta(bias.shape[0], kind)))
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


def install(model: nn.Module, p: Plan, trainable: bool) -> None:
    for mod_name, module, parent, attr, kind, delta in p.deltas:
        wrapper = module if isinstance(module, DeltaLayer) else DeltaLayer(module, kind)
        base_param = next(iter(wrapper.base.parameters()), None)
        if base_param is not None:
            delta.to(device=base_param.device)
        wrapper.deltas[p.name] = delta
        if wrapper is not module:
            _follow_mode(wrapper, module)
            setattr(parent, attr, wrapper)
        delta.train(model.training)     # a new delta follows the model's mode (no dropout in eval)
    for mod_name, module, parent, attr, dup in p.copies:
        holder = module if isinstance(module, ModuleCopies) else ModuleCopies(module)
        holder.copies[p.name] = dup
        if holder is not module:
            _follow_mode(holder, module)
            setattr(parent, attr, holder)
        dup.train(model.training)
    adapters(model)[p.name] = p.cfg
    _group_shared_inputs(model)
    for param in model.parameters():
        param.requires_grad_(False)
    if trainable:
        for param in adapter_parameters(model, p.name):
            param.requires_grad_(True)
    hook = getattr(p.method, "on_attach", None)
    if hook is not None:
        hook(model, p.name)
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
    return params


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


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``: its deltas, its trainable module copies and its hooks."""
    _require(model, [name])
    if any(name in w.merged for _, w in wrappers(model)):
        raise DeltatuneError(f"adapter {name!r} is merged; call dt.unmerge(model) before deleting it")
    method = get_method(adapters(model)[name].method)
    hook = getattr(method, "on_remove", None)
    if hook is not None:
        hook(model, name)
    for mod_name, module, parent, attr in list(walk(model)):
        if isinstance(module, DeltaLayer) and name in module.deltas:
            del module.deltas[name]
            module.active = [n for n in module.active if n != name]
            if not module.deltas:
                setattr(parent, attr, module.base)
        elif isinstance(module, ModuleCopies) and name in module.copies:
            del module.copies[name]
            module.active = [n for n in module.active if n != name]
            if not module.copies:
                setattr(parent, attr, module.base)
    del adapters(model)[name]
    model.__dict__["_deltatune_active"] = [n for n in active_adapters(model) if n != name]
    _group_shared_inputs(model)


# ----------------------------------------------------------------------------- merging

def _weight_and_bias(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return base.weight, getattr(base, "bias", None)


def merge(model: nn.Module, name: str | list[str] | None = None) -> nn.Module:
    """Fold the named (default: active) adapters into the base weights.

    The arithmetic runs in float64 and is cast back once. The base weights are copied first,
    so ``unmerge`` restores them bit-for-bit.
    """
    from .layers import from_2d, to_2d

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
            plans.append((w, todo))
    for w, todo in plans:
        weight, bias = _weight_and_bias(w.base)
        if w.backup is None:
            w.backup = (weight.detach().clone(), None if bias is None else bias.detach().clone())
        with torch.no_grad():
            w2 = to_2d(weight, w.kind).double()
            b = None if bias is None else bias.double()
            for n in todo:
                w2, b = w.deltas[n].merge(w2, b)
            weight.copy_(from_2d(w2, weight, w.kind).to(weight.dtype))
            if b is not None:
                if bias is None:
                    w.base.bias = nn.Parameter(b.to(weight.dtype), requires_grad=False)
                else:
                    bias.copy_(b.to(bias.dtype))
        w.merged.extend(todo)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore every merged layer's base weight and bias exactly."""
    for _, w in wrappers(model):
        if w.backup is None:
            continue
        weight, bias = w.backup
        with torch.no_grad():
            w.base.weight.copy_(weight)
            if bias is None:
                if getattr(w.base, "bias", None) is not None:
                    w.base.bias = None
            else:
                w.base.bias.copy_(bias)
        w.backup = None
        w.merged = []
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every wrapper and return the plain model: with ``merge=True`` the active adapters
    (and their trainable modules) are folded in; with ``merge=False`` the original model."""
    if merge:
        globals()["merge"](model)
    else:
        unmerge(model)
    for n in list(adapters(model)):
        hook = getattr(get_method(adapters(model)[n].method), "on_remove", None)
        if hook is not None:
            hook(model, n)
    for _, module, parent, attr in list(walk(model)):
        if isinstance(module, DeltaLayer):
            setattr(parent, attr, module.base)
        elif isinstance(module, ModuleCopies):
            setattr(parent, attr, module.current() if merge else module.base)
    adapters(model).clear()
    model.__dict__["_deltatune_active"] = []
    return model


# ----------------------------------------------------------------------------- inspection

def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors are counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def summary(model: nn.Module, file=None) -> str:
    """Print and return a table of wrapped modules, their methods and parameter counts."""
    rows = [("module", "kind", "adapter", "method", "params", "state")]
    known = adapters(model)
    for name, w in wrappers(model):
        for n, d in w.deltas.items():
            state = "merged" if n in w.merged else ("active" if n in w.active else "inactive")
            rows.append((name, w.kind, n, known[n].method if n in known else "?",
                         f"{sum(p.numel() for p in d.parameters()):,}", state))
    for name, c in copies(model):
        for n, d in c.copies.items():
            rows.append((name, "module", n, "trainable_module", f"{sum(p.numel() for p in d.parameters()):,}",
                         "active" if n in c.active else "inactive"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(wd) for c, wd in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    trainable, total = count_parameters(model)
    lines.append(f"adapters: {', '.join(f'{n} ({c.method})' for n, c in known.items()) or 'none'}; "
                 f"active: {active_adapters(model)}")
    lines.append(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f} %)")
    text = "\n".join(lines)
    print(text, file=file)
    return text
