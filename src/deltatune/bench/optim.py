"""``deltatune bench optim``: optimizers trained side by side on one task, against AdamW.

A memory-efficient optimizer is worth its name when it keeps AdamW's result for less state; this
command measures exactly that. It trains the same model with the same method (default ``full``
fine-tuning), data split, seed, epochs, batch size and learning-rate schedule once per
optimizer, and writes to ``--out`` (default ``docs/results/optim/<task>``):

- ``results.json``: every run's ``metrics.json``, its optimizer-state bytes, status, command;
- ``report.md``: one row per optimizer: the task metric and its difference to AdamW's, the
  optimizer-state size and its ratio to AdamW's, step time, peak memory, each against AdamW;
- ``metric_vs_state.png``: the metric against the optimizer-state size.

Optimizers are the names of ``deltatune.optim.OPTIMIZERS`` (``adamw`` is always run first, the
reference of every ratio) and two peers, registered in the bench's child processes only:
``peer:galore_torch`` (galore-torch's ``GaLoreAdamW``) and ``peer:apollo_torch``
(apollo-torch's ``APOLLOAdamW``, channel-wise, random projection). The peers project the same
matrices at the same ranks as deltatune's defaults (a quarter of each matrix's smaller side, at
least 16), with the same gap (200), scale (GaLore: 1; APOLLO: ``d / r``, i.e. deltatune's
``alpha = sqrt(d / r)``) and eps (1e-8), so that a difference is one of implementation.

Each run is its own process (``python -m deltatune.bench.optim --worker ARGS.json``), so its
peak memory is its own and a crash does not stop the others. Runs write no checkpoints: the
bench measures training, and a checkpoint's copy of the weights and state would inflate the
peak RSS (the peers' states also hold Python objects a checkpoint cannot store). Optimizer-state
bytes are counted after training, over every tensor the optimizer's ``state`` holds, inside
records and objects too (the peers keep their projectors in objects), each storage once.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import io
import json
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from ..core.errors import DeltatuneError
from ..files import atomic_write_bytes
from ..train.loop import METRICS_FILE
from ..train.tasks import is_known_task
from .methods import _child_env, _fmt_seconds, _place_labels, _versions, task_metric, task_name

REFERENCE = "adamw"
PEERS = ("peer:galore_torch", "peer:apollo_torch")
OPTIM_FILE = "optim.json"
SHARED_SETTINGS = ("model", "method", "epochs", "seed", "batch_size", "max_length", "precision", "device",
                   "budget_seconds", "head_lr", "weight_decay")
TAIL_LINES = 40


# ----------------------------------------------------------------------------- peers (child only)

def _peer_groups(groups: list[dict[str, Any]], projector: dict[str, Any], apollo: bool) -> list[dict[str, Any]]:
    """One group per 2-D matrix (its own rank; APOLLO's scale ``d / r``), the rest as given (the
    peers project 2-D gradients only)."""
    from ..optim._projection import MIN_RANK, resolve_rank
    out = []
    for g, group in enumerate(groups):
        rest = [p for p in group["params"] if p.dim() != 2]
        if rest:
            out.append({**group, "params": rest})
        for i, p in enumerate(q for q in group["params"] if q.dim() == 2):
            d = min(p.shape)
            rank = resolve_rank(f"param_groups[{g}][{i}]", 0.25, p.shape, min_rank=MIN_RANK)
            extra = {"scale": d / rank} if apollo else {}
            out.append({**group, "params": [p], "rank": rank, **projector, **extra})
    return out


def _galore_torch(groups, lr, wd):
    from galore_torch import GaLoreAdamW
    proj = {"update_proj_gap": 200, "scale": 1.0, "proj_type": "std"}
    return GaLoreAdamW(_peer_groups(groups, proj, apollo=False), lr=lr, weight_decay=wd, eps=1e-8,
                       no_deprecation_warning=True)


def _apollo_torch(groups, lr, wd):
    from apollo_torch import APOLLOAdamW
    proj = {"update_proj_gap": 200, "proj": "random", "scale_type": "channel", "proj_type": "std"}
    return APOLLOAdamW(_peer_groups(groups, proj, apollo=True), lr=lr, weight_decay=wd, eps=1e-8)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor reachable from ``optimizer.state`` (dicts, sequences, attributes of
    objects such as projectors, quantised records), each storage counted once."""
    seen: set[tuple[str, int]] = set()

    def walk(value: Any, depth: int = 0) -> int:
        if isinstance(value, torch.Tensor):
            key = (str(value.device), value.untyped_storage().data_ptr())
            if key in seen:
                return 0
            seen.add(key)
            return value.untyped_storage().nbytes()
        if depth > 4 or isinstance(value, (str, bytes, int, float, bool)) or value is None:
            return 0
        if isinstance(value, dict):
            return sum(walk(v, depth + 1) for v in value.values())
        if isinstance(value, (list, tuple, set)):
            return sum(walk(v, depth + 1) for v in value)
        return sum(walk(v, depth + 1) for v in vars(value).values()) if hasattr(value, "__dict__") else 0

    return sum(walk(s) for s in optimizer.state.values())


def worker(args_file: str) -> int:
    """The child side: train one run, then write its optimizer's state size to ``optim.json``."""
    from ..optim import OPTIMIZERS
    from ..train import loop
    try:
        spec = json.loads(Path(args_file).read_text())
        OPTIMIZERS.update({"peer:galore_torch": _galore_torch, "peer:apollo_torch": _apollo_torch})
        name, built = spec["train_args"]["optimizer"], []
        factory = OPTIMIZERS[name]
        OPTIMIZERS[name] = lambda groups, lr, wd: built.append(factory(groups, lr, wd)) or built[-1]
        loop.save_checkpoint = lambda path, *a, **k: Path(path)      # see the module docstring
        loop.train(loop.TrainArgs(**spec["train_args"]))
        opt = built[-1]
        record = {"optimizer": name, "class": f"{type(opt).__module__}.{type(opt).__name__}",
                  "state_bytes": state_bytes(opt),
                  "param_elements": sum(p.numel() for g in opt.param_groups for p in g["params"]),
                  # parameters that got a gradient (an unused pooler keeps no state)
                  "stepped_tensors": sum(1 for s in opt.state.values() if s),
                  "stepped_elements": sum(p.numel() for p, s in opt.state.items() if s)}
        atomic_write_bytes(Path(spec["train_args"]["out"]) / OPTIM_FILE, (json.dumps(record) + "\n").encode())
    except DeltatuneError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception:       # any crash: its traceback goes into the report's error tail
        traceback.print_exc()
        return 1
    return 0


# ----------------------------------------------------------------------------- plan and runs

def parse_optimizers(text: str | None) -> list[str]:
    """``adamw`` first, then the requested names (default: every registered optimizer but plain
    Adam and SGD, then the peers)."""
    from ..optim import OPTIMIZERS
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if not names:
        names = [n for n in sorted(OPTIMIZERS) if n not in ("adam", "sgd")] + list(PEERS)
    unknown = [n for n in names if n not in OPTIMIZERS and n not in PEERS]
    if unknown:
        raise DeltatuneError(f"--optimizers: unknown {', '.join(unknown)}; available: "
                             f"{', '.join(sorted(OPTIMIZERS))}, {', '.join(PEERS)}")
    return list(dict.fromkeys([REFERENCE, *names]))


def parse_lrs(text: str | None, optimizers: list[str]) -> dict[str, float]:
    """``--options '{"mezo": {"lr": 1e-6}}'``: a learning rate per optimizer (the only option the
    registry's factories take)."""
    if not text:
        return {}
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as e:
        raise DeltatuneError(f"--options must be JSON such as '{{\"mezo\": {{\"lr\": 1e-6}}}}' ({e})") from None
    if not isinstance(opts, dict) or not all(isinstance(v, dict) and set(v) <= {"lr"} for v in opts.values()):
        raise DeltatuneError("--options maps optimizer names to {\"lr\": rate}; no other option is taken")
    stray = [k for k in opts if k not in optimizers]
    if stray:
        raise DeltatuneError(f"--options names {', '.join(stray)}, which are not run ({', '.join(optimizers)})")
    return {k: float(v["lr"]) for k, v in opts.items() if "lr" in v}


def plan_runs(ns: argparse.Namespace, work_dir: Path) -> list[dict[str, Any]]:
    optimizers = parse_optimizers(ns.optimizers)
    lrs = parse_lrs(ns.options, optimizers)
    shared = {k: getattr(ns, k) for k in SHARED_SETTINGS}
    return [{"optimizer": o, "train_args": {**shared, "data": ns.task, "optimizer": o, "lr": lrs.get(o, ns.lr),
                                            "out": str(work_dir / o.replace(":", "_")), "progress": False,
                                            "overwrite": True}} for o in optimizers]


def run_one(run: dict[str, Any], index: int, total: int) -> dict[str, Any]:
    """Train one optimizer in a child process, its output prefixed with ``name |``."""
    name, out = run["optimizer"], Path(run["train_args"]["out"])
    out.mkdir(parents=True, exist_ok=True)
    args_file = out / "bench_args.json"
    args_file.write_text(json.dumps(run, indent=2) + "\n")
    for stale in (METRICS_FILE, OPTIM_FILE):
        (out / stale).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "deltatune.bench.optim", "--worker", str(args_file)]
    print(f"\n[{index}/{total}] {name}", flush=True)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env=_child_env())
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line.rstrip("\n"))
        print(f"  {name} | {tail[-1]}", flush=True)
    rc = proc.wait()
    record: dict[str, Any] = {"optimizer": name, "train_args": run["train_args"], "command": cmd, "returncode": rc,
                              "wall_seconds": round(time.perf_counter() - t0, 2)}
    if rc == 0 and (out / METRICS_FILE).is_file() and (out / OPTIM_FILE).is_file():
        record.update(status="ok", metrics=json.loads((out / METRICS_FILE).read_text()),
                      optim=json.loads((out / OPTIM_FILE).read_text()))
    else:
        record.update(status="failed", error=f"exit status {rc}" if rc else "no metrics.json / optim.json",
                      error_tail="\n".join(tail))
        print(f"[{index}/{total}] {name}: FAILED; the others go on", flush=True)
    return record


# ----------------------------------------------------------------------------- analysis and report

def analyse(runs: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Per run (``derived``): step time, peak memory (the GPU's when every run has one), and
    each against AdamW's; the metric's difference to AdamW's (points of accuracy)."""
    ok = [r for r in runs if r["status"] == "ok"]
    cuda = bool(ok) and all(r["metrics"].get("peak_cuda_memory_mb") is not None for r in ok)
    mem_key = "peak_cuda_memory_mb" if cuda else "peak_memory_mb"
    ref = next((r for r in ok if r["optimizer"] == REFERENCE), None)

    def values(r: dict[str, Any]) -> dict[str, float]:
        m = r["metrics"]
        return {"state_mb": r["optim"]["state_bytes"] / 2 ** 20,
                "step_seconds": m["train_seconds"] / max(m["steps"], 1),
                "peak_mb": float(m[mem_key]), "score": float(m[metric])}

    base = values(ref) if ref else None
    for r in runs:
        if r["status"] != "ok":
            r["derived"] = {}
            continue
        v = values(r)
        d = dict(v)
        for k in ("state_mb", "step_seconds", "peak_mb"):
            d[f"{k}_vs_adamw"] = v[k] / base[k] if base and base[k] else None
        scale = 100.0 if metric == "test_accuracy" else 1.0
        d["score_minus_adamw"] = scale * (v["score"] - base["score"]) if base else None
        r["derived"] = d
    return {"memory_key": mem_key, "metric": metric, "reference_ran": ref is not None}


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def report_markdown(results: dict[str, Any]) -> str:
    s, metric, summary = results["settings"], results["metric"], results["summary"]
    accuracy = metric == "test_accuracy"
    mem = "peak GPU memory (MB)" if summary["memory_key"] == "peak_cuda_memory_mb" else "peak RSS (MB)"
    budget = f", budget {s['budget_seconds']:g} s per run" if s.get("budget_seconds") else ""
    lines = [f"# Optimizer comparison on `{results['task']}`", "",
             f"Method `{s['method']}`, model `{s['model'] or 'the task default'}`, {s['epochs']} epochs, seed "
             f"{s['seed']}, batch size {s['batch_size']}, max length {s['max_length']}, {s['precision']}{budget}; "
             f"{results['versions'].get('cuda_device', 'CPU')}; {results['started']}.", "", "Produced by:", "",
             "```", results["command"], "```", ""]
    head = ["optimizer", "status", metric.replace("test_", "test "), "vs AdamW (points)" if accuracy else "vs AdamW",
            "state (MB)", "state vs AdamW", "step time (s)", "step vs AdamW", mem, "memory vs AdamW"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["runs"]:
        if r["status"] != "ok":
            lines.append(f"| `{r['optimizer']}` | **failed** |" + " — |" * (len(head) - 2))
            continue
        d, m = r["derived"], r["metrics"]
        status = f"stopped by budget ({m['steps']}/{m['planned_steps']} steps)" if m.get("stopped_early") else "ok"
        score = f"{100 * d['score']:.2f} %" if accuracy else f"{d['score']:.2f}"
        diff = "—" if d["score_minus_adamw"] is None else f"{d['score_minus_adamw']:+.2f}"
        lines.append(f"| `{r['optimizer']}` | {status} | {score} | {diff} | {d['state_mb']:.1f} | "
                     f"{_ratio(d['state_mb_vs_adamw'])} | {d['step_seconds']:.3f} | "
                     f"{_ratio(d['step_seconds_vs_adamw'])} | {d['peak_mb']:.0f} | {_ratio(d['peak_mb_vs_adamw'])} |")
    lines += ["", "*State*: bytes of the tensors the optimizer keeps (moments, projectors, quantisation scales) "
              "after training; *step time*: train seconds per optimizer step; the peers project the same matrices "
              "at deltatune's default ranks (see `deltatune/bench/optim.py`).", "",
              "![metric vs optimizer state](metric_vs_state.png)"]
    if results.get("notes"):    # added to results.json by hand after the run (then --replot)
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    failed = [r for r in results["runs"] if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failed runs", ""]
        for r in failed:
            lines += [f"### `{r['optimizer']}`: {r['error']}", "", "```", r.get("error_tail") or "(no output)",
                      "```", ""]
    lines += ["", "## Runs", "", "| optimizer | class | lr | wall time (s) |", "|---|---|---|---|"]
    for r in results["runs"]:
        lr = (r.get("metrics") or {}).get("lr", r["train_args"].get("lr"))
        cls = (r.get("optim") or {}).get("class", "—")
        lr_text = "default" if lr is None else f"{lr:g}"
        lines.append(f"| `{r['optimizer']}` | `{cls}` | {lr_text} | {r['wall_seconds']:.1f} |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()), ""]
    return "\n".join(lines)


def write_plot(results: dict[str, Any], out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    metric = results["metric"]
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=150)
    ok = [r for r in results["runs"] if r["status"] == "ok"]
    xs = [r["derived"]["state_mb"] for r in ok]
    ys = [r["derived"]["score"] * (100.0 if metric == "test_accuracy" else 1.0) for r in ok]
    for r, x, y in zip(ok, xs, ys):      # red: the reference; grey: the peers
        ax.scatter([x], [y], s=50, zorder=3, edgecolor="black", linewidth=0.6,
                   color="tab:red" if r["optimizer"] == REFERENCE else
                   "tab:gray" if r["optimizer"] in PEERS else "tab:blue")
    if ok:
        pad = max(1.0, 0.12 * (max(ys) - min(ys)))
        ax.set_ylim(min(ys) - pad, max(ys) + pad)
        ax.set_xlim(0, max(xs) * 1.3 or 1.0)
    ax.set_xlabel("optimizer state (MB)")
    ax.set_ylabel("test accuracy (%)" if metric == "test_accuracy" else metric.replace("_", " "))
    s = results["settings"]
    ax.set_title(f"{task_name(results['task'])}: {s['method']}, {s['epochs']} epochs, seed {s['seed']}", fontsize=11)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    _place_labels(ax, fig, xs, ys, [r["optimizer"] for r in ok])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(out / "metric_vs_state.png", buf.getvalue())


# ----------------------------------------------------------------------------- command

def command_line(ns: argparse.Namespace, out: Path, work_dir: Path) -> str:
    argv = ["deltatune", "bench", "optim", "--task", ns.task, "--method", ns.method,
            *(["--optimizers", ns.optimizers] if ns.optimizers else []), *(["--model", ns.model] if ns.model else []),
            "--epochs", str(ns.epochs), "--seed", str(ns.seed), "--batch-size", str(ns.batch_size), "--max-length",
            str(ns.max_length), "--precision", ns.precision, "--weight-decay", f"{ns.weight_decay:g}",
            *(["--lr", f"{ns.lr:g}"] if ns.lr is not None else []),
            *(["--head-lr", f"{ns.head_lr:g}"] if ns.head_lr is not None else []), "--device", ns.device,
            *(["--budget-seconds", f"{ns.budget_seconds:g}"] if ns.budget_seconds is not None else []),
            *(["--options", ns.options] if ns.options else []), "--out", str(out), "--work-dir", str(work_dir)]
    return shlex.join(argv)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="tweets", help="bbc, tweets, fashion, lm, or a .csv/.jsonl file (default: tweets)")
    p.add_argument("--optimizers", default=None, help="comma-separated optimizer names (default: every registered "
                   f"one but adam and sgd, and the peers {', '.join(PEERS)}); adamw, the reference, is always run")
    p.add_argument("--method", default="full", help="what trains (default: full fine-tuning; any method or baseline)")
    p.add_argument("--options", default=None, help="a learning rate per optimizer as JSON, e.g. "
                   "'{\"mezo\": {\"lr\": 1e-6}}' (default: --lr for all)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of every run (default: the method's)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="(default: 0.01)")
    p.add_argument("--budget-seconds", type=float, default=None, help="per run: stop training after this many "
                   "seconds of training steps (the schedule is still planned for --epochs)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (default: 3)")
    p.add_argument("--model", default=None, help="default: the task's model (MiniLM for text tasks)")
    p.add_argument("--seed", type=int, default=0, help="training seed of every run (default: 0)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text (default: 128)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="(default: fp32)")
    p.add_argument("--head-lr", type=float, default=None, help="rate of the new classification head (default: "
                   "the linear probe's for the model)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--out", default=None, help="report folder (default: docs/results/optim/<task>)")
    p.add_argument("--work-dir", default=None, help="run folders (default: runs/bench/optim/<task>)")
    p.add_argument("--overwrite", action="store_true", help="replace the report already in --out")
    p.add_argument("--replot", default=None, metavar="DIR", help="only rewrite DIR's report.md and plot from its "
                   "results.json (no training)")


def main_optim(ns: argparse.Namespace) -> int:
    if ns.replot:
        if not (Path(ns.replot) / "results.json").is_file():
            raise DeltatuneError(f"--replot {ns.replot}: no results.json there (give a folder bench optim wrote)")
        results = json.loads((Path(ns.replot) / "results.json").read_text())
        atomic_write_bytes(Path(ns.replot) / "report.md", report_markdown(results).encode())
        write_plot(results, Path(ns.replot))
        return 0
    if not is_known_task(ns.task):
        raise DeltatuneError(f"--task {ns.task!r}: not bbc, tweets, fashion, lm nor an existing .csv/.jsonl file")
    from ..train.loop import TrainArgs
    TrainArgs(**{k: getattr(ns, k) for k in SHARED_SETTINGS}, lr=ns.lr).validate()   # fail before any run
    out = Path(ns.out) if ns.out else Path("docs") / "results" / "optim" / task_name(ns.task)
    work_dir = Path(ns.work_dir) if ns.work_dir else Path("runs") / "bench" / "optim" / task_name(ns.task)
    if (out / "results.json").exists() and not ns.overwrite:
        raise DeltatuneError(f"--out {out} already holds a report (results.json); add --overwrite or give "
                             f"another --out")
    runs = plan_runs(ns, work_dir)
    started, stamp = time.perf_counter(), datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"bench optim on {ns.task}: {', '.join(r['optimizer'] for r in runs)} (one process each)", flush=True)
    records = [run_one(run, i, len(runs)) for i, run in enumerate(runs, 1)]
    metric = task_metric(ns.task)
    results = {"task": ns.task, "command": command_line(ns, out, work_dir), "started": stamp,
               "wall_seconds": round(time.perf_counter() - started, 1),
               "settings": {k: getattr(ns, k) for k in SHARED_SETTINGS}, "versions": _versions(), "metric": metric,
               "runs": records}
    results["summary"] = analyse(records, metric)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    atomic_write_bytes(out / "report.md", report_markdown(results).encode())
    write_plot(results, out)
    failed = [r["optimizer"] for r in records if r["status"] != "ok"]
    print(f"\nwrote {out / 'report.md'}, results.json and metric_vs_state.png in "
          f"{_fmt_seconds(time.perf_counter() - started)}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2]))
    parser = argparse.ArgumentParser(prog="deltatune bench optim")
    add_arguments(parser)
    try:
        sys.exit(main_optim(parser.parse_args()))
    except DeltatuneError as e:
        print(f"deltatune bench optim: error: {e}", file=sys.stderr)
        sys.exit(2)
