"""Does ``torch.compile`` pay on a CPU? deltatune LoRA (r=8, query/value) on the packaged MiniLM,
a real BBC batch of 32 x 128: eager against compiled, training step and inference, timed
interleaved in one process (medians), plus the one-off compile time.

    .venv/bin/python bench/compile_cpu.py [--rounds 6] [--out bench/results/compile_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from deltatune.bench.speed import _ours, _step, load_workload, time_interleaved


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    w = load_workload("minilm")
    eager = _ours(w, "lora", 8, ["query", "value"], 0.0).train()
    compiled_model = _ours(w, "lora", 8, ["query", "value"], 0.0).train()
    compiled = torch.compile(compiled_model)
    opt_e = torch.optim.AdamW([q for q in eager.parameters() if q.requires_grad], lr=1e-5)
    opt_c = torch.optim.AdamW([q for q in compiled_model.parameters() if q.requires_grad], lr=1e-5)
    batch = {k: w.batch[k] for k in ("input_ids", "attention_mask")}

    t0 = time.perf_counter()
    _step(w, compiled, opt_c)
    compile_train_s = time.perf_counter() - t0
    with torch.inference_mode():
        eager.eval(), compiled_model.eval()
        t0 = time.perf_counter()
        compiled(**batch)
        compile_infer_s = time.perf_counter() - t0
        inf = time_interleaved({"eager": lambda: eager(**batch), "compiled": lambda: compiled(**batch)}, a.rounds)
    eager.train(), compiled_model.train()
    train = time_interleaved({"eager": lambda: _step(w, eager, opt_e), "compiled": lambda: _step(w, compiled, opt_c)},
                             a.rounds)
    res = {
        "train_step_s": {k: statistics.median(v) for k, v in train.items()},
        "inference_s": {k: statistics.median(v) for k, v in inf.items()},
        "first_compiled_train_step_s": round(compile_train_s, 1),
        "first_compiled_inference_s": round(compile_infer_s, 1),
        "torch": torch.__version__,
    }
    res["train_ratio_compiled_to_eager"] = res["train_step_s"]["compiled"] / res["train_step_s"]["eager"]
    res["inference_ratio_compiled_to_eager"] = res["inference_s"]["compiled"] / res["inference_s"]["eager"]
    print(json.dumps(res, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
