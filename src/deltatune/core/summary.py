"""Inspection: parameter counts and the table of wrapped modules."""

from __future__ import annotations

from torch import nn

from .activation import active_adapters
from .matching import adapters, copies, wrappers


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
