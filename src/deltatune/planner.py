"""Predicting the memory of training a model, without allocating it: the model's tensors are
replaced by fake ones (``FakeTensorMode``: shapes, dtypes and the CPU device, no data) and two
optimiser steps of ``deltatune train`` run on them (``trace_step``) under ``memory.TensorTracker``,
which counts the bytes of every tensor alive after each operation. ``plan_model`` does it for any model;
``deltatune.plan`` builds the runs of ``deltatune train`` and is the command line.

Everything a ``MemoryPlan`` shows is measured in that fake run, not derived from formulas: the
saved activations through ``saved_tensors_hooks``, the gradients and optimiser states as
allocated, the transient outputs of each operation. The second step is the steady state, so the
peak includes the optimiser states.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn

from .core.errors import DeltatuneError
from .memory import MB, SavedTensors, TensorTracker, StorageSet, mb, optimizer_state_bytes


# ----------------------------------------------------------------------------- a training step

@dataclasses.dataclass
class StepTrace:
    """Tensor bytes through training steps (``trace_step``). ``at_peak``: the gradients and
    saved activations alive at the peak."""

    start_bytes: int            # alive before the first step: weights, buffers, the batch, states
    peak_bytes: int
    peak_phase: str             # forward, backward, optimizer step
    phase_peaks: dict[str, int]
    saved_bytes: int            # saved for backward at the end of the last forward
    gradient_bytes: int         # .grad after the last backward
    state_bytes: int            # optimiser state after the last step
    at_peak: dict[str, int]


def model_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[Any, torch.Tensor]:
    """``(output, loss)`` of ``model(**batch)``: the loop's ``(logits, loss)``, or an output with
    ``.loss`` (transformers models given labels)."""
    out = model(**batch)
    loss = out[1] if isinstance(out, tuple) else out.loss
    return out, loss


def _tensors(value: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, Mapping):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set)):
            stack.extend(v)
    return found


def trace_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: Any,
               loss_fn: Callable[[nn.Module, Any], tuple[Any, torch.Tensor]] = model_loss, steps: int = 2,
               grad_accum: int = 1, max_grad_norm: float | None = 1.0, fake: bool = False) -> StepTrace:
    """Run ``steps`` optimiser steps of ``grad_accum`` micro-batches each as ``deltatune train``
    does (forward, backward, gradient clipping, ``optimizer.step()``, ``zero_grad(set_to_none)``)
    and trace live tensor bytes. The model's output stays alive until the next forward has
    returned, as the loop's ``_, loss = model(**batch)`` keeps it. The second step is the steady
    state (optimiser states allocated), hence ``steps=2``. A zeroth-order optimiser
    (``zeroth_order = True``) gets ``step(closure)`` with a forward under ``no_grad``.
    ``fake=True`` for fake tensors (see ``TensorTracker``)."""
    from .core.hooks import step_hook
    from .optim import is_zeroth_order
    params = [p for p in model.parameters() if p.requires_grad]
    weights = list(model.parameters()) + list(model.buffers())
    saved = SavedTensors(exclude=weights)

    def snapshot() -> dict[str, int]:
        seen = StorageSet()
        return {"gradients": sum(seen.add(p.grad) for p in params if p.grad is not None), "saved": saved.live}

    tracker = TensorTracker(fake=fake, snapshot=snapshot)
    tracker.adopt(weights + [p.grad for p in params if p.grad is not None] + _tensors(batch)
                  + _tensors(list(getattr(optimizer, "state", {}).values())))
    start = tracker.live
    saved_bytes = grads = 0
    out = loss = None
    with tracker:
        optimizer.zero_grad(set_to_none=True)
        for step in range(1, steps + 1):
            if is_zeroth_order(optimizer):
                def closure() -> torch.Tensor:
                    with torch.no_grad():
                        return loss_fn(model, batch)[1]
                tracker.phase = "forward"
                optimizer.step(closure)
            else:
                for _ in range(grad_accum):
                    tracker.phase = "forward"
                    with saved.hooks():
                        out, loss = loss_fn(model, batch)
                    saved_bytes = saved.live
                    tracker.phase = "backward"
                    (loss / grad_accum).backward()
                    float(loss.detach())        # the loop logs the loss
                grads = snapshot()["gradients"]
                tracker.phase = "optimizer step"
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_hook(model, step)      # as the loop calls it: dylora's sampled rank insists on it
    del out, loss
    return StepTrace(start_bytes=start, peak_bytes=tracker.peak, peak_phase=tracker.peak_phase,
                     phase_peaks=dict(tracker.peaks), saved_bytes=saved_bytes, gradient_bytes=grads,
                     state_bytes=optimizer_state_bytes(optimizer).bytes, at_peak=dict(tracker.at_peak))


@dataclasses.dataclass
class MemoryPlan:
    """Predicted memory of a training run (``plan_training``); bytes. ``peak_gradient_bytes`` and
    ``peak_saved_bytes`` are what was alive of gradients and saved activations at the peak;
    ``transient_bytes`` the rest above the resident weights and states (outputs of the operation
    at the peak, the logits, the loss's intermediates)."""

    description: str
    frozen_bytes: int
    trainable_bytes: int
    gradient_bytes: int              # after backward
    optimizer_state_bytes: int       # after the optimiser step
    activation_bytes: int            # saved for backward at the end of forward
    batch_bytes: int
    peak_bytes: int                  # tensor peak
    peak_phase: str
    phase_peaks: dict[str, int]
    peak_gradient_bytes: int
    peak_saved_bytes: int
    runtime_bytes: int               # resident memory of the process before planning
    trainable_params: int = 0
    total_params: int = 0

    @property
    def transient_bytes(self) -> int:
        resident = self.frozen_bytes + self.trainable_bytes + self.optimizer_state_bytes + self.batch_bytes
        return self.peak_bytes - resident - self.peak_gradient_bytes - self.peak_saved_bytes

    @property
    def process_peak_bytes(self) -> int:
        return self.runtime_bytes + self.peak_bytes

    def __str__(self) -> str:
        rows = [("frozen weights", self.frozen_bytes, f"{self.total_params - self.trainable_params:,} parameters "
                                                      f"+ buffers"),
                ("trainable weights", self.trainable_bytes, f"{self.trainable_params:,} parameters"),
                ("gradients", self.gradient_bytes, "after backward"),
                ("optimiser states", self.optimizer_state_bytes, "after the step"),
                ("activations", self.activation_bytes, "saved for backward at the end of forward"),
                ("transient at peak", self.transient_bytes,
                 f"in {self.peak_phase}, with {mb(self.peak_saved_bytes)} of saved activations and "
                 f"{mb(self.peak_gradient_bytes)} of gradients alive"),
                ("tensor peak", self.peak_bytes, "peak by phase: " + ", ".join(
                    f"{k} {v / MB:,.1f}" for k, v in self.phase_peaks.items() if k)),
                ("process peak", self.process_peak_bytes, f"+ {mb(self.runtime_bytes)} runtime (this process "
                                                          f"before planning)")]
        lines = [f"memory plan: {self.description}"]
        lines += [f"  {name:<19}{size / MB:>11,.1f} MB  {note}" for name, size, note in rows]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- fake models

def rss_bytes() -> int:
    """The resident memory of this process now."""
    from .train.loop import peak_rss_mb
    try:
        with open("/proc/self/statm") as f:
            import os
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return int(peak_rss_mb() * MB)      # no /proc: the peak so far stands in for the current RSS


def to_fake(model: nn.Module, mode: Any, device: str | torch.device = "cpu") -> nn.Module:
    """``model`` with every parameter, buffer and plain tensor attribute replaced by a fake tensor of
    its shape, dtype and strides on ``device`` (ties kept). A model on the meta device is changed in
    place; any other is copied (its tensors are not)."""
    from torch._subclasses.fake_tensor import FakeTensor
    memo: dict[int, Any] = {}
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for _, t in tensors:
        if id(t) not in memo:
            with mode:
                f = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
            memo[id(t)] = nn.Parameter(f, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else f
    if next(iter(model.parameters()), torch.empty(0, device="meta")).device.type != "meta":
        model = copy.deepcopy(model, memo)      # the memo hands deepcopy the fakes instead of copies
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None and id(t) in memo:
                    store[name] = memo[id(t)]
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
                with mode:
                    setattr(module, name, torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                                              device=device))
    return model


@contextlib.contextmanager
def _eager_transformers():
    """transformers takes a fake tensor for a sign of graph tracing (``is_tracing``) and then
    builds explicit attention masks that eager runs skip; planning stands for an eager run, so
    that check ignores fake tensors here."""
    from torch._subclasses.fake_tensor import FakeTensor
    try:
        from transformers.utils import import_utils
    except ImportError:
        yield
        return
    original = import_utils.is_tracing

    def is_tracing(tensor: Any = None) -> bool:
        return original(None if isinstance(tensor, FakeTensor) else tensor)

    holders = [m for name, m in list(sys.modules.items())
               if name.startswith("transformers") and getattr(m, "is_tracing", None) is original]
    for m in holders:
        m.is_tracing = is_tracing
    try:
        yield
    finally:
        for m in holders:
            m.is_tracing = original


def enable_checkpointing(model: nn.Module) -> None:
    """Gradient checkpointing as ``deltatune train --gradient-checkpointing`` turns it on."""
    try:
        from .train.activations import enable_gradient_checkpointing
    except ImportError:
        raise DeltatuneError("--gradient-checkpointing: this deltatune has no "
                             "deltatune.train.activations.enable_gradient_checkpointing yet; plan without it") from None
    enable_gradient_checkpointing(model)


def train_loss(loss_fn: Callable[[nn.Module, Any], tuple[Any, torch.Tensor]] = model_loss, precision: str = "fp32",
               device: str = "cpu") -> Callable[[nn.Module, Any], tuple[Any, torch.Tensor]]:
    """``loss_fn`` as ``deltatune train`` computes it: under autocast for bf16, plus the adapters'
    auxiliary losses."""
    import deltatune as dt
    from .train.loop import autocast

    def loss(m: nn.Module, b: Any) -> tuple[Any, torch.Tensor]:
        with autocast(torch.device(device), precision):
            out, value = loss_fn(m, b)
            return out, value + dt.auxiliary_loss(m)
    return loss


def plan_model(model: nn.Module, batch: dict[str, torch.Tensor],
               optimizer: str | Callable[[list[dict[str, Any]]], Any] = "adamw", *, lr: float = 1e-3,
               weight_decay: float = 0.01, rates: dict[str, float] | None = None, grad_accum: int = 1,
               precision: str = "fp32", gradient_checkpointing: bool = False, description: str = "",
               loss_fn: Callable[[nn.Module, Any], tuple[Any, torch.Tensor]] = model_loss,
               runtime_bytes: int | None = None) -> MemoryPlan:
    """The ``MemoryPlan`` of training ``model`` (its trainable parameters as they are set; on the
    meta device or real) on batches shaped like ``batch`` with ``optimizer`` (a name of
    ``deltatune.optim.OPTIMIZERS`` or ``factory(param_groups)``). Nothing is allocated: the step runs
    on fake tensors. ``runtime_bytes``: the process's memory besides the tensors (default: its
    resident memory now)."""
    import deltatune as dt
    from torch._subclasses.fake_tensor import FakeTensorMode
    from .optim import build_optimizer
    runtime = rss_bytes() if runtime_bytes is None else runtime_bytes
    mode = FakeTensorMode()
    fake = to_fake(model, mode)
    fake.train()
    if gradient_checkpointing:
        enable_checkpointing(fake)

    with mode, _eager_transformers():
        fake_batch = {k: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="cpu").fill_(1)
                      for k, v in batch.items()}
        groups = dt.parameter_groups(fake, lr, rates=rates)
        opt = build_optimizer(optimizer, groups, lr, weight_decay) if isinstance(optimizer, str) else optimizer(groups)
        trace: StepTrace = trace_step(fake, fake_batch, opt, train_loss(loss_fn, precision), grad_accum=grad_accum,
                                      fake=True)
    report = dt.memory_report(fake)
    trainable, total = dt.count_parameters(fake)
    return MemoryPlan(description=description, frozen_bytes=report.frozen_bytes,
                      trainable_bytes=report.trainable_bytes, gradient_bytes=trace.gradient_bytes,
                      optimizer_state_bytes=trace.state_bytes, activation_bytes=trace.saved_bytes,
                      batch_bytes=sum(v.nbytes for v in batch.values()), peak_bytes=trace.peak_bytes,
                      peak_phase=trace.peak_phase, phase_peaks=trace.phase_peaks,
                      peak_gradient_bytes=trace.at_peak.get("gradients", 0),
                      peak_saved_bytes=trace.at_peak.get("saved", 0), runtime_bytes=runtime,
                      trainable_params=trainable, total_params=total)
