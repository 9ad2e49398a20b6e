"""Training hooks: what a method may ask of the training loop, whoever runs it.

``deltatune train``, a user's own loop and transformers' ``Trainer`` (``deltatune.train.hf``) call
the same four functions, so a method that needs data before training, an extra loss term, its own
learning rates or a change after each step works the same everywhere::

    dt.calibrate(model, batches)                      # once, before training (data-driven inits)
    groups = dt.parameter_groups(model, lr=1e-3)      # per-parameter rates (LoRA+), for any optimizer
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    for batch in data:
        loss = task_loss(model, batch) + dt.auxiliary_loss(model)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        dt.step_hook(model, step)                     # after each optimizer step

Each walks the attached adapters and calls the hook their method registered (see
``registry.Method``); methods without a hook cost nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from .engine import active_adapters, adapters
from .errors import DeltatuneError
from .registry import get_method


def _with_hook(model: nn.Module, hook: str, names: list[str] | None = None):
    for name in (list(adapters(model)) if names is None else names):
        fn = getattr(get_method(adapters(model)[name].method), hook)
        if fn is not None:
            yield name, fn


def parameter_groups(model: nn.Module, lr: float, rates: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer parameter groups, one per learning rate.

    A parameter's rate is ``lr`` times its method's multiplier for its own name (``lr_multipliers``:
    LoRA+ trains ``lora_B`` faster), unless ``rates`` names a module prefix it lies under (e.g.
    ``{"classifier": 3e-2}`` for a new head), which sets its rate outright. Groups keep the
    parameters' model order, so an optimizer built from them is deterministic."""
    multipliers: dict[str, float] = {}
    for name, _ in _with_hook(model, "lr_multipliers"):
        for param_name, factor in get_method(adapters(model)[name].method).lr_multipliers(adapters(model)[name]).items():
            if not factor > 0:
                raise DeltatuneError(f"adapter {name!r}: learning-rate multiplier {factor!r} for {param_name} "
                                     f"must be positive")
            multipliers[f"{name}:{param_name}"] = float(factor)
    rates = dict(rates or {})
    by_rate: dict[float, list[nn.Parameter]] = {}
    for qualified, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rate = next((r for prefix, r in rates.items() if qualified == prefix or qualified.startswith(prefix + ".")),
                    None)
        if rate is None:
            rate = lr
            parts = qualified.split(".")
            if "deltas" in parts:       # <module>.deltas.<adapter>.<param...>
                i = parts.index("deltas")
                key = f"{parts[i + 1]}:{parts[-1]}" if i + 2 < len(parts) else ""
                rate = lr * multipliers.get(key, 1.0)
        by_rate.setdefault(float(rate), []).append(p)
    return [{"params": ps, "lr": r} for r, ps in by_rate.items()]


def auxiliary_loss(model: nn.Module) -> torch.Tensor | float:
    """The sum of the active adapters' auxiliary loss terms (0.0 when none has one)."""
    total: torch.Tensor | float = 0.0
    for name, fn in _with_hook(model, "auxiliary_loss", active_adapters(model)):
        term = fn(model, name)
        if term is not None:
            total = total + term
    return total


def step_hook(model: nn.Module, step: int) -> None:
    """Call after each optimizer step (``step`` counts optimizer steps from 1)."""
    for name, fn in _with_hook(model, "on_step"):
        fn(model, name, step)


def calibrate(model: nn.Module, batches: Iterable[Any], names: list[str] | None = None,
              loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> list[str]:
    """Give the adapters whose method needs data before training (``calibrate`` hook) a few
    batches; returns the names of the adapters that used them (a hook returns False when its
    adapter needs none). ``batches`` may be any iterable of what ``model(**batch)`` (dicts) or
    ``model(batch)`` takes; it is materialised once so every adapter sees the same batches.
    ``loss_fn(model, batch)`` gives a batch's scalar loss to methods that need gradients; by
    default the model's output ``.loss`` (transformers models given ``labels``)."""
    batches = list(batches)
    if not batches:
        raise DeltatuneError("dt.calibrate needs at least one batch")
    return [name for name, fn in _with_hook(model, "calibrate", names)
            if fn(model, name, batches, loss_fn or output_loss) is not False]


def output_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    if getattr(out, "loss", None) is None:
        raise DeltatuneError(f"dt.calibrate: the model's output ({type(out).__name__}) has no .loss; pass batches "
                             f"with labels, or dt.calibrate(model, batches, loss_fn=lambda model, batch: ...)")
    return out.loss
