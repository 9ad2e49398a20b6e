"""The README's method table, from the committed reports of ``deltatune bench methods``.

    .venv/bin/python bench/methods_table.py [docs/results]

Reads ``<dir>/<task>/results.json`` for bbc, tweets, fashion and lm and prints one markdown row
per method: its score on each task, trainable share, step time relative to LoRA, and whether it
beat the head-only baseline (a method that did not is marked **fails**, never left out).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TASKS = ("bbc", "tweets", "fashion", "lm")
BASELINES = ("full", "head")


def load(root: Path) -> dict[str, dict]:
    out = {}
    for t in TASKS:
        f = root / t / "results.json"
        if f.is_file():
            out[t] = json.loads(f.read_text())
    return out


def cell(results: dict, method: str) -> tuple[str, bool | None]:
    """Score text and beats-head flag of ``method`` in one task's results."""
    metric = results.get("metric", "test_accuracy")
    for r in results["runs"]:
        if r["method"] != method:
            continue
        if r["status"] != "ok":
            return "**failed**", False
        m, d = r["metrics"], r.get("derived", {})
        score = f"{100 * m[metric]:.2f} %" if metric == "test_accuracy" else f"ppl {m[metric]:.2f}"
        if m.get("stopped_early"):
            score += " (budget)"
        return score, d.get("beats_head")
    return "—", None


def table(root: Path) -> str:
    res = load(root)
    methods: list[str] = []
    for r in res.values():
        for run in r["runs"]:
            if run["method"] not in methods:
                methods.append(run["method"])
    methods.sort(key=lambda m: (m in BASELINES, m))
    tasks = [t for t in TASKS if t in res]
    head = ["method", *tasks, "trainable % (tweets)", "step time vs LoRA (tweets)", "beats head-only"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = res.get("tweets") or next(iter(res.values()), None)
    for m in methods:
        cells, fails, wins = [], [], []
        for t in tasks:
            text, beats = cell(res[t], m)
            cells.append(text)
            if beats is False:
                fails.append(t)
            elif beats is True:
                wins.append(t)
        share = ratio = "—"
        if ref is not None:
            for r in ref["runs"]:
                if r["method"] == m and r["status"] == "ok":
                    share = f"{r['derived']['trainable_percent']:.3f}"
                    v = r["derived"].get("step_time_vs_lora")
                    ratio = f"{v:.2f}x" if v is not None else "—"
        if m in BASELINES:
            verdict = "baseline"
        elif fails:
            verdict = "**fails** on " + ", ".join(fails)
        elif wins:
            verdict = "yes (" + ", ".join(wins) + ")"
        else:
            verdict = "—"
        name = f"`{m}`" + (" (baseline)" if m in BASELINES else "")
        lines.append("| " + " | ".join([name, *cells, share, ratio, verdict]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results")))
