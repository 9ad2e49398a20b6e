"""Optimizers by name, for ``deltatune train --optimizer NAME`` and ``build_optimizer``.

Each entry builds a ``torch.optim.Optimizer`` from parameter groups (``dt.parameter_groups``,
which carry each group's learning rate) and a weight decay. The memory-efficient optimizers of
the next issues register here too.
"""

from __future__ import annotations

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


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer ``name`` (see ``OPTIMIZERS``) over ``groups``; ``lr`` is the rate of groups
    that name none."""
    if name not in OPTIMIZERS:
        raise DeltatuneError(f"unknown optimizer {name!r}; available: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[name](groups, lr, weight_decay)
