"""Training checkpoints: one safetensors file, written atomically, read without unpickling.

The file ``checkpoint.safetensors`` holds, as tensors:

- ``param/<name>``: every trainable parameter (the model's qualified names after attach);
- ``optim/<name>/<key>``: the optimizer's per-parameter state tensors (AdamW: ``step``,
  ``exp_avg``, ``exp_avg_sq``);
- ``rng/torch`` (and ``rng/cuda/<i>``): the RNG states as uint8 tensors;

and, in the safetensors metadata (string -> string), JSON documents: ``epoch`` (epochs
completed), ``step`` (optimizer steps taken), ``metrics`` (the per-epoch history so far),
``args`` (the run's arguments), ``scheduler`` (its state_dict), ``optimizer`` (param groups with
parameter *names* and any non-tensor state) and ``sha256`` (a digest of every tensor's name,
dtype, shape and bytes, checked on load, so a corrupted file is refused rather than resumed).

Writes go to a temporary file in the same folder, are flushed and fsynced, then ``os.replace``d
over the old checkpoint: a kill at any moment leaves either the old or the new checkpoint,
never a half-written one.

Test hook: with ``DELTATUNE_TEST_KILL_DURING_CHECKPOINT=<epoch>`` in the environment, writing the
checkpoint of that epoch writes half of the temporary file and then calls ``os._exit(137)``,
as if the process were killed mid-write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..core.errors import DeltatuneError
from ..core.io import atomic_write_bytes

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

    groups, extra_state = [], {}
    for group in optimizer.param_groups:
        g = {k: v for k, v in group.items() if k != "params"}
        g["params"] = []
        for p in group["params"]:
            if id(p) not in names:
                raise DeltatuneError("the optimizer holds a parameter that is not in the model")
            n = names[id(p)]
            g["params"].append(n)
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim/{n}/{key}"] = value.detach().cpu().contiguous().clone()
                else:
                    extra_state.setdefault(n, {})[key] = value
        groups.append(g)
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
        "optimizer": _json({"class": type(optimizer).__name__, "param_groups": groups, "state": extra_state},
                           "optimizer state"),
        "sha256": _digest(tensors),
    }
    data = st_save(tensors, metadata=meta)
    remove_stale_temp_files(path)
    kill = os.environ.get(KILL_ENV)
    return atomic_write_bytes(path, data, kill_halfway=kill is not None and kill.strip() == str(int(epoch)))


# ----------------------------------------------------------------------------- load

def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and validate a checkpoint file (never unpickles). Raises ``CheckpointError`` naming
    the file when it is missing, truncated, corrupted or not a deltatune checkpoint."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint file")
    data = path.read_bytes()
    bad = f"{path}: corrupted or truncated checkpoint ({len(data)} bytes)"
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{bad}: {e}; delete it to start over") from None
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        meta = header.get("__metadata__") or {}
    except (ValueError, UnicodeDecodeError) as e:
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
        epoch, step = int(meta["epoch"]), int(meta["step"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{bad}: invalid metadata ({e})") from None
    if "rng/torch" not in tensors or tensors["rng/torch"].dtype != torch.uint8:
        raise CheckpointError(f"{bad}: no torch RNG state")
    return Checkpoint(path=path, epoch=epoch, step=step, tensors=tensors, **parsed)


def restore(ckpt: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
            scheduler: Any = None, restore_rng: bool = True) -> None:
    """Copy the checkpoint's trainable parameters, optimizer and scheduler state and RNG state
    into a freshly built run. The model's trainable parameters must match the checkpoint's
    exactly (names and shapes), else ``CheckpointError`` says what differs."""
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
    with torch.no_grad():
        for n, t in saved.items():
            params[n].copy_(t.to(dtype=params[n].dtype))

    if optimizer is not None:
        names = _param_names(model)
        saved_groups = ckpt.optimizer.get("param_groups", [])
        if ckpt.optimizer.get("class") != type(optimizer).__name__ or len(saved_groups) != len(optimizer.param_groups):
            raise CheckpointError(f"{ckpt.path}: optimizer {ckpt.optimizer.get('class')} with {len(saved_groups)} "
                                  f"group(s) does not match {type(optimizer).__name__} with "
                                  f"{len(optimizer.param_groups)}")
        state_dict: dict[str, Any] = {"state": {}, "param_groups": []}
        index = 0
        for group, saved_group in zip(optimizer.param_groups, saved_groups):
            current = [names[id(p)] for p in group["params"]]
            if current != saved_group["params"]:
                raise CheckpointError(f"{ckpt.path}: the optimizer's parameters differ from the checkpoint's")
            ids = []
            for n in current:
                st = {k.rsplit("/", 1)[1]: v for k, v in ckpt.tensors.items()
                      if k.startswith(f"optim/{n}/") and "/" not in k[len(f"optim/{n}/"):]}
                st.update(ckpt.optimizer.get("state", {}).get(n, {}))
                if st:
                    state_dict["state"][index] = st
                ids.append(index)
                index += 1
            g = dict(saved_group)
            g["params"] = ids
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
            state_dict["param_groups"].append(g)
        optimizer.load_state_dict(state_dict)

    if scheduler is not None:
        sd = dict(ckpt.scheduler)
        if "lr_lambdas" in scheduler.state_dict():
            sd["lr_lambdas"] = [None] * len(scheduler.state_dict()["lr_lambdas"])
        scheduler.load_state_dict(sd)

    if restore_rng:
        torch.set_rng_state(ckpt.tensors["rng/torch"])
        cuda = [ckpt.tensors[f"rng/cuda/{i}"] for i in range(torch.cuda.device_count()) if f"rng/cuda/{i}" in ckpt.tensors]
        if cuda and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
