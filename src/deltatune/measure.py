"""Memory of real training steps, to hold ``deltatune plan``'s predictions against: the
allocator's tensor peak (``allocator_peak``), the process's peak resident memory, and
``measure_training``, which runs two steps of a planned run with its pretrained weights.

The tensor peak is what a plan predicts; the peak RSS also holds the runtime, what loading the
weights left behind, and what the C library keeps of freed memory: glibc serves blocks below its
mmap threshold from the heap and raises that threshold to the size of each mmapped block freed
(up to 32 MiB), so a step's activations come from the heap, which keeps their pages once they are
freed. ``MALLOC_MMAP_THRESHOLD_=1048576`` in the environment fixes the threshold (and ends the
raising): freed blocks of 1 MiB or more go back to the system, at the price of fresh page faults.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import torch

from .memory import MB
from .plan import RunSpec, _rates, build_model, example_batch
from .planner import StepTrace, enable_checkpointing, rss_bytes, trace_step, train_loss


def allocator_peak(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """The most bytes the allocator held, above what it held at the start, while ``fn()`` ran:
    on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the running sum of the allocation and
    free events the profiler records (``profile_memory=True``). Independent of
    ``memory.TensorTracker``: it sees every allocation, kernels' scratch buffers included."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, n in events:
        running += n
        peak = max(peak, running)
    return peak


@dataclasses.dataclass
class Measurement:
    """What two real training steps allocated (``measure_training``): ``tensor_peak_bytes`` from the
    allocator (``allocator_peak``), ``tracked_peak_bytes`` from the dispatch-mode tracker on
    the same run, ``process_peak_bytes`` the peak RSS during the steps (None where it cannot be
    reset: not Linux), ``rss_before_bytes`` the RSS before them and ``tensors_before_bytes`` the
    tensors alive then (weights, buffers, the batch): their difference is the runtime the steps
    ran on, loading's leftovers included."""

    tensor_peak_bytes: int
    tracked_peak_bytes: int
    process_peak_bytes: int | None
    rss_before_bytes: int
    tensors_before_bytes: int
    seconds: float


def _reset_peak_rss() -> bool:
    """Start the kernel's peak-RSS count (VmHWM) afresh, so it measures the steps alone."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_training(spec: RunSpec | None = None, **fields: Any) -> Measurement:
    """Run two real steps of the run ``plan_training`` plans (pretrained weights, a random batch of
    the full size, on the CPU) and measure their memory."""
    import deltatune as dt
    from .optim import build_optimizer
    from .train.loop import peak_rss_mb
    spec = dataclasses.replace(spec or RunSpec(), **fields)
    spec.validate()
    torch.manual_seed(0)
    model = build_model(spec, "cpu")
    model.train()
    if spec.gradient_checkpointing:
        enable_checkpointing(model)
    batch = example_batch(spec)
    optimizer = build_optimizer(spec.optimizer, dt.parameter_groups(model, 1e-3, rates=_rates(spec)), 1e-3,
                                spec.weight_decay)
    step = train_loss(precision=spec.precision)
    tensors_before = dt.memory_report(model, optimizer).total_bytes + sum(v.nbytes for v in batch.values())
    rss_before = rss_bytes()
    t0 = time.perf_counter()
    # the peak RSS first, without the profiler (whose event records take memory of their own);
    # then two more steps under the profiler
    rss = _reset_peak_rss()
    trace_step(model, batch, optimizer, step, grad_accum=spec.grad_accum)
    process_peak = int(peak_rss_mb() * MB) if rss else None
    start = dt.memory_report(model, optimizer).total_bytes + sum(v.nbytes for v in batch.values())
    traces: list[StepTrace] = []
    peak = allocator_peak(lambda: traces.append(trace_step(model, batch, optimizer, step, grad_accum=spec.grad_accum)))
    return Measurement(tensor_peak_bytes=start + peak, tracked_peak_bytes=traces[0].peak_bytes,
                       process_peak_bytes=process_peak, rss_before_bytes=rss_before,
                       tensors_before_bytes=tensors_before, seconds=time.perf_counter() - t0)
