"""Where training memory goes: what a model and its optimiser hold (``memory_report``), and
trackers of live tensor bytes (``TensorTracker``) and of what autograd saves for backward
(``SavedTensors``), which ``deltatune.planner.trace_step`` runs through a training step, on fake
tensors to predict its peak without allocating it.

Optimiser states
----------------
``optimizer_state_bytes`` counts what an optimiser holds now: an optimiser with a
``state_bytes()`` method is asked directly; otherwise every tensor in ``optimizer.state`` is
counted once per storage, recursing into dicts, lists, tuples, sets, dataclasses and objects that
expose ``state_bytes()`` or an integer ``nbytes``; anything else is listed as not counted.

AdamW allocates its state lazily, at the first ``step``. ``predict_state_bytes`` says what a
known optimiser will hold after it: Adam / AdamW two tensors like each parameter (three with
``amsgrad``) and a scalar ``step`` tensor; SGD one momentum buffer like each parameter (none
without momentum). Any other optimiser is predicted through a hook of its own, the contract for
the optimisers of ``deltatune.optim`` (either one)::

    class MyOptimizer(torch.optim.Optimizer):
        @classmethod
        def predict_state_bytes(cls, param_groups: list[dict]) -> int:
            '''Bytes of ``self.state`` once every parameter has had a step.'''

        def planned_state_bytes(self) -> int:       # the same, from self.param_groups
            ...

``param_groups`` is what ``optimizer.param_groups`` holds: dicts with ``"params"`` and every
hyperparameter, defaults filled in (the rank of a projection, for instance); the class method
also answers before an optimiser exists. The parameters may be on the meta device or fake: read
only their shapes, dtypes and devices. Without a hook the prediction is ``None`` ("unknown"),
never a guess. Parameters that receive no gradient get no state from the torch optimisers, so
for them the prediction is an upper bound. (``deltatune plan`` needs neither hook: it runs the
optimiser's steps on fake tensors and counts the state they allocate.)
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

MB = 2 ** 20


def mb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / MB:,.1f} MB"


class StorageSet:
    """Counts each tensor storage once (tied weights, views, a state sharing a parameter's
    storage). Holds the storages while counting so that an ``id`` cannot be reused."""

    def __init__(self) -> None:
        self._seen: set[Any] = set()
        self._keep: list[Any] = []

    def add(self, t: torch.Tensor) -> int:
        """Bytes of ``t``'s storage if it is new here, else 0."""
        st = t.untyped_storage()
        ptr = st.data_ptr() if t.device.type != "meta" and not _is_fake(t) else 0
        key = (str(t.device), ptr) if ptr else ("id", id(st))
        if key in self._seen:
            return 0
        self._seen.add(key)
        self._keep.append(st)
        return st.nbytes()


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor)


# ----------------------------------------------------------------------------- optimiser states

@dataclasses.dataclass
class StateBytes:
    """Bytes of an optimiser's state; ``uncounted`` names the types of state values that are
    neither tensors, containers nor objects exposing ``state_bytes()`` / ``nbytes``."""

    bytes: int
    uncounted: list[str] = dataclasses.field(default_factory=list)


def optimizer_state_bytes(optimizer: Any, seen: StorageSet | None = None) -> StateBytes:
    """What ``optimizer`` holds now (see the module docstring)."""
    own = getattr(optimizer, "state_bytes", None)
    if callable(own):
        return StateBytes(int(own()))
    out = StateBytes(0)
    seen = seen or StorageSet()
    for value in getattr(optimizer, "state", {}).values():     # keys are the parameters: not state
        _add_value(value, seen, out)
    return out


def _add_value(value: Any, seen: StorageSet, out: StateBytes) -> None:
    if isinstance(value, torch.Tensor):
        out.bytes += seen.add(value)
    elif value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return
    elif isinstance(value, Mapping):
        for v in value.values():
            _add_value(v, seen, out)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            _add_value(v, seen, out)
    elif callable(getattr(value, "state_bytes", None)):
        out.bytes += int(value.state_bytes())
    elif isinstance(getattr(value, "nbytes", None), int):
        out.bytes += value.nbytes
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _add_value(getattr(value, f.name), seen, out)
    elif type(value).__name__ not in out.uncounted:
        out.uncounted.append(type(value).__name__)


def _nbytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


def predict_state_bytes(optimizer: Any, param_groups: list[dict] | None = None) -> int | None:
    """Bytes of the state ``optimizer`` (an instance, or a class with ``param_groups``) holds
    once every parameter has had a step; None when unknown (see the module docstring)."""
    groups = param_groups if param_groups is not None else optimizer.param_groups
    hook = getattr(optimizer, "predict_state_bytes", None)
    if callable(hook):
        return int(hook(groups))
    planned = getattr(optimizer, "planned_state_bytes", None)
    if callable(planned) and not isinstance(optimizer, type) and param_groups is None:
        return int(planned())
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    if issubclass(cls, (torch.optim.Adam, torch.optim.AdamW)):
        step = torch.tensor(0.0).element_size()       # the scalar step tensor: float32 (the default dtype)
        return sum(_nbytes(p) * (3 if g.get("amsgrad") else 2) + step for g in groups for p in g["params"])
    if cls is torch.optim.SGD:
        return sum(_nbytes(p) for g in groups if g.get("momentum", 0) for p in g["params"])
    return None


# ----------------------------------------------------------------------------- memory_report

@dataclasses.dataclass
class MemoryReport:
    """Bytes a model and its optimiser hold (``dt.memory_report``). Frozen: parameters that do
    not require gradients, and buffers; each storage is counted once (tied weights)."""

    frozen_bytes: int
    trainable_bytes: int
    gradient_bytes: int                  # .grad tensors allocated now
    expected_gradient_bytes: int         # once backward has run: one gradient like each trainable parameter
    optimizer: str | None = None         # the optimiser's class name
    optimizer_state_bytes: int | None = None              # allocated now
    predicted_optimizer_state_bytes: int | None = None    # after the first step; None: unknown
    uncounted_state: list[str] = dataclasses.field(default_factory=list)
    trainable_params: int = 0
    frozen_params: int = 0

    @property
    def total_bytes(self) -> int:
        """What is allocated now."""
        return self.frozen_bytes + self.trainable_bytes + self.gradient_bytes + (self.optimizer_state_bytes or 0)

    @property
    def expected_total_bytes(self) -> int | None:
        """What stays allocated between steps once training runs (None: optimiser state unknown)."""
        if self.optimizer is not None and self.predicted_optimizer_state_bytes is None:
            return None
        state = max(self.predicted_optimizer_state_bytes or 0, self.optimizer_state_bytes or 0)
        return self.frozen_bytes + self.trainable_bytes + self.expected_gradient_bytes + state

    def __str__(self) -> str:
        rows = [("frozen weights", mb(self.frozen_bytes), f"{self.frozen_params:,} parameters + buffers"),
                ("trainable weights", mb(self.trainable_bytes), f"{self.trainable_params:,} parameters"),
                ("gradients", mb(self.gradient_bytes), f"{mb(self.expected_gradient_bytes)} once backward runs")]
        if self.optimizer is not None:
            note = f"{self.optimizer}; after the first step: {mb(self.predicted_optimizer_state_bytes)}"
            if self.predicted_optimizer_state_bytes is None:
                note += " (no predict_state_bytes hook)"
            if self.uncounted_state:
                note += f"; not counted: {', '.join(self.uncounted_state)}"
            rows.append(("optimiser states", mb(self.optimizer_state_bytes), note))
        rows.append(("total now", mb(self.total_bytes), f"{mb(self.expected_total_bytes)} while training"))
        return "\n".join(f"{name:<20}{size:>14}  {note}" for name, size, note in rows)


def memory_report(model: nn.Module, optimizer: Any = None) -> MemoryReport:
    """Bytes of frozen weights, trainable weights, gradients and optimiser states of ``model``
    (and ``optimizer``) now, and what backward and the first optimiser step will add."""
    seen = StorageSet()
    frozen = trainable = grads = expected = n_trainable = n_frozen = 0
    for p in model.parameters():            # parameters() yields a tied parameter once
        size = seen.add(p)
        if p.requires_grad:
            trainable += size
            n_trainable += p.numel()
            expected += _nbytes(p)
        else:
            frozen += size
            n_frozen += p.numel()
    for b in model.buffers():
        frozen += seen.add(b)
    for p in model.parameters():
        if p.grad is not None:
            grads += seen.add(p.grad)
    report = MemoryReport(frozen, trainable, grads, expected, trainable_params=n_trainable, frozen_params=n_frozen)
    if optimizer is not None:
        state = optimizer_state_bytes(optimizer, seen)
        report.optimizer = type(optimizer).__name__
        report.optimizer_state_bytes = state.bytes
        report.uncounted_state = state.uncounted
        report.predicted_optimizer_state_bytes = predict_state_bytes(optimizer)
    return report


# ----------------------------------------------------------------------------- live tensor bytes

_NONE = object()


def value_free(func: Any, args: tuple) -> Any:
    """What an operation whose result depends on tensor values answers on tensors that have none
    (meta, fake), or ``_NONE`` for any other operation: ``.item()`` and ``bool(tensor)`` give 1 /
    True, so planning follows one branch of data-dependent code (an all-ones attention mask, a
    first optimiser step); ``nonzero`` and boolean-mask indexing take every element for selected,
    the largest result (a pattern chosen from the weights' values, a mask of active ranks)."""
    aten = torch.ops.aten
    if func is aten._local_scalar_dense.default:
        t = args[0]
        return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 1)
    if func is aten.nonzero.default:
        t = args[0]
        return torch.empty((t.numel(), t.dim()), dtype=torch.long, device=t.device)
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
            i is not None and i.dtype == torch.bool for i in args[1]):
        # boolean-mask indexing (``P[:, mask]``) is nonzero inside: every element selected
        indices: list[Any] = []
        for i in args[1]:
            if i is not None and i.dtype == torch.bool:
                indices += [torch.empty(i.numel(), dtype=torch.long, device=i.device).fill_(0)] * i.dim()
            else:
                indices.append(i)
        return func(args[0], indices, *args[2:])
    return _NONE


class ValueFree(TorchDispatchMode):
    """``value_free``'s stand-ins for the operations run under it, e.g. attaching a method whose
    initialisation reads the weights to a model on the meta device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        stand_in = value_free(func, args)
        return func(*args, **(kwargs or {})) if stand_in is _NONE else stand_in


class TensorTracker(TorchDispatchMode):
    """Live tensor bytes while the mode is on: every storage an operation returns is counted
    until it is freed (a finaliser on the storage), once however many tensors view it. Tensors
    that exist before are counted through ``adopt``. ``phase`` names the part of the step now
    running; ``peaks`` keeps each phase's peak, ``peak``/``peak_phase`` the overall one, and
    ``snapshot()`` (if given) is called at each new overall peak, its result kept in ``at_peak``.

    On fake tensors (``fake=True``) the operations whose result depends on tensor values get the
    stand-ins of ``value_free``."""

    def __init__(self, fake: bool = False, snapshot: Callable[[], dict[str, int]] | None = None):
        super().__init__()
        self.fake = fake
        self.snapshot = snapshot
        self._live_storages: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.live = 0
        self.peak = 0
        self.peak_phase = ""
        self.phase = ""
        self.peaks: dict[str, int] = {}
        self.at_peak: dict[str, int] = {}

    def adopt(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            self._track(t)

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self._live_storages:
            return
        n = st.nbytes()
        self._live_storages[st] = n
        self.live += n
        weakref.finalize(st, self._freed, n)
        if self.live > self.peaks.get(self.phase, -1):
            self.peaks[self.phase] = self.live
        if self.live > self.peak:
            self.peak, self.peak_phase = self.live, self.phase
            if self.snapshot is not None:
                self.at_peak = self.snapshot()

    def _freed(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.fake:
            stand_in = value_free(func, args)
            if stand_in is not _NONE:
                return stand_in
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


class SavedTensors:
    """Bytes saved for backward (``torch.autograd.graph.saved_tensors_hooks``), counted once per
    storage while alive, leaving out the storages in ``exclude`` (the weights: saved by every
    linear layer, but held anyway)."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = WeakIdKeyDictionary({t.untyped_storage(): True for t in exclude})
        self._saved: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.live = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st not in self._exclude and st not in self._saved:
            n = st.nbytes()
            self._saved[st] = n
            self.live += n
            weakref.finalize(st, self._freed, n)
        return t

    def _freed(self, n: int) -> None:
        self.live -= n

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

