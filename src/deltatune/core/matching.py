"""Naming and matching: the model's modules as they were before wrapping, and which of them a
config's targets select (exact names, dotted suffixes, ``re:``, ``type:``, ``all-linear``; per-layer
patterns; the model type that default targets are keyed by)."""

from __future__ import annotations

import difflib
import inspect
import re
from typing import Any, Iterator, NamedTuple

from torch import nn

from .config import BaseConfig
from .errors import DeltatuneError
from .layers import layer_kind
from .registry import Method
from .wrapper import DeltaLayer, ModuleCopies

_ADAPTERS = "_deltatune_adapters"      # plain attribute on the root model: name -> config
_OUTPUT_HEADS = ("lm_head", "classifier", "score", "cls", "head", "output_projection")


class Entry(NamedTuple):
    """One module of the model as it was before wrapping: its logical (dotted) name, the module
    (a wrapper stands for the module it wraps), its parent and the parent's attribute holding it."""
    name: str
    module: nn.Module
    parent: nn.Module
    attr: str


def walk(model: nn.Module) -> Iterator[Entry]:
    """Every module of the model as it was before wrapping: a wrapper stands for the module it
    wraps, and its deltas and copies are not listed."""

    def rec(prefix: str, module: nn.Module) -> Iterator:
        for child_name, child in module.named_children():
            if child_name == "deltatune_shared":    # adapter-level modules (core.lifecycle)
                continue
            name = f"{prefix}.{child_name}" if prefix else child_name
            yield Entry(name, child, module, child_name)
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
    if callable(defaults):      # a function of the model, or of the model and the config
        return defaults(model, cfg) if len(inspect.signature(defaults).parameters) > 1 else defaults(model)
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


def match_modules(model: nn.Module, cfg: BaseConfig, targets: list[str]) -> list[Entry]:
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
        found.append(Entry(name, module, parent, attr))
    if not found:
        what = f"targets {targets}" + (f" within layers {cfg.layers}" if cfg.layers is not None else "")
        raise DeltatuneError(
            f"{what} matched no module of {type(model).__name__}. Closest module names: "
            f"{_closest(model, targets)}. Targets match an exact name, a dotted suffix, 're:<regex>', "
            f"'type:<Class>' or 'all-linear'")
    return found
