"""Training checkpoints: one safetensors file, written atomically, read without unpickling.

The file ``checkpoint.safetensors`` holds, as tensors:

- ``param/<name>``: every trainable parameter (the model's qualified names after attach);
- ``buffer/<name>``: the saved (persistent) buffers of the adapters' deltas, trainable module
  copies and adapter-level modules, which training may change (AdaLoRA's rank mask, BatchNorm
  statistics of a trained head) or which came from data (LoRA-GA's residual);
- ``optim/<name>/<key>``: the optimizer's per-parameter state tensors (AdamW: ``step``,
  ``exp_avg``, ``exp_avg_sq``; the projected optimizers: low-rank moments, projectors, 8-bit
  codes and scales);
- ``rng/torch`` (and ``rng/cuda/<i>``): the RNG states as uint8 tensors;

and, in the safetensors metadata (string -> string), JSON documents: ``epoch`` (epochs
completed), ``step`` (optimizer steps taken), ``metrics`` (the per-epoch history so far),
``args`` (the run's arguments), ``scheduler`` (its state_dict), ``optimizer`` (param groups with
parameter *names*, any non-tensor state, and ``extra``: what the optimizer's ``state_dict`` adds
beside ``state`` and ``param_groups``, such as MeZO's seed and step count) and ``sha256`` (a digest of every tensor's name,
dtype, shape and bytes, checked on load, so a corrupted file is refused rather than resumed).

Writes go to a temporary file in the same folder, are flushed and fsynced, then ``os.replace``d
over the old checkpoint: a kill at any moment leaves either the old or the new checkpoint,
never a half-written one.

Test hook: with ``DELTATUNE_TEST_KILL_DURING_CHECKPOINT=<epoch>`` in the environment, writing the
checkpoint of that epoch writes half of the temporary file and then calls ``os._exit(137)``,
as if the process were killed mid-write.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..core.errors import DeltatuneError
from ..files import atomic_write_bytes

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "deltatune-checkpoint"
FORMAT_VERSION = 1
KILL_ENV = "DELTATUNE_TEST_KILL_DURING_CHECKPOINT"
_REQUIRED_META = ("format", "format_version", "epoch", "step", "metrics", "args", "scheduler", "optimizer", "sha256")


class CheckpointError(DeltatuneError):
    """A checkpoint file cannot be read or does not fit the run being resumed."""


@dataclasses.dataclass
class Checkpoint:
    path: Path
    epoch: int
    step: int
    metrics: list[dict[str, Any]]
    args: dict[str, Any]
    scheduler: dict[str, Any]
    optimizer: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return {k[len("param/"):]: v for k, v in self.tensors.items() if k.startswith("param/")}

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        return {k[len("buffer/"):]: v for k, v in self.tensors.items() if k.startswith("buffer/")}


def adapter_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The persistent buffers a run changes, by qualified name: those of everything attach added
    (see the module doc), and those of each module with a trainable parameter of its own (a
    BatchNorm under full fine-tuning updates its running statistics)."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    trained = {f"{m}.{b}" if m else b for m, module in model.named_modules()
               if any(p.requires_grad for p in module.parameters(recurse=False))
               for b, _ in module.named_buffers(recurse=False)}
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in params and (
        ".deltas." in k or ".copies." in k or k.startswith("deltatune_shared.") or k in trained)}


# ----------------------------------------------------------------------------- atomic writes

def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files left by writes of ``path`` that were killed mid-way."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for p in stale:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    return stale


# ----------------------------------------------------------------------------- digest

def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=True)
    except TypeError as e:
        raise DeltatuneError(f"checkpoint {what} is not JSON-serialisable: {e}") from None


# ----------------------------------------------------------------------------- save

def _param_names(model: torch.nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for n, p in model.named_parameters():
        names.setdefault(id(p), n)
    return names


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, *, epoch: int, step: int, metrics: list[dict[str, Any]],
                    args: dict[str, Any]) -> Path:
    """Atomically write the training state after ``epoch`` completed epochs (see module doc)."""
    path = Path(path)
    names = _param_names(model)
    tensors: dict[str, torch.Tensor] = {}
    for n, p in model.named_parameters():
        if p.requires_grad and f"param/{n}" not in tensors and names[id(p)] == n:
            tensors[f"param/{n}"] = p.detach().cpu().contiguous().clone()
    for n, b in adapter_buffers(model).items():
        tensors[f"buffer/{n}"] = b.detach().cpu().contiguous().clone()

    # the optimizer's own state_dict, so that what an optimizer adds to it (MeZO's seed and step
    # count) is kept; its integer parameter ids become the model's parameter names
    full = optimizer.state_dict()
    groups, extra_state = [], {}
    for group, saved in zip(optimizer.param_groups, full["param_groups"]):
        g = {k: v for k, v in saved.items() if k != "params"}
        g["params"] = []
        for p, pid in zip(group["params"], saved["params"]):
            if id(p) not in names:
                raise DeltatuneError("the optimizer holds a parameter that is not in the model")
            n = names[id(p)]
            g["params"].append(n)
            for key, value in full["state"].get(pid, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim/{n}/{key}"] = value.detach().cpu().contiguous().clone()
                else:
                    extra_state.setdefault(n, {})[key] = value
        groups.append(g)
    extra = {k: v for k, v in full.items() if k not in ("state", "param_groups")}
    tensors["rng/torch"] = torch.get_rng_state().clone()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s.cpu().clone()

    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"} if scheduler is not None else {}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "epoch": str(int(epoch)),
        "step": str(int(step)),
        "metrics": _json(metrics, "metrics"),
        "args": _json(args, "args"),
        "scheduler": _json(sched, "scheduler state"),
        "optimizer": _json({"class": type(optimizer).__name__, "param_groups": groups, "state": extra_state,
                            "extra": extra},
                           "optimizer state"),
        "sha256": _digest(tensors),
    }
    data = st_save(tensors, metadata=meta)
    remove_stale_temp_files(path)
    kill = os.environ.get(KILL_ENV)
    return atomic_write_bytes(path, data, kill_halfway=kill is not None and kill.strip() == str(int(epoch)))


# ----------------------------------------------------------------------------- load

# What reading a damaged safetensors buffer can raise: the library's own error, and what the torch
# side raises for a dtype it has no tensor for (safetensors' F4/F6 come back as a KeyError).
_READ_ERRORS = (SafetensorError, OSError, RuntimeError, ValueError, KeyError, TypeError, MemoryError, OverflowError)
_STATE_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
_DIGITS = re.compile(r"[0-9]{1,18}")      # a non-negative int64 written by save_checkpoint


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, str)) or (
        isinstance(value, (int, float)) and math.isfinite(value))


def _check_layout(path: Path, bad: str, parsed: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """The structure ``restore`` relies on, so that a damaged or hostile checkpoint (the digest
    only proves the tensors match the metadata, not that either was written by deltatune) is
    refused here with a message, not by a KeyError or a shape error half-way through a restore."""
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise CheckpointError(f"{bad}: {what}; delete it to start over")

    need(isinstance(parsed["metrics"], list) and all(isinstance(m, dict) for m in parsed["metrics"]),
         f"metrics must be a list of objects, got {_json_kind(parsed['metrics'])}")
    for key in ("args", "scheduler", "optimizer"):
        need(isinstance(parsed[key], dict), f"{key} must be an object, got {_json_kind(parsed[key])}")
    opt = parsed["optimizer"]
    need(isinstance(opt.get("class"), str), "optimizer.class must be the optimizer's class name")
    groups = opt.get("param_groups")
    need(isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list) and all(
        isinstance(n, str) for n in g["params"]) for g in groups),
        "optimizer.param_groups must be a list of objects, each with a list of parameter names")
    grouped = [n for g in groups for n in g["params"]]
    need(len(grouped) == len(set(grouped)), "optimizer.param_groups names a parameter twice")
    state = opt.get("state", {})
    need(isinstance(state, dict) and all(n in grouped and isinstance(v, dict) and all(_is_scalar(x) for x in v.values())
                                         for n, v in state.items()),
         "optimizer.state must map the optimizer's parameter names to objects of numbers")
    extra = opt.get("extra", {})
    need(isinstance(extra, dict) and all(k not in ("state", "param_groups") and (_is_scalar(v) or (
        isinstance(v, dict) and all(_is_scalar(x) for x in v.values()))) for k, v in extra.items()),
         "optimizer.extra must map names to numbers or objects of numbers")
    rng_size = torch.get_rng_state().numel()
    for k, t in tensors.items():
        kind, _, rest = k.partition("/")
        if kind == "param":
            need(bool(rest), f"tensor {k!r} names no parameter")
            need(t.dtype.is_floating_point, f"tensor {k} has dtype {t.dtype}; trainable parameters are floating point")
        elif kind == "optim":
            name, _, key = rest.rpartition("/")
            need(name in grouped and bool(key), f"tensor {k} is optimizer state for {name!r}, which is not one of "
                                                f"the optimizer's parameters")
            # 8-bit optimizers keep integer codes
            need(t.dtype.is_floating_point or t.dtype in _STATE_INT_DTYPES,
                 f"tensor {k} has dtype {t.dtype}; optimizer state is floating point or integer codes")
            need(key not in state.get(name, {}), f"optimizer state {name}/{key} is stored twice")
        elif kind == "buffer":
            need(bool(rest), f"tensor {k!r} names no buffer")
        elif k == "rng/torch" or (kind == "rng" and re.fullmatch(r"cuda/[0-9]+", rest)):
            need(t.dtype == torch.uint8 and t.dim() == 1, f"tensor {k} must be a 1-D uint8 RNG state")
        else:
            need(False, f"unexpected tensor {k!r} (a checkpoint holds param/, buffer/, optim/ and rng/ tensors)")
    need("rng/torch" in tensors, "no torch RNG state")
    rng = tensors["rng/torch"]
    need(rng.numel() == rng_size, f"the torch RNG state has {rng.numel()} bytes, not {rng_size}")
    try:
        torch.Generator().set_state(rng)        # validates the state without touching the global RNG
    except RuntimeError as e:
        need(False, f"the torch RNG state is invalid ({e})")


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and validate a checkpoint file (never unpickles). Raises ``CheckpointError`` naming
    the file when it is missing, truncated, corrupted or not a deltatune checkpoint."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    bad = f"{path}: corrupted or truncated checkpoint ({len(data)} bytes)"
    try:
        tensors = st_load(data)
    except _READ_ERRORS as e:
        raise CheckpointError(f"{bad}: {e}; delete it to start over") from None
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        meta = header.get("__metadata__") or {}
    except (ValueError, UnicodeDecodeError, RecursionError, AttributeError) as e:
        raise CheckpointError(f"{bad}: unreadable header ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a deltatune training checkpoint (metadata format "
                              f"{meta.get('format')!r}, expected {FORMAT!r})")
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{bad}: metadata lacks {', '.join(missing)}")
    if meta["format_version"] != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: checkpoint format version {meta['format_version']} is not supported "
                              f"(this deltatune reads version {FORMAT_VERSION})")
    if _digest(tensors) != meta["sha256"]:
        raise CheckpointError(f"{bad}: tensor data does not match its recorded sha256 digest; delete it to "
                              f"start over")
    try:
        parsed = {k: json.loads(meta[k]) for k in ("metrics", "args", "scheduler", "optimizer")}
    except (ValueError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{bad}: invalid metadata ({e})") from None
    for key in ("epoch", "step"):
        if not _DIGITS.fullmatch(meta[key]):
            raise CheckpointError(f"{bad}: invalid metadata ({key} {meta[key][:40]!r} is not a non-negative int)")
    _check_layout(path, bad, parsed, tensors)
    return Checkpoint(path=path, epoch=int(meta["epoch"]), step=int(meta["step"]), tensors=tensors, **parsed)


def _compatible(saved: Any, current: Any) -> bool:
    """Whether a JSON value from the checkpoint can stand where the run has ``current`` (an
    optimizer hyperparameter, a scheduler field): the same kind of value, lists of the same
    length. Values of other types (none in torch's own optimizers) are not judged."""
    if isinstance(current, bool) or current is None:      # flags; None: "let torch choose" (foreach)
        return isinstance(saved, bool) or (current is None and saved is None)
    if isinstance(current, int):
        return isinstance(saved, int) and not isinstance(saved, bool)
    if isinstance(current, (float, torch.Tensor)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool) and math.isfinite(saved)
    if isinstance(current, str):
        return isinstance(saved, str)
    if isinstance(current, (list, tuple)):
        return isinstance(saved, list) and len(saved) == len(current) and all(map(_compatible, saved, current))
    if isinstance(current, dict):
        return isinstance(saved, dict) and saved.keys() <= current.keys() and all(
            _compatible(v, current[k]) for k, v in saved.items())
    return True


def _is_count(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_complex or value.dtype == torch.bool:
            return False
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and value >= 0 and float(value).is_integer()


@dataclasses.dataclass(frozen=True)
class _StateEntry:
    """One key of an optimizer's per-parameter state: a tensor (with its shape and dtype) or a
    plain value."""
    tensor: bool
    shape: tuple[int, ...] = ()
    dtype: torch.dtype | None = None


def _fresh_copy(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer with its settings (attributes such as GaLore's ``state_bits``, which torch's
    pickling and ``copy`` drop) but no parameters, state, per-parameter records or hooks, nor the
    step wrappers an LR scheduler patches onto the instance (they would step the original)."""
    opt = object.__new__(type(optimizer))
    for key, value in vars(optimizer).items():
        if callable(value):
            continue
        if isinstance(value, dict) and (key.endswith("hooks") or any(isinstance(k, torch.Tensor) for k in value)):
            value = type(value)()
        opt.__dict__[key] = value
    opt.state, opt.param_groups = collections.defaultdict(dict), []
    return opt


def _state_layout(optimizer: torch.optim.Optimizer, hyper: dict[str, Any],
                  like: torch.Tensor) -> dict[str, _StateEntry] | Exception:
    """What two steps of this optimizer (with these hyperparameters) keep for a parameter shaped
    like ``like``. Found by stepping a copy of the optimizer (its own settings, such as 8-bit
    states, with fresh state) on a zero probe of that shape, so it holds for any optimizer (projected ones keep moments of another shape, 8-bit ones
    integer codes) rather than a list of known ones; the exception instead when the probe cannot
    step (an optimizer that needs a closure, or hyperparameters it cannot run with, such as
    ``capturable`` on a CPU). The global RNG is left as it was."""
    probe = torch.zeros(tuple(like.shape), dtype=like.dtype, requires_grad=True)
    probe.grad = torch.zeros_like(probe)
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            opt = _fresh_copy(optimizer)
            opt.add_param_group({**hyper, "params": [probe]})
            for _ in range(2):      # some states appear from the second step on (APOLLO's previous norm)
                opt.step()
    except Exception as e:      # noqa: BLE001 -- any failure is reported by the caller, or ends the probing
        return e
    return {k: _StateEntry(True, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else _StateEntry(False)
            for k, v in opt.state.get(probe, {}).items()}


def _as_current(saved: Any, current: Any) -> Any:
    """JSON turned tuples (AdamW's betas) into lists: give them back their tuple."""
    return tuple(saved) if isinstance(current, tuple) and isinstance(saved, list) else saved


def _check_fields(path: Path, what: str, saved: dict[str, Any], current: dict[str, Any]) -> None:
    unknown = sorted(set(saved) - set(current))
    if unknown:
        raise CheckpointError(f"{path}: the {what} holds fields {unknown[:4]} that this run's has not; the "
                              f"checkpoint was written by another optimizer/scheduler or is corrupted")
    for k, v in saved.items():
        if not _compatible(v, current[k]):
            raise CheckpointError(f"{path}: the {what}'s {k} is {v!r:.60} in the checkpoint, which cannot replace "
                                  f"{current[k]!r:.60}; the checkpoint is corrupted")


def restore(ckpt: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
            scheduler: Any = None, restore_rng: bool = True) -> None:
    """Copy the checkpoint's trainable parameters, optimizer and scheduler state and RNG state
    into a freshly built run. The model's trainable parameters must match the checkpoint's
    exactly (names and shapes), else ``CheckpointError`` says what differs. Everything is
    checked before anything is copied: on an error the run is unchanged."""
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    saved = ckpt.params
    missing, extra = sorted(trainable - set(saved)), sorted(set(saved) - trainable)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"the model trains {missing[:4]}{' ...' if len(missing) > 4 else ''} which the checkpoint lacks")
        if extra:
            parts.append(f"the checkpoint holds {extra[:4]}{' ...' if len(extra) > 4 else ''} which the model does not "
                         f"train")
        raise CheckpointError(f"{ckpt.path}: does not fit this model: {'; '.join(parts)} (was it written with other "
                              f"--model/--method options?)")
    for n, t in sorted(saved.items()):
        if tuple(params[n].shape) != tuple(t.shape):
            raise CheckpointError(f"{ckpt.path}: parameter {n} has shape {tuple(t.shape)} in the checkpoint but "
                                  f"{tuple(params[n].shape)} in the model")

    buffers, saved_buffers = adapter_buffers(model), ckpt.buffers
    if saved_buffers and set(saved_buffers) != set(buffers):     # none saved: a checkpoint from before buffers
        raise CheckpointError(f"{ckpt.path}: its adapter buffers {sorted(set(saved_buffers) ^ set(buffers))[:4]} do "
                              f"not match this model's (was it written with other --model/--method options?)")
    for n, t in saved_buffers.items():
        if tuple(buffers[n].shape) != tuple(t.shape) or buffers[n].dtype.is_floating_point != t.dtype.is_floating_point:
            raise CheckpointError(f"{ckpt.path}: buffer {n} has shape {tuple(t.shape)} ({t.dtype}) in the checkpoint "
                                  f"but {tuple(buffers[n].shape)} ({buffers[n].dtype}) in the model")

    state_dict: dict[str, Any] | None = None
    if optimizer is not None:
        state_dict = _optimizer_state(ckpt, model, optimizer)
    sched = None
    if scheduler is not None:
        current = scheduler.state_dict()
        sched = {k: v for k, v in ckpt.scheduler.items()}
        _check_fields(ckpt.path, "scheduler state", sched, {k: v for k, v in current.items() if k != "lr_lambdas"})
        sched = {k: _as_current(v, current[k]) for k, v in sched.items()}
        if "lr_lambdas" in current:
            sched["lr_lambdas"] = [None] * len(current["lr_lambdas"])

    with torch.no_grad():
        for n, t in saved.items():
            params[n].copy_(t.to(dtype=params[n].dtype))
        for n, t in saved_buffers.items():
            buffers[n].copy_(t.to(dtype=buffers[n].dtype))
    if state_dict is not None:
        optimizer.load_state_dict(state_dict)
    if sched is not None:
        scheduler.load_state_dict(sched)
    if restore_rng:
        torch.set_rng_state(ckpt.tensors["rng/torch"])
        cuda = [ckpt.tensors[f"rng/cuda/{i}"] for i in range(torch.cuda.device_count()) if f"rng/cuda/{i}" in ckpt.tensors]
        if cuda and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _optimizer_state(ckpt: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state_dict to load, checked against the optimizer it goes into."""
    names = _param_names(model)
    saved_groups = ckpt.optimizer.get("param_groups", [])
    if ckpt.optimizer.get("class") != type(optimizer).__name__ or len(saved_groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{ckpt.path}: optimizer {ckpt.optimizer.get('class')} with {len(saved_groups)} "
                              f"group(s) does not match {type(optimizer).__name__} with "
                              f"{len(optimizer.param_groups)}")
    extra_state = ckpt.optimizer.get("state", {})
    state_dict: dict[str, Any] = {"state": {}, "param_groups": []}
    index = 0
    for group, saved_group in zip(optimizer.param_groups, saved_groups):
        if any(id(p) not in names for p in group["params"]):
            raise CheckpointError(f"{ckpt.path}: the optimizer holds a parameter that is not in the model")
        current = [names[id(p)] for p in group["params"]]
        if current != saved_group["params"]:
            raise CheckpointError(f"{ckpt.path}: the optimizer's parameters differ from the checkpoint's")
        hyper = {k: v for k, v in group.items() if k != "params"}
        _check_fields(ckpt.path, "optimizer's param group", {k: v for k, v in saved_group.items() if k != "params"},
                      hyper)
        g = {k: _as_current(v, hyper.get(k)) for k, v in saved_group.items() if k != "params"}
        g = {**{k: v for k, v in hyper.items() if k not in g}, **g}     # a field the file lacks keeps this run's value
        layouts: dict[tuple[tuple[int, ...], torch.dtype], Any] = {}
        ids = []
        for p, n in zip(group["params"], current):
            prefix = f"optim/{n}/"
            st = {k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix) and "/" not in k[len(prefix):]}
            values = extra_state.get(n, {})
            if not (st or values):
                ids.append(index)
                index += 1
                continue
            shape_key = (tuple(p.shape), p.dtype)
            if shape_key not in layouts:
                layout = _state_layout(optimizer, g, p)
                if isinstance(layout, Exception):
                    if not isinstance(_state_layout(optimizer, hyper, p), Exception):
                        # this run's own settings step, the checkpoint's do not: the file is at fault
                        raise CheckpointError(f"{ckpt.path}: {type(optimizer).__name__} cannot step with the "
                                              f"checkpoint's hyperparameters ({type(layout).__name__}: "
                                              f"{str(layout)[:200]}); the checkpoint is corrupted")
                    layout = None
                layouts[shape_key] = layout
            layout = layouts[shape_key]
            if layout is not None:
                # a parameter is stepped or not: a state with a key missing (or one this optimizer
                # does not keep) fails only at the next optimizer step, far from the file
                keys = set(st) | set(values)
                if keys != set(layout) or any(not layout[k].tensor for k in st) or any(
                        layout[k].tensor for k in values):
                    raise CheckpointError(f"{ckpt.path}: the optimizer state of {n} holds {sorted(keys)}, but "
                                          f"{type(optimizer).__name__} keeps {sorted(layout)} (tensors: "
                                          f"{sorted(k for k, v in layout.items() if v.tensor)})")
            for key, t in st.items():
                if layout is not None:
                    want = layout[key]
                    ok = tuple(t.shape) == want.shape and (t.dtype.is_floating_point or t.dtype == want.dtype)
                else:   # element-wise optimizers (AdamW, SGD, ...): a scalar step, tensors shaped like the parameter
                    want = _StateEntry(True, tuple(p.shape), None)
                    ok = t.dim() == 0 or tuple(t.shape) == tuple(p.shape)
                if not ok:
                    raise CheckpointError(f"{ckpt.path}: optimizer state {n}/{key} has shape {tuple(t.shape)} ({t.dtype}) "
                                          f"in the checkpoint, but {type(optimizer).__name__} keeps "
                                          f"{want.shape}{f' ({want.dtype})' if want.dtype else ''} for parameter {n} "
                                          f"of shape {tuple(p.shape)}")
                if layout is not None and t.dim() == 0 and t.dtype.is_floating_point and t.dtype != want.dtype:
                    # torch casts per-parameter states to the parameter's dtype on load, but keeps a
                    # step count's own dtype, and its kernels do not take every one (float8)
                    st[key] = t.to(want.dtype)
            step = st.get("step", values.get("step"))
            if step is not None and not _is_count(step):
                # torch's optimizers all keep their step count as "step"; AdamW raises an OverflowError
                # at the next step for beta ** -1e30
                raise CheckpointError(f"{ckpt.path}: optimizer state {n}/step is {step!r:.40}, not a step count "
                                      f"(a non-negative whole number); the checkpoint is corrupted")
            st.update(values)
            if st:
                state_dict["state"][index] = st
            ids.append(index)
            index += 1
        g["params"] = ids
        state_dict["param_groups"].append(g)
    state_dict.update(ckpt.optimizer.get("extra", {}))
    return state_dict
