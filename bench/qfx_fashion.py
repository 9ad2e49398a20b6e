"""QFX on ``fashion``: float fine-tuning, post-training fixed point, and quantisation-aware
fine-tuning with learned binary points, on the ImageNet-pretrained EfficientNet-Lite0.

    python bench/qfx_fashion.py --out docs/results/qfx [--quick]

1. The float model: full fine-tuning for one epoch (AdamW, the fashion defaults: 1e-3, head
   3e-3, linear warmup and decay), its test accuracy in float32.
2. For each configuration (8-bit weights and activations; 4-bit weights and 6-bit activations;
   8-bit K-hot weights with K = 2): post-training fixed point (``dt.qfx`` calibrated on 8 training
   batches, nothing trained) and QFX (the same, then one epoch of fine-tuning of every weight and
   every binary point). Accuracy from the float64 emulation, i.e. the exact fixed-point model.
3. The 8/8 QFX model exported (``dt.qfx_export``) and run by ``integer_infer`` on the whole test
   split: its logits against the emulation's, ``torch.equal``.
4. The learned integer bits per layer against their calibrated start, plotted.

Writes ``results.json``, ``report.md`` and ``binary_points.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

import deltatune as dt
from deltatune.files import atomic_write_bytes
from deltatune.quant import integer_infer
from deltatune.quant.qfx import QfxWeighted, qfx_modules
from deltatune.train.vision import LABELS, ImageClassifier, load_efficientnet_lite0, load_fashion

CONFIGS = {"w8a8": dict(weight_bits=8, act_bits=8), "w4a6": dict(weight_bits=4, act_bits=6),
           "w8a8-khot2": dict(weight_bits=8, act_bits=8, weight_khot=2)}
BATCH, CALIBRATION_BATCHES = 32, 8


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def evaluate(model: torch.nn.Module, test, dtype=torch.float32) -> tuple[float, torch.Tensor]:
    model.eval()
    logits = []
    with torch.no_grad():
        for batch in test.batches(100):
            logits.append(model(pixel_values=batch["pixel_values"].to(dtype)))
    logits = torch.cat(logits)
    return float((logits.argmax(-1) == test.labels).float().mean()), logits


def fit(model, train, groups, steps_limit: int | None, seed: int, label: str) -> float:
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    steps = train.num_batches(BATCH) if steps_limit is None else steps_limit
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    model.train()
    start, losses = time.perf_counter(), []
    for step, batch in enumerate(train.batches(BATCH, order)):
        if step >= steps:
            break
        _, loss = model(**batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            log(f"{label}: step {step + 1}/{steps}, loss {sum(losses[-10:]) / len(losses[-10:]):.4f}")
    return time.perf_counter() - start


def binary_points(model) -> list[dict]:
    rows = []
    for name, op in qfx_modules(model).items():
        row = {"op": name, "kind": op.kind, "output": op.output.format().int_bits}
        if isinstance(op, QfxWeighted):
            bits = [f.int_bits for f in op.weight.channel_formats()]
            row["weight"] = sum(bits) / len(bits)       # mean over output channels
        rows.append(row)
    return rows


def plot(start: list[dict], learned: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 1, figsize=(14, 7), sharex=False)
    for ax, key, title in ((axes[0], "weight", "weights (conv / linear)"), (axes[1], "output", "op outputs")):
        idx = [i for i, r in enumerate(start) if key in r]
        ax.step(range(len(idx)), [start[i][key] for i in idx], where="mid", label="calibrated start", color="0.6")
        ax.step(range(len(idx)), [learned[i][key] for i in idx], where="mid", label="learned (QFX, 1 epoch)", color="C0")
        ax.set_ylabel("integer bits I")
        ax.set_title(f"integer bits I of {title} (weights: mean over output channels), in network order")
        ax.set_xlabel("op index")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/results/qfx")
    p.add_argument("--quick", action="store_true", help="3 steps per training and 200 test images: a smoke test")
    p.add_argument("--qat-lr", type=float, default=1e-4, help="QFX fine-tuning rate of the weights (head: 3x)")
    p.add_argument("--point-lr", type=float, default=1e-2, help="rate of the learned integer bits")
    p.add_argument("--configs", default=",".join(CONFIGS))
    ns = p.parse_args()
    torch.manual_seed(0)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_fashion()
    if ns.quick:
        test.images, test.labels = test.images[:200], test.labels[:200]
    limit = 3 if ns.quick else None
    model = ImageClassifier(load_efficientnet_lite0(), len(LABELS))
    head = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    seconds = fit(model, train, [{"params": body, "lr": 1e-3}, {"params": head, "lr": 3e-3}], limit, 0, "float")
    float_acc, _ = evaluate(model, test)
    log(f"float: {100 * float_acc:.2f} %")
    results = {"command": "python bench/qfx_fashion.py " + " ".join(sys.argv[1:]), "float": {
        "accuracy": float_acc, "train_seconds": round(seconds, 1)}, "qat_lr": ns.qat_lr, "point_lr": ns.point_lr,
        "runs": {}}
    calibration = [b["pixel_values"] for _, b in zip(range(CALIBRATION_BATCHES), train.batches(BATCH))]
    for name in ns.configs.split(","):
        options = CONFIGS[name]
        ptq = dt.qfx(copy.deepcopy(model), calibration=calibration, **options)
        ptq_acc, _ = evaluate(ptq.double(), test, torch.float64)
        log(f"{name} post-training: {100 * ptq_acc:.2f} %")
        qat = dt.qfx(copy.deepcopy(model), calibration=calibration, **options)
        start = binary_points(qat)
        points = [p for n, p in qat.named_parameters() if n.endswith("int_bits") and p.requires_grad]
        head = [p for n, p in qat.named_parameters() if n.startswith("classifier.") and not n.endswith("int_bits")]
        body = [p for n, p in qat.named_parameters() if not n.startswith("classifier.") and not n.endswith("int_bits")]
        seconds = fit(qat, train, [{"params": body, "lr": ns.qat_lr}, {"params": head, "lr": 3 * ns.qat_lr},
                                   {"params": points, "lr": ns.point_lr}], limit, 1, f"{name} qfx")
        qat = qat.double()
        qat_acc, logits = evaluate(qat, test, torch.float64)
        learned = binary_points(qat)
        log(f"{name} QFX: {100 * qat_acc:.2f} % (post-training {100 * ptq_acc:.2f} %, float {100 * float_acc:.2f} %)")
        run = {"options": options, "post_training_accuracy": ptq_acc, "qfx_accuracy": qat_acc,
               "qfx_minus_float": qat_acc - float_acc, "qfx_minus_post_training": qat_acc - ptq_acc,
               "train_seconds": round(seconds, 1), "changed_binary_points": sum(
                   a != b for s, l in zip(start, learned) for a, b in zip(s.values(), l.values())),
               "binary_points_start": start, "binary_points_learned": learned}
        if name == "w8a8":
            folder = out / "export-w8a8"
            dt.qfx_export(qat, folder, header=False)
            t0 = time.perf_counter()
            integer = integer_infer(folder, torch.cat([b["pixel_values"] for b in test.batches(100)]).double())
            run["integer_infer"] = {"test_images": len(test), "equal": bool(torch.equal(integer.to_tensor(), logits)),
                                    "max_abs_difference": float((integer.to_tensor() - logits).abs().max()),
                                    "seconds": round(time.perf_counter() - t0, 1),
                                    "accuracy": float((integer.to_tensor().argmax(-1) == test.labels).float().mean())}
            log(f"integer_infer on {len(test)} test images: equal={run['integer_infer']['equal']}")
            plot(start, learned, out / "binary_points.png")
            for f in folder.iterdir():          # the exported weights are a by-product, not results
                f.unlink()
            folder.rmdir()
        results["runs"][name] = run
        atomic_write_bytes(out / "results.json", (json.dumps(results, indent=1) + "\n").encode())
    atomic_write_bytes(out / "report.md", report(results).encode())
    log(f"wrote {out / 'report.md'}")
    return 0


def report(results: dict) -> str:
    lines = ["# QFX on fashion (EfficientNet-Lite0, Fashion-MNIST 3,000 / 1,000 images at 64 px)", "",
             f"Command: `{results['command']}`", "",
             f"Float model (full fine-tuning, one epoch): **{100 * results['float']['accuracy']:.2f} %**. "
             f"QFX fine-tunes it one more epoch at weight rate {results['qat_lr']:g} (head 3x), integer-bit "
             f"rate {results['point_lr']:g}; every accuracy below is the float64 emulation, i.e. the exact "
             f"fixed-point model.", "",
             "| weights / activations | post-training fixed point | QFX | QFX - float | QFX - post-training | "
             "binary points moved |", "|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        o = r["options"]
        label = f"{o['weight_bits']} / {o['act_bits']}" + (f", K-hot K = {o['weight_khot']}" if o.get("weight_khot") else "")
        lines.append(f"| {label} | {100 * r['post_training_accuracy']:.2f} % | {100 * r['qfx_accuracy']:.2f} % | "
                     f"{100 * r['qfx_minus_float']:+.2f} | {100 * r['qfx_minus_post_training']:+.2f} | "
                     f"{r['changed_binary_points']} |")
    ii = results["runs"].get("w8a8", {}).get("integer_infer")
    if ii:
        lines += ["", f"`integer_infer` (numpy int64) on the exported 8/8 model, {ii['test_images']} test images: "
                  f"logits equal to the emulation's: **{ii['equal']}** (max difference {ii['max_abs_difference']:g}; "
                  f"accuracy {100 * ii['accuracy']:.2f} %, {ii['seconds']} s).", "",
                  "![learned binary points](binary_points.png)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
