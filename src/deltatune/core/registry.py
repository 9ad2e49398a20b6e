"""The method registry: name -> Method. A method registers itself when its module is imported."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable

from torch import nn

from .config import BaseConfig
from .errors import DeltatuneError


@dataclasses.dataclass
class Method:
    """What the engine needs to know about a method.

    name: registry name; config_cls: its config dataclass; paper: the title of the paper that
    defines it; hook: "weight", "activation" or "input" (where it touches the frozen model);
    kinds: the layer kinds it can wrap (see core.layers; "block": any other module, e.g. an MLP or
    an attention block, whose output may be a tuple); make_delta(base, kind, cfg, name, loading)
    builds the delta module for one wrapped layer; expected_parameters(base, kind, cfg, overrides)
    is the paper's parameter-count formula for one layer (checked by the conformance suite);
    default_targets maps a transformers ``model_type`` to target patterns; default_lr is the
    learning rate found by our sweeps, lr_by_model the rate for a ``model_type`` where the sweep
    found that architecture wants another (convnets train at larger rates than transformers);
    variants are extra configs the conformance suite runs; foldable, per_sample_safe and
    changes_sequence say what the method allows (see below).

    Training hooks (all optional; ``core.hooks`` calls them for every attached adapter, the same
    way from ``deltatune train``, a user's own loop or transformers' ``Trainer``):
    lr_multipliers(cfg) maps a parameter's own name (e.g. ``"lora_B"``) to a factor on the
    learning rate (LoRA+); calibrate(model, name, batches, loss_fn) runs before training on a few batches
    (data-driven initialisations); auxiliary_loss(model, name) returns a term added to the task
    loss (orthogonality regularisers, balance losses); on_step(model, name, step) runs after each
    optimizer step (rank schedules, trainable-set schedules).
    """

    name: str
    config_cls: type[BaseConfig]
    paper: str
    hook: str
    kinds: tuple[str, ...]
    make_delta: Callable[..., nn.Module]
    expected_parameters: Callable[..., int]
    default_targets: dict[str, list[str]]
    default_lr: float
    variants: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    lr_by_model: dict[str, float] = dataclasses.field(default_factory=dict)
    # what the single "mergeable" flag used to mean, apart: folds into the weights (merge, unload);
    # can run per sample in a mixed batch; changes the input sequence (prompts, prefixes)
    foldable: bool = True
    per_sample_safe: bool = True
    changes_sequence: bool = False
    identity_at_init: bool = True
    # adapter-level state: (model, cfg) -> one module shared by the adapter's layers, passed to
    # make_delta as ``shared=`` (see core.lifecycle)
    shared_state: Callable[[nn.Module, BaseConfig], nn.Module] | None = None
    on_attach: Callable[[nn.Module, str], None] | None = None
    on_remove: Callable[[nn.Module, str], None] | None = None
    lr_multipliers: Callable[[BaseConfig], dict[str, float]] | None = None
    calibrate: Callable[..., None] | None = None
    auxiliary_loss: Callable[[nn.Module, str], Any] | None = None
    on_step: Callable[[nn.Module, str, int], None] | None = None


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise DeltatuneError(f"method {method.name!r} is already registered")
    method.config_cls.method = method.name
    _REGISTRY[method.name] = method
    return method


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise DeltatuneError(f"unknown method {name!r}.{hint} Available: {', '.join(available_methods())}")
    return _REGISTRY[name]


def config(name: str, **kwargs: Any) -> BaseConfig:
    """Build the validated config of method ``name``: ``dt.config("lora", r=8)``."""
    return get_method(name).config_cls(**kwargs)
