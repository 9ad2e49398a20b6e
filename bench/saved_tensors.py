"""What each training configuration of `deltatune bench speed` keeps for backward: the bytes of
the distinct non-parameter storages autograd saves during one forward (a pack hook on the real
batch). This is the part of peak memory an implementation controls; the rest of the peak
(weights, optimizer state, the transient buffers of backward, the allocator) is measured by
`bench speed`'s peak-RSS processes. deltatune's figures are deterministic (a loaded machine gives
the same); PEFT's DoRA moved by ~1 % between runs here.

    .venv/bin/python bench/saved_tensors.py [--workloads minilm,smollm2] [--out bench/results/saved_tensors.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from deltatune.bench.speed import load_workload, training_configs
from deltatune.files import atomic_write_bytes


def saved_mb(model: torch.nn.Module, loss_fn, batch) -> float:
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        # keep the storage alive, as autograd would (a freed address could be reused and go
        # uncounted), but not the tensor itself: a saved output packed as itself points back
        # to its own graph node, a cycle that is never freed
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model, batch)
    del loss
    return sum(seen.values()) / 2 ** 20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workloads", default="minilm,smollm2")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    out = {}
    for wl in a.workloads.split(","):
        w = load_workload(wl)
        out[wl] = {}
        for name, build in training_configs(wl).items():
            torch.manual_seed(0)
            m = build(w).train()
            out[wl][name] = round(saved_mb(m, w.loss, w.batch), 1)
            print(f"{wl}: {name}: {out[wl][name]:.0f} MB saved for backward", flush=True)
            del m
    if a.out:
        data = {"torch": torch.__version__, "saved_for_backward_mb": out}
        atomic_write_bytes(a.out, (json.dumps(data, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
