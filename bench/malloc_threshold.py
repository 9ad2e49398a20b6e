"""The CPU's peak RSS against the tensor peak: a few LoRA steps on MiniLM at 32 x 128, printing
the median step time and the peak RSS. Run it with and without glibc's mmap threshold fixed::

    OMP_NUM_THREADS=1 .venv/bin/python bench/malloc_threshold.py
    MALLOC_MMAP_THRESHOLD_=1048576 OMP_NUM_THREADS=1 .venv/bin/python bench/malloc_threshold.py

(see docs/plan.md, "How close it is").
"""

from __future__ import annotations

import os
import statistics
import time

import torch

import deltatune as dt
from deltatune.optim import build_optimizer
from deltatune.plan import RunSpec, _rates, build_model, example_batch
from deltatune.train.loop import peak_rss_mb


def main(steps: int = 6) -> None:
    spec = RunSpec(model="minilm", method="lora", method_options={"r": 8, "alpha": 16.0}, batch_size=32,
                   max_length=128)
    torch.manual_seed(0)
    model = build_model(spec, "cpu")
    model.train()
    batch = example_batch(spec)
    opt = build_optimizer("adamw", dt.parameter_groups(model, 1e-3, rates=_rates(spec)), 1e-3, 0.0)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        _, loss = model(**batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    print(f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', '(unset)')}: median step "
          f"{statistics.median(times[1:]):.2f} s, peak RSS {peak_rss_mb():,.0f} MB")


if __name__ == "__main__":
    main()
