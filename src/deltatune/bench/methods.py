"""``deltatune bench methods``: methods trained side by side on one task, against two baselines.

Users pick a method by accuracy per trainable parameter, per MB of memory and per second on
their own task; this command measures exactly that. It trains each requested method, plus
full fine-tuning (``full``) and a linear probe (``head``), with ``deltatune.train`` and writes to
the output folder (default ``docs/results/<task>/``):

- ``results.json``: every run's ``metrics.json``, its status, the exact command, the versions;
- ``report.md``: one table row per method (accuracy, trainable parameters, peak memory, train
  time, step time against LoRA, whether it beats the head-only baseline, Pareto-front
  membership), failed runs with the tail of their output, the command that made the report;
- ``accuracy_vs_params.png``, ``accuracy_vs_memory.png``, ``accuracy_vs_time.png``: the
  Pareto front (no other run is at least as accurate for less) marked.

Each run is its own process (``python -m deltatune.bench.methods --worker ARGS.json``): the
peak memory a run reports is then its own (the RSS high-water mark and the CUDA peak are per
process), a crash or out-of-memory in one method does not take the others down, and nothing
(allocator caches, RNG state, imported kernels) leaks from one run into the next. All runs share
the model, data split, seed, epochs, batch size, sequence length and learning-rate schedule;
only the method, its options and its learning rate (the method's ``default_lr`` unless given in
``--options``) differ. ``--budget-seconds`` is a budget per run, spent in training steps.

The run folders (checkpoints: a full fine-tune's is three copies of the model) go to
``--work-dir`` (default ``runs/bench/<task>``), not into the report folder.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import fcntl
import io
import json
import os
import platform
import queue
import shlex
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

from ..core.errors import DeltatuneError
from ..files import atomic_write_bytes
from ..train.loop import BASELINES, METRICS_FILE
from ..train.tasks import METRICS, is_known_task, task_kind

# training settings a run inherits from the bench command (the rest are TrainArgs defaults)
SHARED_SETTINGS = ("model", "epochs", "seed", "batch_size", "max_length", "device", "budget_seconds", "precision",
                   "head_lr")
# layer kind a method must handle to be run by default on a task kind (text: every method)
REQUIRED_KIND = {"vision": "conv"}
# LoRA as `deltatune train` runs it bare (r=8, alpha=16, the model type's default targets)
LORA_DEFAULTS = {"r": 8, "alpha": 16.0}
TAIL_LINES = 40
PLOTS = {
    "params": ("accuracy_vs_params.png", "trainable parameters (log scale)", "trainable_params"),
    "memory": ("accuracy_vs_memory.png", "peak memory (MB)", None),     # key chosen per report
    "time": ("accuracy_vs_time.png", "train time (s)", "train_seconds"),
}


# ----------------------------------------------------------------------------- plan

def task_metric(task: str) -> str:
    """``test_perplexity`` for the causal-LM task, ``test_accuracy`` for classification."""
    return "test_perplexity" if task_kind(task) == "lm" else "test_accuracy"


def task_baselines(task: str) -> list[str]:
    """``full`` and ``head``; a causal LM has no new head, so only ``full``."""
    return [b for b in BASELINES if not (b == "head" and task_kind(task) == "lm")]


def parse_methods(text: str | None, task: str = "bbc", baselines: bool = True) -> list[str]:
    """The requested methods, then (unless ``baselines`` is false) the task's baselines. Default:
    every registered method that applies to the task's model (on ``fashion``, those that adapt
    convolutions)."""
    import deltatune as dt
    known = dt.available_methods()
    need = REQUIRED_KIND.get(task_kind(task))
    default = [m for m in known if need is None or need in dt.get_method(m).kinds]
    names = [m.strip() for m in (text or "").split(",") if m.strip()] or default
    unknown = [m for m in names if m not in known and m not in BASELINES]
    if unknown:
        raise DeltatuneError(f"--methods: unknown method(s) {', '.join(unknown)}; registered: {', '.join(known)} "
                             f"(the baselines {', '.join(BASELINES)} are always added)")
    out: list[str] = []
    for m in [*names, *(task_baselines(task) if baselines else [])]:
        if m not in out:
            out.append(m)
    return out


def parse_options(text: str | None, methods: list[str]) -> dict[str, dict[str, Any]]:
    """``--options '{"lora": {"r": 16, "lr": 5e-4}}'``: per-method config fields (and ``lr``)."""
    if not text:
        return {}
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as e:
        raise DeltatuneError(f"--options must be a JSON object such as '{{\"lora\": {{\"r\": 16}}}}' ({e})") from None
    if not isinstance(opts, dict) or not all(isinstance(v, dict) for v in opts.values()):
        raise DeltatuneError("--options must map method names to objects, e.g. '{\"lora\": {\"r\": 16, \"lr\": 5e-4}}'")
    stray = [k for k in opts if k not in methods]
    if stray:
        raise DeltatuneError(f"--options names method(s) {', '.join(stray)} that are not run; "
                             f"running: {', '.join(methods)}")
    return opts


def plan_runs(ns: argparse.Namespace, work_dir: Path) -> list[dict[str, Any]]:
    """One ``TrainArgs`` dict per method; invalid method options fail the run, not the plan,
    so that the report shows them."""
    methods = parse_methods(ns.methods, ns.task, baselines=not getattr(ns, "update", False))
    options = parse_options(ns.options, methods)
    shared = {k: getattr(ns, k) for k in SHARED_SETTINGS}
    runs = []
    for m in methods:
        opts = dict(options.get(m, {}))
        lr = opts.pop("lr", None)     # None: the run's default for its model (its metrics.json records it)
        if m == "lora":
            opts = {**LORA_DEFAULTS, **opts}
        runs.append({"method": m, "train_args": {**shared, "data": ns.task, "method": m, "method_options": opts,
                                                 "lr": lr, "out": str(work_dir / m), "progress": False,
                                                 # the bench's own scratch folders: each bench starts them anew
                                                 "overwrite": True}})
    return runs


# ----------------------------------------------------------------------------- running

def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _child_env() -> dict[str, str]:
    """The parent's environment, with this deltatune first on the path (so the child runs the
    same code even from a source checkout) and no tokenizer threads fighting the training."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_one(run: dict[str, Any], index: int, total: int, started: float, durations: list[float],
            heartbeat: float = 60.0) -> dict[str, Any]:
    """Train one method in a child process, streaming its output with a ``method |`` prefix;
    returns the run record (status ``ok`` with its metrics, or ``failed`` with its output tail)."""
    method = run["method"]
    out = Path(run["train_args"]["out"])
    out.mkdir(parents=True, exist_ok=True)
    args_file = out / "bench_args.json"
    args_file.write_text(json.dumps(run["train_args"], indent=2) + "\n")
    (out / METRICS_FILE).unlink(missing_ok=True)        # a stale one must not pass for this run's
    cmd = [sys.executable, "-m", "deltatune.bench.methods", "--worker", str(args_file)]

    def status_line() -> str:
        elapsed = time.perf_counter() - started
        if durations:       # ETA from the runs done so far, the current one counted as not started
            eta = f"ETA ~{_fmt_seconds(sum(durations) / len(durations) * (total - index + 1) - (elapsed - sum(durations)))}"
        else:
            eta = "ETA after the first run"
        return f"[{index}/{total}] {method}: {_fmt_seconds(elapsed)} elapsed, {eta}"

    print(f"\n{status_line()}", flush=True)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env=_child_env())
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    last = time.perf_counter()
    while True:
        try:
            line = lines.get(timeout=max(1.0, heartbeat))
        except queue.Empty:
            line = ""
        if line is None:
            break
        if line:
            tail.append(line)
            print(f"  {method} | {line}", flush=True)
        if time.perf_counter() - last >= heartbeat:       # a long epoch prints nothing: say it is alive
            print(f"  {status_line()} (this run {_fmt_seconds(time.perf_counter() - t0)})", flush=True)
            last = time.perf_counter()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    record: dict[str, Any] = {"method": method, "train_args": run["train_args"], "command": cmd,
                              "returncode": rc, "wall_seconds": round(wall, 2)}
    metrics_path = out / METRICS_FILE
    if rc == 0 and metrics_path.is_file():
        record.update(status="ok", metrics=json.loads(metrics_path.read_text()))
        metric = record["metrics"].get("metric", "test_accuracy")
        print(f"[{index}/{total}] {method}: done in {_fmt_seconds(wall)}, "
              f"{metric.replace('_', ' ')} {record['metrics'][metric]:.4f}", flush=True)
    else:
        why = f"exit status {rc}" if rc != 0 else f"exit status 0 but no {metrics_path}"
        record.update(status="failed", error=why, error_tail="\n".join(tail))
        print(f"[{index}/{total}] {method}: FAILED ({why}); the others go on", flush=True)
    return record


def worker(args_file: str) -> int:
    """The child side: train one run from its JSON arguments."""
    from ..train.loop import TrainArgs, train
    try:
        args = TrainArgs(**json.loads(Path(args_file).read_text()))
        train(args)
    except DeltatuneError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception:       # any crash: its traceback goes into the report's error tail
        traceback.print_exc()
        return 1
    return 0


# ----------------------------------------------------------------------------- analysis

def pareto_front(points: dict[str, tuple[float, float]], higher_is_better: bool = True) -> set[str]:
    """Names of the points no other point dominates, for ``x`` lower-is-better and ``y``
    higher-is-better (or lower, e.g. perplexity): a point is dominated when another has
    ``x' <= x`` and a ``y'`` at least as good, one of them strictly."""
    if not higher_is_better:
        points = {n: (x, -y) for n, (x, y) in points.items()}
    front = set()
    for n, (x, y) in points.items():
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for m, (x2, y2) in points.items() if m != n):
            front.add(n)
    return front


def memory_key(runs: list[dict[str, Any]]) -> str:
    """The GPU's peak allocation when every run has one (it is what limits a GPU run), else the
    process's peak RSS."""
    ok = [r["metrics"] for r in runs if r["status"] == "ok"]
    if ok and all(m.get("peak_cuda_memory_mb") is not None for m in ok):
        return "peak_cuda_memory_mb"
    return "peak_memory_mb"


def analyse(runs: list[dict[str, Any]], metric: str = "test_accuracy") -> dict[str, Any]:
    """Derived columns per run (``derived``): trainable %, step time, ratio to LoRA, beats head,
    Pareto membership per axis; returns the summary (memory key, baselines' scores)."""
    ok = {r["method"]: r["metrics"] for r in runs if r["status"] == "ok"}
    higher = METRICS[metric]
    mem = memory_key(runs)
    for m in ok.values():
        m["_step_seconds"] = m["train_seconds"] / max(m["steps"], 1)
    lora_step = ok["lora"]["_step_seconds"] if "lora" in ok else None
    head_acc = ok["head"][metric] if "head" in ok else None
    axes = {"params": "trainable_params", "memory": mem, "time": "train_seconds"}
    fronts = {axis: pareto_front({n: (float(m[key]), float(m[metric])) for n, m in ok.items()}, higher)
              for axis, key in axes.items()}
    for r in runs:
        if r["status"] != "ok":
            r["derived"] = {}
            continue
        m = r["metrics"]
        r["derived"] = {
            "trainable_percent": 100.0 * m["trainable_params"] / max(m["total_params"], 1),
            "step_seconds": m["_step_seconds"],
            "step_time_vs_lora": m["_step_seconds"] / lora_step if lora_step else None,
            "beats_head": None if head_acc is None or r["method"] == "head" else
            (m[metric] > head_acc if higher else m[metric] < head_acc),
            "pareto": [axis for axis in axes if r["method"] in fronts[axis]],
        }
    for m in ok.values():
        del m["_step_seconds"]
    full = ok["full"][metric] if "full" in ok else None
    return {"memory_key": mem, "metric": metric, "head_score": head_acc, "full_score": full, "lora_ran": lora_step is not None,
            "pareto_front": {axis: sorted(f) for axis, f in fronts.items()}}


# ----------------------------------------------------------------------------- report

def _versions() -> dict[str, Any]:
    import torch

    import deltatune
    v: dict[str, Any] = {"deltatune": deltatune.__version__, "python": platform.python_version(),
                         "torch": torch.__version__, "platform": platform.platform(),
                         "cpu_threads": torch.get_num_threads()}
    try:
        import transformers
        v["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        v["cuda_device"] = torch.cuda.get_device_name(0)
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        if rev.returncode == 0:
            v["git_commit"] = rev.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return v


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _metric_label(metric: str) -> str:
    return metric.replace("test_", "test ")


def _fmt_score(metric: str, value: float) -> str:
    return f"{100 * value:.2f} %" if metric == "test_accuracy" else f"{value:.2f}"


def _plot_score(metric: str, value: float) -> float:
    return 100.0 * value if metric == "test_accuracy" else value


def _model_name(results: dict[str, Any]) -> str:
    """The model of the report: the setting, else what the runs loaded (the task's default)."""
    if results["settings"].get("model"):
        return Path(results["settings"]["model"]).name
    names = {r["metrics"].get("model") for r in results["runs"] if r["status"] == "ok"}
    return ", ".join(sorted(n for n in names if n)) or "the task's default"


def report_markdown(results: dict[str, Any]) -> str:
    runs, s, summary = results["runs"], results["settings"], results["summary"]
    metric = results.get("metric", "test_accuracy")
    higher = METRICS[metric]
    mem = summary["memory_key"]
    mem_label = "peak GPU memory (MB)" if mem == "peak_cuda_memory_mb" else "peak RSS (MB)"
    budget = f", budget {s['budget_seconds']:g} s per run" if s.get("budget_seconds") else ""
    lines = [f"# Method comparison on `{results['task']}`", "",
             f"Model `{_model_name(results)}`, {s['epochs']} epochs, seed {s['seed']}, batch size {s['batch_size']}, "
             f"max length {s['max_length']}{budget}; {results['versions'].get('cuda_device', 'CPU')}; "
             f"{results['started']}.", "", "Produced by:", "", "```", results["command"], "```", ""]
    for u in results.get("updates", []):
        lines += [f"Runs of {', '.join(f'`{m}`' for m in u['methods'])} replaced on {u['started']} by:", "", "```",
                  u["command"], "```", ""]
    header = ["method", "status", _metric_label(metric), "trainable params", "trainable %", mem_label, "train time (s)"]
    if summary["lora_ran"]:
        header.append("step time vs LoRA")
    has_head = any(r["method"] == "head" for r in runs)
    header += (["beats head-only"] if has_head else []) + ["Pareto front"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    def rank(r: dict[str, Any]) -> tuple[bool, float]:
        v = (r.get("metrics") or {}).get(metric)
        return r["status"] != "ok", (0.0 if v is None else (-v if higher else v))
    ordered = sorted(runs, key=rank)
    for r in ordered:
        name = f"`{r['method']}`" + (" (baseline)" if r["method"] in BASELINES else "")
        if r["status"] != "ok":
            row = [name, "**failed**", "—", "—", "—", "—", "—"] + (["—"] if summary["lora_ran"] else []) \
                + (["—"] if has_head else []) + ["—"]
            lines.append("| " + " | ".join(row) + " |")
            continue
        m, d = r["metrics"], r["derived"]
        status = "ok"
        if m.get("stopped_early"):
            status = f"stopped by budget ({m['steps']}/{m['planned_steps']} steps)"
        beats = {None: "—", True: "yes", False: "**no**"}[d["beats_head"]]
        row = [name, status, _fmt_score(metric, m[metric]), _fmt_int(m["trainable_params"]),
               f"{d['trainable_percent']:.3f}", f"{m.get(mem, float('nan')):.0f}", f"{m['train_seconds']:.1f}"]
        if summary["lora_ran"]:
            row.append(f"{d['step_time_vs_lora']:.2f}x")
        row += ([beats] if has_head else []) + [", ".join(d["pareto"]) or "—"]
        lines.append("| " + " | ".join(row) + " |")
    better = "accurate" if metric == "test_accuracy" else "good (lower perplexity)"
    lines += ["", "Columns: *step time* is train seconds per optimizer step (same batches for every method); "
              + ("*beats head-only*: test accuracy strictly above the linear probe's; " if has_head else "")
              + f"*Pareto front*: the axes (trainable params, memory, train time) on which no other run is at "
              f"least as {better} for at most as much. " + ("Memory is the GPU's peak allocation." if mem == "peak_cuda_memory_mb" else
                                  "Memory is the process's peak resident set (model, data and Python included)."),
              "", f"![{_metric_label(metric)} vs trainable parameters](accuracy_vs_params.png)",
              f"![{_metric_label(metric)} vs peak memory](accuracy_vs_memory.png)",
              f"![{_metric_label(metric)} vs train time](accuracy_vs_time.png)"]
    failed = [r for r in runs if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failed runs", ""]
        for r in failed:
            lines += [f"### `{r['method']}`: {r['error']}", "", "```", r.get("error_tail") or "(no output)", "```", ""]
    if results.get("notes"):    # added to results.json by hand after the run (e.g. a longer run of one method)
        lines += ["", "## Notes", ""]
        for note in results["notes"]:
            lines += [note.strip(), ""]
    lines += ["", "## Runs", "", "| method | lr | options | epochs done | wall time (s) |", "|---|---|---|---|---|"]
    for r in runs:
        m = r.get("metrics") or {}
        opts = json.dumps(r["train_args"]["method_options"]) if r["train_args"]["method_options"] else "defaults"
        lr = m.get("lr", r["train_args"].get("lr"))
        lr_text = f"{lr:g}" if isinstance(lr, (int, float)) else "default"
        done = f"{m['steps'] / max(m['planned_steps'], 1) * s['epochs']:.2f}" if m else "—"
        lines.append(f"| `{r['method']}` | {lr_text} | `{opts}` | {done} | {r['wall_seconds']:.1f} |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()), ""]
    return "\n".join(lines)


def _place_labels(ax, fig, xs, ys, names) -> None:
    """Label each point, trying a few offsets so labels overlap neither each other nor the
    axes' edge (a small greedy placement; adjustText is not a dependency)."""
    renderer = fig.canvas.get_renderer()
    placed = []
    ax_box = ax.get_window_extent(renderer)
    offsets = [(6, 4), (6, -12), (-6, 4), (-6, -12), (6, 14), (6, -22), (-6, 14), (-6, -22), (0, 24), (0, -32)]
    for x, y, name in sorted(zip(xs, ys, names), key=lambda t: -t[1]):
        best = None
        for dx, dy in offsets:
            t = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=9,
                            ha="left" if dx >= 0 else "right", va="bottom")
            box = t.get_window_extent(renderer)
            inside = ax_box.x0 <= box.x0 and box.x1 <= ax_box.x1 and ax_box.y0 <= box.y0 and box.y1 <= ax_box.y1
            if inside and not any(box.overlaps(p) for p in placed):
                best = (t, box)
                break
            t.remove()
        if best is None:        # crowded: keep the first offset, with a leader line to the point
            t = ax.annotate(name, (x, y), xytext=offsets[0], textcoords="offset points", fontsize=9,
                            arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.5})
            best = (t, t.get_window_extent(renderer))
        placed.append(best[1])


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """The three PNG plots (matplotlib, Agg backend: no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    runs = [r for r in results["runs"] if r["status"] == "ok"]
    failed = [r["method"] for r in results["runs"] if r["status"] != "ok"]
    metric = results.get("metric", "test_accuracy")
    mem = results["summary"]["memory_key"]
    written = []
    for axis, (fname, xlabel, key) in PLOTS.items():
        key = key or mem
        if axis == "memory" and mem == "peak_cuda_memory_mb":
            xlabel = "peak GPU memory (MB)"
        elif axis == "memory":
            xlabel = "peak RSS of the process (MB)"
        fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=150)
        pts = {r["method"]: (float(r["metrics"][key]), _plot_score(metric, r["metrics"][metric])) for r in runs}
        front = pareto_front(pts, METRICS[metric])
        for name, (x, y) in pts.items():
            on = name in front
            ax.scatter([x], [y], s=60 if on else 40, marker="s" if name in BASELINES else "o", zorder=3,
                       color="tab:red" if on else "tab:blue", edgecolor="black", linewidth=0.6)
        if len(front) > 1:      # the front as a staircase: the best accuracy reachable for at most x
            fx = sorted(front, key=lambda n: pts[n][0])
            ax.step([pts[n][0] for n in fx], [pts[n][1] for n in fx], where="post", color="tab:red",
                    linestyle="--", linewidth=1, zorder=2)
        values = [p[0] for p in pts.values()]
        if axis == "params" or (values and min(values) > 0 and max(values) / min(values) > 30):
            ax.set_xscale("log")
        if pts:     # room for the labels
            ys = [p[1] for p in pts.values()]
            pad = max(1.0, 0.12 * (max(ys) - min(ys)))
            ax.set_ylim(min(ys) - pad, max(ys) + pad)
            if ax.get_xscale() == "log":
                ax.set_xlim(min(values) / 2.5, max(values) * 2.5)
            else:
                span = (max(values) - min(values)) or max(values) or 1.0
                ax.set_xlim(min(values) - 0.15 * span, max(values) + 0.25 * span)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)" if metric == "test_accuracy" else _metric_label(metric) + " (lower is better)")
        s = results["settings"]
        title = f"{task_name(results['task'])}: {_model_name(results)}, {s['epochs']} epochs, seed {s['seed']}"
        if s.get("budget_seconds"):
            title += f", budget {s['budget_seconds']:g} s per run"
        if failed:
            title += f"\nfailed, not plotted: {', '.join(failed)}"
        ax.set_title(title, fontsize=11)
        ax.grid(True, which="major", alpha=0.3)
        from matplotlib.lines import Line2D
        handles = [Line2D([], [], marker="o", color="w", markerfacecolor="tab:red", markeredgecolor="black",
                          markersize=8, label="Pareto front"),
                   Line2D([], [], marker="o", color="w", markerfacecolor="tab:blue", markeredgecolor="black",
                          markersize=7, label="dominated"),
                   Line2D([], [], marker="s", color="w", markerfacecolor="0.7", markeredgecolor="black",
                          markersize=7, label="baseline (full, head)")]
        # below the axes: inside, it would hide points and labels
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=8,
                  frameon=False)
        fig.tight_layout()
        cut = {r["method"] for r in runs if r["metrics"].get("stopped_early")}
        names = [f"{n} (cut by budget)" if n in cut else n for n in pts]
        _place_labels(ax, fig, [p[0] for p in pts.values()], [p[1] for p in pts.values()], names)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        written.append(atomic_write_bytes(out / fname, buf.getvalue()))
    return written


# ----------------------------------------------------------------------------- command

def task_name(task: str) -> str:
    return task if is_known_task(task) and not Path(task).is_file() else Path(task).stem


def command_line(ns: argparse.Namespace, out: Path, work_dir: Path) -> str:
    """The command that reproduces this report, every setting spelled out."""
    argv = ["deltatune", "bench", "methods", "--task", ns.task, "--methods", ns.methods or "",
            *(["--model", ns.model] if ns.model else []), "--epochs", str(ns.epochs), "--seed", str(ns.seed), "--batch-size",
            str(ns.batch_size), "--max-length", str(ns.max_length), "--precision", ns.precision,
            *(["--head-lr", f"{ns.head_lr:g}"] if ns.head_lr is not None else []), "--device", ns.device]
    if ns.budget_seconds is not None:
        argv += ["--budget-seconds", f"{ns.budget_seconds:g}"]
    if ns.options:
        argv += ["--options", ns.options]
    argv += ["--out", str(out), "--work-dir", str(work_dir)]
    if getattr(ns, "update", False):
        argv.append("--update")
    if not ns.methods:
        i = argv.index("--methods")
        del argv[i:i + 2]
    return shlex.join(argv)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="tweets", help="bbc, tweets, fashion (Fashion-MNIST on EfficientNet-Lite0), lm "
                   "(SmolLM2-135M on Moby Dick, perplexity), or a .csv/.jsonl file with text,label columns "
                   "(default: tweets)")
    p.add_argument("--methods", default=None, help="comma-separated registered methods (default: all of them); "
                                                   "the baselines full and head are always added")
    p.add_argument("--options", default=None, help="per-method config fields and lr as JSON, e.g. "
                                                   "'{\"lora\": {\"r\": 16, \"lr\": 5e-4}}'")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="per run: stop training after this many seconds of training steps (the schedule is still "
                        "planned for --epochs)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (default: 3)")
    p.add_argument("--model", default=None, help="default: the task's model (MiniLM for text tasks); a text task "
                   "also takes a local Hugging Face encoder folder")
    p.add_argument("--seed", type=int, default=0, help="training seed of every run (default: 0)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text (default: 128)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="(default: fp32)")
    p.add_argument("--head-lr", type=float, default=None, help="learning rate of every run's new classification "
                   "head (default: the linear probe's rate for the model: 3e-2 on transformers, 3e-3 on the convnet)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--out", default=None, help="report folder (default: docs/results/<task>)")
    p.add_argument("--work-dir", default=None, help="run folders with checkpoints (default: runs/bench/<task>)")
    p.add_argument("--update", action="store_true", help="run only --methods (no baselines) and replace their rows "
                   "in the report already in --out, whose settings must match")
    p.add_argument("--overwrite", action="store_true", help="replace the report already in --out (without it, "
                   "an existing report is kept and the command stops before training)")
    p.add_argument("--replot", default=None, metavar="DIR", help="only rewrite DIR's report.md and plots from its "
                   "results.json (no training)")


def previous_results(ns: argparse.Namespace, out: Path) -> dict[str, Any]:
    """``--update``: the report in ``out``, checked to be of the same task and settings (a row
    trained with other epochs or another seed would not be comparable)."""
    if not ns.methods:
        raise DeltatuneError("--update needs --methods: the methods whose rows to run again")
    path = out / "results.json"
    if not path.is_file():
        raise DeltatuneError(f"--update: no results.json in {out}; run without --update first (or give --out)")
    previous = json.loads(path.read_text())
    if previous.get("task") != ns.task:
        raise DeltatuneError(f"--update: {path} is a report on {previous.get('task')!r}, not on {ns.task!r}")
    differ = [f"--{k.replace('_', '-')} {getattr(ns, k)!r} (report: {previous['settings'].get(k)!r})"
              for k in SHARED_SETTINGS if previous["settings"].get(k) != getattr(ns, k)]
    if differ:
        raise DeltatuneError(f"--update: settings differ from {path}'s: {'; '.join(differ)}; give the report's "
                             "settings (its command is in report.md) or write a new report without --update")
    return previous


def merge_update(previous: dict[str, Any], records: list[dict[str, Any]], command: str, stamp: str) -> dict[str, Any]:
    """The previous report with these runs in place of its rows of the same methods (new methods
    appended), and the command that replaced them recorded."""
    new = {r["method"]: r for r in records}
    runs = [new.pop(r["method"], r) for r in previous["runs"]] + list(new.values())
    update = {"command": command, "started": stamp, "methods": [r["method"] for r in records]}
    return {**previous, "runs": runs, "updates": [*previous.get("updates", []), update]}


def rewrite_report(folder: Path) -> int:
    """``--replot DIR``: report.md and the plots again from ``DIR/results.json`` (no training)."""
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise DeltatuneError(f"--replot {folder}: no results.json there (give a folder written by bench methods)")
    results = json.loads(path.read_text())
    atomic_write_bytes(path.parent / "report.md", report_markdown(results).encode())
    write_plots(results, path.parent)
    print(f"rewrote {path.parent / 'report.md'} and 3 plots from {path}")
    return 0


@contextlib.contextmanager
def _report_lock(out: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``out`` while its report is read, merged and written, so that
    several ``--update`` runs on one report can train side by side without losing rows."""
    with open(out / ".report.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main_methods(ns: argparse.Namespace) -> int:
    if getattr(ns, "replot", None):
        return rewrite_report(Path(ns.replot))
    if not is_known_task(ns.task):
        raise DeltatuneError(f"--task {ns.task!r}: not bbc, tweets, fashion, lm nor an existing .csv/.jsonl file")
    from ..train.loop import TrainArgs
    TrainArgs(**{k: getattr(ns, k) for k in SHARED_SETTINGS}).validate()    # bad settings: fail before any run
    out = Path(ns.out) if ns.out else Path("docs") / "results" / task_name(ns.task)
    work_dir = Path(ns.work_dir) if ns.work_dir else Path("runs") / "bench" / task_name(ns.task)
    previous = previous_results(ns, out) if ns.update else None
    if previous is None and (out / "results.json").exists() and not getattr(ns, "overwrite", False):
        raise DeltatuneError(f"--out {out} already holds a report (results.json); add --overwrite to replace it, "
                             f"--update --methods ... to re-run some of its rows, or give another --out")
    runs = plan_runs(ns, work_dir)
    command = command_line(ns, out, work_dir)
    print(f"bench methods on {ns.task}: {', '.join(r['method'] for r in runs)} ({len(runs)} runs, one process each)",
          flush=True)
    started, stamp = time.perf_counter(), datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    records: list[dict[str, Any]] = []
    durations: list[float] = []
    for i, run in enumerate(runs, 1):
        rec = run_one(run, i, len(runs), started, durations)
        durations.append(rec["wall_seconds"])
        records.append(rec)
    metric = task_metric(ns.task)
    out.mkdir(parents=True, exist_ok=True)
    with _report_lock(out):
        if previous is not None:
            # read again: another --update on this report may have finished while these runs trained
            results = merge_update(previous_results(ns, out), records, command, stamp)
        else:
            results = {"task": ns.task, "command": command, "started": stamp,
                       "wall_seconds": round(time.perf_counter() - started, 1),
                       "settings": {k: getattr(ns, k) for k in SHARED_SETTINGS}, "versions": _versions(),
                       "metric": metric, "runs": records}
        results["summary"] = analyse(results["runs"], metric)
        atomic_write_bytes(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
        atomic_write_bytes(out / "report.md", report_markdown(results).encode())
        write_plots(results, out)
    failed = [r["method"] for r in records if r["status"] != "ok"]
    print(f"\nwrote {out / 'report.md'}, results.json and 3 plots in {_fmt_seconds(time.perf_counter() - started)}"
          + (f"; FAILED: {', '.join(failed)} (see the report)" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2]))
    parser = argparse.ArgumentParser(prog="deltatune bench methods")
    add_arguments(parser)
    try:
        sys.exit(main_methods(parser.parse_args()))
    except DeltatuneError as e:
        print(f"deltatune bench methods: error: {e}", file=sys.stderr)
        sys.exit(2)
