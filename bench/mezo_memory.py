"""MeZO's memory against inference: the allocator's peak (``deltatune.measure.allocator_peak``)
of one forward pass under ``torch.no_grad`` (inference), of one MeZO step (two perturbed forward
passes, the update regenerated from the seed) and, for reference, of one AdamW step with
backward, on MiniLM at 32 x 128 (real weights, a random full-size batch)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/mezo_memory.py [--method full|lora] [--json F]

"Fine-Tuning Language Models with Just Forward Passes" (Malladi et al., 2023) claims training at
inference memory; the ratio printed is MeZO's peak over inference's, weights included.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import deltatune as dt
from deltatune.measure import allocator_peak
from deltatune.memory import MB
from deltatune.optim import build_optimizer
from deltatune.plan import RunSpec, _rates, build_model, example_batch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="full")
    p.add_argument("--json", type=Path, default=None)
    ns = p.parse_args()
    spec = RunSpec(model="minilm", method=ns.method, batch_size=32, max_length=128,
                   method_options={"r": 8, "alpha": 16.0} if ns.method == "lora" else {})
    torch.manual_seed(0)
    model = build_model(spec, "cpu")
    batch = example_batch(spec)
    batch_bytes = sum(v.nbytes for v in batch.values())

    def inference():
        model.eval()
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "labels"})

    groups = dt.parameter_groups(model, 1e-6, rates=_rates(spec))
    mezo = build_optimizer("mezo", groups, 1e-6, 0.0)

    def mezo_step():
        model.eval()        # as deltatune train runs zeroth-order steps: dropout off
        mezo.step(lambda: model(**batch)[1])

    adamw = build_optimizer("adamw", dt.parameter_groups(model, 1e-5, rates=_rates(spec)), 1e-5, 0.0)

    def adamw_step():
        model.train()
        model(**batch)[1].backward()
        adamw.step()
        adamw.zero_grad(set_to_none=True)

    peaks = {}
    for name, fn, opt in (("inference", inference, None), ("mezo", mezo_step, mezo), ("adamw", adamw_step, adamw)):
        fn()        # a warm-up: lazily created state (AdamW's moments) is alive from the first step on
        resident = dt.memory_report(model, opt).total_bytes + batch_bytes     # weights, states, the batch
        peaks[name] = resident + allocator_peak(fn)
    out = {"method": ns.method, "batch": "32 x 128", **{f"{k}_peak_mb": v / MB for k, v in peaks.items()},
           "mezo_over_inference": peaks["mezo"] / peaks["inference"],
           "adamw_over_inference": peaks["adamw"] / peaks["inference"]}
    for k, v in out.items():
        print(f"{k:>22}: {v:,.3f}" if isinstance(v, float) else f"{k:>22}: {v}")
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
