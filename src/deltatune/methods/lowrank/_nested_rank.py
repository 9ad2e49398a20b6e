"""``truncate_rank``: keep the leading components of a nested-rank adapter, for good.

A nested-rank method (DyLoRA) trains its factors so that every leading block of components is an
adapter on its own; its delta implements ``truncate(r)`` (drop every component past the first
``r``) and its method module adds its registry name to ``NESTED_METHODS``. Other low-rank methods
have no order among their components (LoRA's ``B A`` is invariant to permuting them), so keeping
"the first r" of them means nothing, and ``truncate_rank`` refuses them by name.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ...core.config import check_number
from ...core.engine import adapters, wrappers
from ...core.errors import DeltatuneError

# registry names of the methods whose deltas implement ``truncate(r)``
NESTED_METHODS: set[str] = set()


def _not_nested(method: str) -> str:
    return (f"{method}'s components are not ordered; truncate_rank applies to nested-rank methods "
            f"({', '.join(sorted(NESTED_METHODS))})")


def truncate_rank(model: nn.Module, r: int, name: str | None = None) -> list[str]:
    """Keep the first ``r`` components of every nested-rank adapter of ``model`` (or of adapter
    ``name``) and drop the rest from its parameters: the adapter's config then records rank ``r``,
    a save holds rank-``r`` factors, and the file loads as a rank-``r`` adapter. Returns the names
    of the adapters truncated. An optimizer built before holds the dropped tensors: truncate after
    training (or build a new optimizer)."""
    check_number("r", r, kind=int, low=1)
    attached = adapters(model)
    if name is not None and name not in attached:
        raise DeltatuneError(f"no adapter named {name!r}; attached: {', '.join(attached) or 'none'}")
    names = [name] if name is not None else [n for n, c in attached.items() if c.method in NESTED_METHODS]
    if not names:
        others = sorted({c.method for c in attached.values()})
        raise DeltatuneError("truncate_rank: no nested-rank adapter is attached"
                             + (f" ({'; '.join(_not_nested(m) for m in others)})" if others else ""))
    for n in names:
        cfg = attached[n]
        if cfg.method not in NESTED_METHODS:
            raise DeltatuneError(f"adapter {n!r} is {cfg.method}: {_not_nested(cfg.method)}")
        if r > cfg.r:
            raise DeltatuneError(f"truncate_rank: r={r} is larger than adapter {n!r}'s rank {cfg.r}; only trained "
                                 f"components can be kept, so r must be at most {cfg.r}")
        merged = [mod for mod, w in wrappers(model) if n in w.merged]
        if merged:
            raise DeltatuneError(f"adapter {n!r} is merged into {merged[0]} (and {len(merged) - 1} more layers); "
                                 f"dt.unmerge(model) first, then truncate")
    for n in names:
        for _, w in wrappers(model):
            if n in w.deltas:
                w.deltas[n].truncate(r)
        attached[n] = dataclasses.replace(attached[n], r=r)
    return names
