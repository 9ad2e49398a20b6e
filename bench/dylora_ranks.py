"""DyLoRA's nested ranks on a real task: one adapter trained at rank r, evaluated at every rank
it keeps, beside LoRAs trained at those ranks.

"DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank
Adaptation" trains so that every leading block of components is an adapter on its own; this
script loads the trained run, cuts it to each rank with ``dt.truncate_rank`` (a fresh copy per
rank) and evaluates it on the task's test split. The runs come from ``deltatune train``::

    deltatune train --data tweets --method dylora --r 8 --epochs 1 --out runs/tweets-dylora8
    deltatune train --data tweets --method lora --r 4 --epochs 1 --out runs/tweets-lora4
    .venv/bin/python bench/dylora_ranks.py runs/tweets-dylora8 --ranks 1,2,4,8 \\
        --lora 4=runs/tweets-lora4 --json bench/results/dylora_ranks.json

Each run folder's ``metrics.json`` gives the task, model and sequence length, so the evaluation
uses the run's own split and settings.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import deltatune as dt
from deltatune.files import atomic_write_bytes
from deltatune.train.loop import TrainArgs, pick_device
from deltatune.train.tasks import setup_task


def load_run(run_dir: Path):
    """The trained model of a ``deltatune train`` run folder, with the task it was trained on."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    args = TrainArgs(model=metrics["model"], data=metrics["data"], method=metrics["method"],
                     max_length=metrics["max_length"], seed=metrics["seed"])
    setup = setup_task(args)
    dt.load_adapter(setup.model, run_dir)
    return setup, metrics


def evaluate(setup, model: torch.nn.Module, device: torch.device) -> float:
    model.to(device)
    return setup.evaluate(model, setup.test, 128, device, "fp32")[setup.metric]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="the DyLoRA run folder")
    p.add_argument("--ranks", default="1,2,4,8", help="comma-separated ranks to evaluate")
    p.add_argument("--lora", action="append", default=[], metavar="R=RUN",
                   help="a LoRA run trained at rank R, evaluated for comparison (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--device", default="auto")
    ns = p.parse_args()
    device = pick_device(ns.device)
    setup, metrics = load_run(ns.run)
    rows = []
    # the untruncated adapter evaluates to the run's own recorded metric: a check of the reload
    print(f"dylora as trained (r={metrics['method_config'].get('r')}): {setup.metric} {metrics[setup.metric]:.4f}")
    for r in sorted({int(x) for x in ns.ranks.split(",")}, reverse=True):
        model = copy.deepcopy(setup.model)
        dt.truncate_rank(model, r)
        # a loaded adapter is frozen: count its delta tensors, not the trainable ones
        trainable = sum(p.numel() for n, p in model.named_parameters() if "deltas" in n.split("."))
        rows.append({"method": "dylora", "r": r, "delta_params": trainable,
                     setup.metric: evaluate(setup, model, device), "run": str(ns.run)})
        print(f"dylora r={r}: {setup.metric} {rows[-1][setup.metric]:.4f} ({trainable:,} delta parameters)")
    for spec in ns.lora:
        r, run = spec.split("=", 1)
        lora_metrics = json.loads((Path(run) / "metrics.json").read_text())
        rows.append({"method": lora_metrics["method"], "r": int(r), setup.metric: lora_metrics[setup.metric],
                     "run": run})
        print(f"{lora_metrics['method']} r={r} (trained at that rank): {setup.metric} "
              f"{lora_metrics[setup.metric]:.4f}")
    if ns.json is not None:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"task": metrics["data"], "model": metrics["model"], "trained_rank": metrics["method_config"].get("r"),
               "epochs": metrics["epochs"], "lr": metrics["lr"], "rows": rows}
        atomic_write_bytes(ns.json, (json.dumps(out, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
