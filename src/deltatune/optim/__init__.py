"""Optimizers: the memory-efficient ones, and every optimizer by name for ``deltatune train``.

``from deltatune.optim import CoapAdamW`` gives a ``torch.optim.Optimizer`` for a plain loop.
``deltatune train --optimizer NAME`` and ``build_optimizer(NAME, groups, lr, weight_decay)`` build
one by its registry name from parameter groups (``dt.parameter_groups``, which carry each group's
learning rate).

An optimizer module registers by presence, as methods do: every module of this folder whose name
does not start with an underscore is imported here; it calls ``register_optimizer`` for each name
it offers and lists its public classes in ``__all__``, which this package re-exports. Underscore
modules are shared helpers (projections, quantised states).

An optimizer that learns from forward passes only (MeZO) sets the class attribute
``zeroth_order = True``: a training loop then calls ``optimizer.step(closure)`` with a closure that
returns the loss computed under ``torch.no_grad()``, and never calls ``backward``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

import torch

from ..core.errors import DeltatuneError

OptimizerFactory = Callable[[list[dict[str, Any]], float, float], torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptimizerFactory] = {
    "adamw": lambda groups, lr, wd: torch.optim.AdamW(groups, lr=lr, weight_decay=wd),
    "adam": lambda groups, lr, wd: torch.optim.Adam(groups, lr=lr, weight_decay=wd),
    # momentum 0.9, the usual choice; plain SGD on adapters rarely converges in one epoch without it
    "sgd": lambda groups, lr, wd: torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=wd),
}


def register_optimizer(name: str, factory: OptimizerFactory) -> None:
    """Make ``factory(groups, lr, weight_decay)`` available as ``--optimizer name``."""
    if name in OPTIMIZERS:
        raise DeltatuneError(f"optimizer {name!r} is registered twice")
    OPTIMIZERS[name] = factory


def is_zeroth_order(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` steps from a loss closure alone (no ``backward``)."""
    return bool(getattr(optimizer, "zeroth_order", False))


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer ``name`` (see ``OPTIMIZERS``) over ``groups``; ``lr`` is the rate of groups
    that name none."""
    if name not in OPTIMIZERS:
        raise DeltatuneError(f"unknown optimizer {name!r}; available: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[name](groups, lr, weight_decay)


__all__ = ["OPTIMIZERS", "build_optimizer", "is_zeroth_order", "register_optimizer"]

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_"):
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_module, "__all__", ()):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
