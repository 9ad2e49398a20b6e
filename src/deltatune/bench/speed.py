"""``deltatune bench speed``: deltatune against Hugging Face PEFT on the same model and batch.

Workloads: the packaged MiniLM classifier on a real BBC News batch of 32 x 128 tokens, and the
packaged SmolLM2-135M as a causal LM on 8 x 128 tokens of the same text. Every configuration of
a workload is built in one process from one copy of the base weights and timed *interleaved*:
each round runs one training step of every configuration in turn. The s/step figure is the
median over rounds; every time ratio (``checks``, the "x floor", "x PEFT" and "x plain model"
columns) is the median of the per-round paired ratios, so that machine noise, which moves two
runs here by up to 15 %, hits numerator and denominator of each pair alike. The per-round times
are kept in the results (``rounds_s``). Peak memory is measured in separate processes (one per
configuration: peak RSS is per process), as are the ratios built from it.

A step is forward, backward and an AdamW step on the trainable parameters. There is one *floor*
per target set (``TARGETS``: "floor qv", "floor all"): every weight frozen, the outputs of the
modules that target set names made to require a gradient. That is the least any method adapting
those modules must pay: the forward, and the backward from the loss down to the first adapted
module's output, with no weight gradient (no input gradient below the first adapted module
either, which an adapter on it does not need). Each configuration is measured against the floor
of the target set it adapts (``floor_of``); full fine-tuning, which adapts every module, against
"floor all", a lower bound for it too.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core.errors import DeltatuneError
from ..files import atomic_write_bytes
from ..train.loop import peak_rss_mb

HEAD = "classifier"
TARGETS = {
    "minilm": {"qv": ["query", "value"], "all": r"re:.*encoder\.layer\.\d+\..*(query|key|value|dense)$"},
    "smollm2": {"qv": ["q_proj", "v_proj"],
                "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
}
SHAPES = {"minilm": (32, 128), "smollm2": (8, 128)}


# ----------------------------------------------------------------------------- workloads

@dataclasses.dataclass
class Workload:
    name: str
    base: nn.Module                     # never trained: every configuration gets a deep copy
    batch: dict[str, torch.Tensor]
    loss: Callable[[nn.Module, dict], torch.Tensor]
    # the memory runs build one configuration on the base itself: a copy would stay in the peak
    consume_base: bool = False

    def model(self) -> nn.Module:
        return self.base if self.consume_base else copy.deepcopy(self.base)


def _bbc_texts(n: int) -> list[str]:
    from ..train.data import load_task
    task = load_task("bbc")
    return task.train_texts[:n]


def _fixed_batch(tokenizer, texts: list[str], length: int) -> dict[str, torch.Tensor]:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(texts, truncation=True, max_length=length, padding="max_length", return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def load_workload(name: str) -> Workload:
    from ..train.model import build_classifier, load_causal_lm, load_tokenizer
    n, length = SHAPES[name]
    texts = _bbc_texts(max(n, 64))
    if name == "minilm":
        base = build_classifier("minilm", 5, seed=0)
        batch = _fixed_batch(load_tokenizer("minilm"), texts[:n], length)
        batch["labels"] = torch.arange(n) % 5
        wide = _fixed_batch(load_tokenizer("minilm"), texts[:64], length)
        return Workload(name, base, {**batch, "wide": wide}, lambda m, b: m(b["input_ids"], b["attention_mask"],
                                                                             b["labels"])[1])
    if name == "smollm2":
        base, tok = load_causal_lm("smollm2")
        batch = _fixed_batch(tok, texts[:n], length)
        wide = _fixed_batch(tok, texts[:64], length)

        def lm_loss(m, b):
            labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss
        return Workload(name, base, {**batch, "wide": wide}, lm_loss)
    raise DeltatuneError(f"unknown workload {name!r}: choose from {', '.join(SHAPES)}")


# ----------------------------------------------------------------------------- configurations

def _require_peft():
    try:
        import peft
    except ImportError:
        raise DeltatuneError("the comparison needs Hugging Face PEFT: `pip install 'deltatune[dev]'` (or `pip "
                             "install peft`)") from None
    return peft


def _ours(w: Workload, method: str, r: int, targets, dropout: float) -> nn.Module:
    import deltatune as dt
    m = w.model()
    extra = {"trainable_modules": [HEAD]} if w.name == "minilm" else {}
    dt.attach(m, dt.config(method, r=r, alpha=2.0 * r, dropout=dropout, targets=targets, **extra))
    return m


def _peft(w: Workload, r: int, targets, dropout: float, dora: bool = False) -> nn.Module:
    peft = _require_peft()
    m = w.model()
    if isinstance(targets, str) and targets.startswith("re:"):
        targets = targets[3:]
    extra = {"modules_to_save": [HEAD]} if w.name == "minilm" else {}
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets, use_dora=dora,
                          **extra)
    return peft.get_peft_model(m, cfg)


def _target_list(targets) -> list:
    return [targets] if isinstance(targets, str) else list(targets)


def floor_modules(model: nn.Module, targets) -> list[str]:
    """Names of the modules of ``model`` that ``targets`` adapt, matched as deltatune matches them."""
    from ..core.engine import match_pattern
    patterns = _target_list(targets)
    return [n for n, mod in model.named_modules() if n and any(match_pattern(n, mod, p) for p in patterns)]


def _require_grad(mod, inp, out):
    # a leaf (first adapted module: nothing below asks for a gradient) starts the backward here;
    # further up the output already requires one
    if isinstance(out, torch.Tensor) and not out.requires_grad:
        out.requires_grad_(True)
    return out


def floor_model(model: nn.Module, targets) -> nn.Module:
    """``model`` frozen, with the outputs of the modules ``targets`` adapt made to require a
    gradient: backward runs from the loss down to the first adapted module's output and no further,
    and forms no weight gradient."""
    names = floor_modules(model, targets)
    if not names:
        raise DeltatuneError(f"targets {targets!r} matched no module of {type(model).__name__}")
    model.requires_grad_(False)
    mods = dict(model.named_modules())
    for n in names:
        mods[n].register_forward_hook(_require_grad)
    return model


def _floor(w: Workload, targets) -> nn.Module:
    return floor_model(w.model(), targets)


def _full(w: Workload) -> nn.Module:
    m = w.model()
    m.requires_grad_(True)
    return m


def training_configs(workload: str) -> dict[str, Callable[[Workload], nn.Module]]:
    t = TARGETS[workload]
    return {
        **{f"floor {k}": (lambda w, v=v: _floor(w, v)) for k, v in t.items()},
        "full fine-tuning": _full,
        "deltatune lora r8 qv drop0.1": lambda w: _ours(w, "lora", 8, t["qv"], 0.1),
        "peft lora r8 qv drop0.1": lambda w: _peft(w, 8, t["qv"], 0.1),
        "deltatune lora r8 qv drop0": lambda w: _ours(w, "lora", 8, t["qv"], 0.0),
        "peft lora r8 qv drop0": lambda w: _peft(w, 8, t["qv"], 0.0),
        "deltatune lora r16 all": lambda w: _ours(w, "lora", 16, t["all"], 0.0),
        "peft lora r16 all": lambda w: _peft(w, 16, t["all"], 0.0),
        "deltatune dora r16 all": lambda w: _ours(w, "dora", 16, t["all"], 0.0),
        "peft dora r16 all": lambda w: _peft(w, 16, t["all"], 0.0, dora=True),
    }


def floor_of(config: str) -> str:
    """The floor a configuration is measured against: that of the target set it adapts (the
    ``TARGETS`` key among the words of its name); full fine-tuning against "floor all"; a floor
    against itself."""
    if config.startswith("floor "):
        return config
    if config == "full fine-tuning":
        return "floor all"
    known = list(dict.fromkeys(k for t in TARGETS.values() for k in t))
    sets = [k for k in known if k in config.split()]
    if len(sets) != 1:
        raise DeltatuneError(f"configuration {config!r} names no single target set of {', '.join(known)}")
    return f"floor {sets[0]}"


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _step(w: Workload, model: nn.Module, opt) -> None:
    loss = w.loss(model, w.batch)
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- timing

def time_interleaved(fns: dict[str, Callable[[], None]], rounds: int, warmup: int = 1,
                     progress: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin: ``rounds`` rounds after ``warmup``."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rnd in range(warmup + rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt_ = time.perf_counter() - t0
            if rnd >= warmup:
                times[name].append(dt_)
        if progress is not None:
            progress(f"round {rnd + 1}/{warmup + rounds}" + (" (warm-up)" if rnd < warmup else ""))
    return times


def _summary(v: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(v), "min_s": min(v), "runs": len(v), "rounds_s": list(v)}


def paired_ratio(num: dict, den: dict) -> float:
    """Median over rounds of ``num``'s time over ``den``'s time in the same round (both timed
    interleaved, so a round's noise hits both). Results without per-round times (older files) fall
    back to the ratio of the medians."""
    a, b = num.get("rounds_s"), den.get("rounds_s")
    if a and b and len(a) == len(b):
        return statistics.median(x / y for x, y in zip(a, b))
    return num["median_s"] / den["median_s"]


def bench_training(w: Workload, rounds: int, progress) -> dict[str, dict[str, float]]:
    models, fns = {}, {}
    for name, build in training_configs(w.name).items():
        torch.manual_seed(0)
        m = build(w)
        m.train()
        params = _trainable(m)
        opt = torch.optim.AdamW(params, lr=1e-5) if params else None
        models[name] = m
        fns[name] = (lambda m=m, opt=opt: _step(w, m, opt))
    times = time_interleaved(fns, rounds, progress=progress)
    return {k: {**_summary(v), "trainable_params": sum(p.numel() for p in _trainable(models[k]))}
            for k, v in times.items()}


def _lora_adapters(model: nn.Module, names: list[str], targets) -> None:
    import deltatune as dt
    for i, n in enumerate(names):
        dt.attach(model, dt.config("lora", r=8, alpha=16.0, targets=targets), name=n)
        torch.manual_seed(100 + i)
        for pn, p in model.named_parameters():
            if f".{n}." in pn and "lora_B" in pn:
                with torch.no_grad():
                    p.normal_(std=0.02)


def bench_inference(w: Workload, rounds: int, progress) -> dict[str, dict[str, float]]:
    """Unmerged LoRA inference against the plain model, and mixed batches over many adapters
    (ours: ``per_sample_adapters``; PEFT: ``adapter_names``)."""
    import deltatune as dt
    peft = _require_peft()
    qv = TARGETS[w.name]["qv"]
    wide = w.batch["wide"]
    fwd_batch = {"input_ids": w.batch["input_ids"], "attention_mask": w.batch["attention_mask"]}

    def call(m, b):
        if w.name == "minilm":
            return lambda: m(b["input_ids"], b["attention_mask"])
        return lambda: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    plain = w.model().eval()
    single = _ours(w, "lora", 8, qv, 0.0).eval()
    for n, p in single.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(std=0.02)
    peft_single = _peft(w, 8, qv, 0.0).eval()

    ours_many = w.model().eval()
    names32 = [f"a{i}" for i in range(32)]
    _lora_adapters(ours_many, names32, qv)
    per32 = [names32[i % 32] for i in range(64)]
    per8 = [names32[i % 8] for i in range(64)]

    peft_many = peft.get_peft_model(w.model(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=qv),
                                    adapter_name=names32[0])
    for n in names32[1:]:
        peft_many.add_adapter(n, peft.LoraConfig(r=8, lora_alpha=16, target_modules=qv))
    for pn, p in peft_many.named_parameters():
        if "lora_B" in pn:
            with torch.no_grad():
                p.normal_(std=0.02)
    peft_many.eval()

    def ours_mixed(names):
        def run():
            with dt.per_sample_adapters(ours_many, names):
                call(ours_many, wide)()
        return run

    def ours_one():
        dt.set_active(ours_many, [names32[0]])
        call(ours_many, wide)()

    def peft_mixed(names):
        if w.name == "minilm":
            return lambda: peft_many(wide["input_ids"], wide["attention_mask"], adapter_names=names)
        return lambda: peft_many(input_ids=wide["input_ids"], attention_mask=wide["attention_mask"],
                                 adapter_names=names)

    fns = {
        "plain model inference": call(plain, fwd_batch),
        "deltatune lora unmerged inference": call(single, fwd_batch),
        "peft lora unmerged inference": call(peft_single, fwd_batch),
        "deltatune mixed 64 over 32 adapters": ours_mixed(per32),
        "peft mixed 64 over 32 adapters": peft_mixed(per32),
        "deltatune mixed 64 over 8 adapters": ours_mixed(per8),
        "deltatune 64 with one adapter": ours_one,
        "plain model 64": call(plain, wide),    # the least any mixed batch of 64 can cost
    }
    with torch.inference_mode():
        times = time_interleaved(fns, rounds, progress=progress)
    return {k: _summary(v) for k, v in times.items()}


def memory_worker(workload: str, config: str, steps: int) -> dict[str, float]:
    w = load_workload(workload)
    w.consume_base = True
    m = training_configs(workload)[config](w)
    m.train()
    params = _trainable(m)
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None
    before = peak_rss_mb()
    for _ in range(steps):
        _step(w, m, opt)
    return {"peak_rss_mb": round(peak_rss_mb(), 1), "peak_rss_before_training_mb": round(before, 1)}


def bench_memory(workload: str, steps: int, progress) -> dict[str, dict[str, float]]:
    out = {}
    configs = list(training_configs(workload))
    for i, config in enumerate(configs):
        progress(f"memory {i + 1}/{len(configs)}: {config}")
        cmd = [sys.executable, "-m", "deltatune.bench.speed", "--memory-worker", workload, config, str(steps)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise DeltatuneError(f"memory run of {config!r} on {workload} failed:\n{res.stderr[-2000:]}")
        out[config] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# ----------------------------------------------------------------------------- report

# (what, measured ratio of (numerator, denominator) figures, bound)
# time ratios are medians of per-round paired ratios; memory ratios are of single figures
def checks(workload: str, train: dict, mem: dict | None, inf: dict | None) -> list[dict[str, Any]]:
    rows = []

    def add(what, num, den, bound, kind="time"):
        src = train if kind == "time" else (mem or {}) if kind == "memory" else (inf or {})
        if num not in src or den not in src:
            return
        if kind == "memory":
            ratio = src[num]["peak_rss_mb"] / src[den]["peak_rss_mb"]
        else:
            ratio = paired_ratio(src[num], src[den])
        rows.append({"workload": workload, "check": what, "ratio": round(ratio, 3), "bound": bound,
                     "pass": ratio <= bound})

    if workload == "minilm":
        add("lora r8 qv drop0.1 vs PEFT", "deltatune lora r8 qv drop0.1", "peft lora r8 qv drop0.1", 0.95)
        add("lora r8 qv drop0.1 vs floor", "deltatune lora r8 qv drop0.1", floor_of("deltatune lora r8 qv drop0.1"),
            1.06)
        add("lora r8 qv drop0 vs floor", "deltatune lora r8 qv drop0", floor_of("deltatune lora r8 qv drop0"), 1.04)
        add("inference unmerged vs plain", "deltatune lora unmerged inference", "plain model inference", 1.03,
            "inference")
        add("mixed 32 adapters vs PEFT", "deltatune mixed 64 over 32 adapters", "peft mixed 64 over 32 adapters",
            0.7, "inference")
        add("mixed 8 adapters vs one adapter", "deltatune mixed 64 over 8 adapters", "deltatune 64 with one adapter",
            1.05, "inference")
    add("lora r16 all vs PEFT", "deltatune lora r16 all", "peft lora r16 all", 0.85)
    add("lora r16 all vs floor", "deltatune lora r16 all", floor_of("deltatune lora r16 all"), 1.12)
    add("lora r16 all memory vs PEFT", "deltatune lora r16 all", "peft lora r16 all", 0.85, "memory")
    add("dora r16 all vs our lora r16 all", "deltatune dora r16 all", "deltatune lora r16 all", 1.10)
    add("dora r16 all vs PEFT dora", "deltatune dora r16 all", "peft dora r16 all", 0.85)
    return rows


def table(workload: str, train: dict, mem: dict | None, inf: dict | None) -> str:
    """s/step is the median over rounds; "x floor" (against the floor named in the row) and
    "x PEFT" are medians of per-round paired ratios."""
    lines = [f"### {workload} (batch {SHAPES[workload][0]} x {SHAPES[workload][1]})", "",
             "| configuration | s/step | floor | x floor | x PEFT | peak RSS MB | memory x PEFT |",
             "|---|---|---|---|---|---|---|"]
    for k, v in train.items():
        try:
            floor = floor_of(k)
        except DeltatuneError:
            floor = None
        x_floor = f"{paired_ratio(v, train[floor]):.2f}" if floor in train else ""
        twin = k.replace("deltatune ", "peft ", 1) if k.startswith("deltatune ") else None
        x_peft = f"{paired_ratio(v, train[twin]):.2f}" if twin in train else ""
        mb = mem.get(k, {}).get("peak_rss_mb") if mem else None
        mem_x = (f"{mb / mem[twin]['peak_rss_mb']:.2f}" if mb and twin and mem and twin in mem else "")
        lines.append(f"| {k} | {v['median_s']:.3f} | {floor if floor in train else ''} | {x_floor} | {x_peft} | "
                     f"{'' if mb is None else f'{mb:.0f}'} | {mem_x} |")
    if inf:
        plain = inf.get("plain model inference")
        lines += ["", "| inference | s/batch | x plain model |", "|---|---|---|"]
        for k, v in inf.items():
            lines.append(f"| {k} | {v['median_s']:.3f} | {'' if plain is None else f'{paired_ratio(v, plain):.2f}'} |")
    return "\n".join(lines)


def checks_table(rows: list[dict[str, Any]]) -> str:
    """The issue's bounds against the measured ratios, as one markdown table."""
    lines = ["| check | ratio | bound | holds |", "|---|---|---|---|"]
    lines += [f"| {c['workload']}: {c['check']} | {c['ratio']:.2f} | <= {c['bound']} | "
              f"{'yes' if c['pass'] else '**no**'} |" for c in rows]
    return "\n".join(lines)


def run(workloads: list[str], rounds: int, memory: bool, inference: bool, out: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": rounds,
                               "workloads": {}, "checks": []}
    try:
        import peft
        results["peft"] = peft.__version__
    except ImportError:
        _require_peft()
    md = []
    for wl in workloads:
        def progress(msg, wl=wl):
            print(f"[{time.strftime('%H:%M:%S')}] {wl}: {msg}", file=sys.stderr, flush=True)
        progress("loading")
        w = load_workload(wl)
        train = bench_training(w, rounds, progress)
        inf = bench_inference(w, rounds, progress) if inference and wl == "minilm" else None
        del w
        mem = bench_memory(wl, 3, progress) if memory else None
        results["workloads"][wl] = {"training": train, "inference": inf, "memory": mem}
        results["checks"] += checks(wl, train, mem, inf)
        md.append(table(wl, train, mem, inf))
        print(md[-1], flush=True)
    md.append(checks_table(results["checks"]))
    print(md[-1])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "speed.json", (json.dumps(results, indent=2) + "\n").encode())
    atomic_write_bytes(out / "speed.md", ("\n\n".join(md) + "\n").encode())
    print(f"\nwrote {out / 'speed.json'} and {out / 'speed.md'}")
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workloads", default="minilm,smollm2", help="comma-separated: minilm, smollm2")
    p.add_argument("--rounds", type=int, default=5,
                   help="timed rounds per configuration (medians reported; ratios are medians of per-round ratios)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory processes")
    p.add_argument("--no-inference", dest="inference", action="store_false", help="skip the inference timings")
    p.add_argument("--out", default="bench/results", help="folder for speed.json and speed.md")
    p.add_argument("--overwrite", action="store_true", help="replace the speed.json and speed.md already in --out")


def main_speed(ns: argparse.Namespace) -> int:
    workloads = [x.strip() for x in ns.workloads.split(",") if x.strip()]
    bad = [x for x in workloads if x not in SHAPES]
    if bad:
        raise DeltatuneError(f"unknown workload(s) {', '.join(bad)}: choose from {', '.join(SHAPES)}")
    if ns.rounds < 1:
        raise DeltatuneError(f"--rounds must be >= 1, got {ns.rounds}")
    existing = [f for f in ("speed.json", "speed.md") if (Path(ns.out) / f).exists()]
    if existing and not getattr(ns, "overwrite", False):
        raise DeltatuneError(f"--out {ns.out} already holds {', '.join(existing)}; add --overwrite to replace them, "
                             f"or give another --out")
    run(workloads, ns.rounds, ns.memory, ns.inference, Path(ns.out))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--memory-worker":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        print(json.dumps(memory_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:
        p = argparse.ArgumentParser(prog="deltatune bench speed")
        add_arguments(p)
        sys.exit(main_speed(p.parse_args()))
