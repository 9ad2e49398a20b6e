"""Per-component multipliers on an optimizer's last update, applied after the step.

Rank-allocating methods give some components of a factor their own learning rate for a step:
DyLoRA's frozen mode holds every component but the sampled one (multiplier 0), IncreLoRA warms up
again the rate of a component that has just joined training (``RestartWarmup``: a ramp up to 1). The update an
optimizer step makes is proportional to its learning rate for SGD (with momentum), Adam and AdamW
(decoupled weight decay included): their moments do not depend on the rate. So ``p_before + w
(p_after - p_before)`` is the step that the rate times ``w`` would have taken, whatever the
optimizer; the methods' ``on_step`` hooks apply it, and ``remember`` keeps the values the next
step starts from (training state, not saved).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Factor(NamedTuple):
    attr: str       # the parameter's attribute on the delta
    dim: int        # its dimension that indexes the components


def remember(delta: nn.Module, factors: tuple[Factor, ...]) -> dict[str, torch.Tensor]:
    return {f.attr: getattr(delta, f.attr).detach().clone() for f in factors}


@torch.no_grad()
def scale_last_update(delta: nn.Module, before: dict[str, torch.Tensor], factor: Factor, w: torch.Tensor) -> None:
    """Scale the last update of each component of ``factor`` by ``w`` (one entry per component);
    an entry of 1 leaves that component exactly as the optimizer left it, 0 puts it back."""
    p, old = getattr(delta, factor.attr), before[factor.attr]
    shape = [1] * p.dim()
    shape[factor.dim] = -1
    w = w.to(device=p.device, dtype=p.dtype).reshape(shape)
    p.copy_(torch.where(w == 1, p, old + w * (p - old)))



class RestartWarmup:
    """A linear warm-up of each component's rate from the step it joined training at: ``j / warmup``
    at its ``j``-th step, 1 after. ``groups`` names sets of factors sharing their components'
    join steps (IncreLoRA: a component's λ joins at activation, its P and Q earlier, as a reserve)."""

    def __init__(self, groups: dict[str, tuple[Factor, ...]]):
        self.groups, self.joined, self.before = groups, {g: {} for g in groups}, None

    def join(self, group: str, components: list[int], step: int) -> None:
        self.joined[group].update(dict.fromkeys(components, step))

    def after_step(self, delta: nn.Module, step: int, warmup: int, size: int) -> None:
        """Scale step ``step``'s update of the warming components, then keep what the next step starts from."""
        for group, factors in self.groups.items() if self.before is not None else ():
            w = torch.ones(size)
            for c, start in self.joined[group].items():
                w[c] = min(1.0, (step - start) / warmup) if step > start else 1.0
            for factor in factors:
                scale_last_update(delta, self.before, factor, w)
        warming = any(step + 1 - start < warmup for part in self.joined.values() for start in part.values())
        self.before = remember(delta, sum(self.groups.values(), ())) if warming else None
