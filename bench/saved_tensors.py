"""What each training configuration of `deltatune bench speed` keeps for backward: the bytes of
the distinct non-parameter storages autograd saves during one forward (a pack hook on the real
batch). This is the part of peak memory an implementation controls; the rest of the peak
(weights, optimizer state, the transient buffers of backward, the allocator) is measured by
`bench speed`'s peak-RSS processes. Deterministic, so a loaded machine gives the same figures.

    .venv/bin/python bench/saved_tensors.py [--workloads minilm,smollm2] [--out bench/results/saved_tensors.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from deltatune.bench.speed import load_workload, training_configs


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
    p.add_argument("--skip", action="append", default=[], metavar="WORKLOAD:CONFIG",
                   help="leave out one configuration (repeatable)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    out = {}
    for wl in a.workloads.split(","):
        w = load_workload(wl)
        out[wl] = {}
        for name, build in training_configs(wl).items():
            if f"{wl}:{name}" in a.skip:
                continue
            torch.manual_seed(0)
            m = build(w).train()
            out[wl][name] = round(saved_mb(m, w.loss, w.batch), 1)
            print(f"{wl}: {name}: {out[wl][name]:.0f} MB saved for backward", flush=True)
            del m
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"torch": torch.__version__, "saved_for_backward_mb": out}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
