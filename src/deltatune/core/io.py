"""Adapter files: ``adapter_config.json`` + ``adapter.safetensors``, deltas only.

The safetensors file holds ``deltas.<module>.<tensor>`` for each wrapped module and
``modules.<module>.<tensor>`` for each trainable module; module names are the model's own
(pre-wrapping) names and carry no adapter name, so a file loads under any name. Writes are
atomic (temporary file, fsync, rename); loads validate everything before the model is touched,
and nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from .engine import adapters, install, plan
from .errors import AdapterFileError, DeltatuneError
from .registry import get_method
from .wrapper import BiasDelta, DeltaLayer, ModuleCopies

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes, kill_halfway: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename, fsync
    of the folder): a reader sees the old file or the new one, never a mix. The file gets the
    usual permissions (0666 less the umask), not mkstemp's 0600. ``kill_halfway`` is a test
    hook: write half the bytes, then end the process with status 137 as a kill would."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            if kill_halfway:
                f.write(data[:len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                os._exit(137)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def adapter_state(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    from .engine import walk
    state = {}
    for mod_name, module, _, _ in walk(model):
        if isinstance(module, DeltaLayer) and name in module.deltas:
            for k, t in module.deltas[name].state_dict().items():
                state[f"deltas.{mod_name}.{k}"] = t
        elif isinstance(module, ModuleCopies) and name in module.copies:
            for k, t in module.copies[name].state_dict().items():
                state[f"modules.{mod_name}.{k}"] = t
    return state


def save_adapter(model: torch.nn.Module, directory: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter ``name`` to ``directory`` (created if missing)."""
    from .engine import walk
    if name not in adapters(model):
        raise DeltatuneError(f"no adapter named {name!r} to save; attached: {', '.join(adapters(model)) or 'none'}")
    cfg = adapters(model)[name]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: t.detach().contiguous().cpu() for k, t in adapter_state(model, name).items()}
    targets = {}
    for mod_name, module, _, _ in walk(model):
        if isinstance(module, DeltaLayer) and name in module.deltas:
            delta = module.deltas[name]
            targets[mod_name] = {"type": type(module.base).__name__, "kind": module.kind,
                                 "weight_shape": list(module.base.weight.shape),
                                 "delta": "bias" if isinstance(delta, BiasDelta) else "method"}
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "library": "deltatune",
        "method": cfg.method,
        "name": name,
        "config": cfg.to_dict(),
        "targets": targets,
        "trainable_modules": sorted({k.split(".", 1)[1].rsplit(".", 1)[0] for k in state if k.startswith("modules.")}),
        "tensors": {k: list(t.shape) for k, t in sorted(state.items())},
    }
    atomic_write_bytes(directory / WEIGHTS_FILE, st_save(state, metadata={"format": "pt", "method": cfg.method}))
    atomic_write_bytes(directory / CONFIG_FILE, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return directory


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path}: not valid JSON ({e}); the file is corrupted") from None
    if not isinstance(meta, dict) or meta.get("library") != "deltatune":
        raise AdapterFileError(f"{path}: not a deltatune adapter config (for a Hugging Face PEFT adapter "
                               f"use dt.import_peft)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(f"{path}: format_version {meta.get('format_version')!r} is not supported "
                               f"(this deltatune reads version {FORMAT_VERSION})")
    for key in ("method", "config", "tensors", "targets"):
        if key not in meta:
            raise AdapterFileError(f"{path}: missing the {key!r} entry; the file is incomplete")
    return meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        return tensors
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise AdapterFileError(f"{path}: cannot be read as safetensors ({e}); the file is truncated or "
                               f"corrupted: save the adapter again") from None


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"{directory}: no such adapter directory")
    if not (directory / WEIGHTS_FILE).exists():
        pickles = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise AdapterFileError(
                f"{directory}: holds {', '.join(pickles)} but no {WEIGHTS_FILE}; deltatune never unpickles "
                f"files (they can run arbitrary code). Convert the weights to safetensors in a trusted "
                f"environment first")
        raise AdapterFileError(f"{directory}: missing {WEIGHTS_FILE}")
    if not (directory / CONFIG_FILE).exists():
        raise AdapterFileError(f"{directory}: missing {CONFIG_FILE}")
    return _read_config(directory), _read_tensors(directory / WEIGHTS_FILE)


def load_adapter(model: torch.nn.Module, directory: str | os.PathLike, name: str | None = None,
                 trainable: bool = False) -> str:
    """Attach the adapter saved in ``directory`` as ``name`` (default: its saved name) and make it
    the active adapter. Every check runs before the model is touched: on any error the model is
    unchanged. ``trainable=True`` leaves its parameters trainable (to continue training)."""
    directory = Path(directory)
    meta, tensors = read_adapter(directory)
    name = name or meta.get("name") or "default"
    return attach_state(model, meta, tensors, name, directory, directory / WEIGHTS_FILE, trainable)


def attach_state(model: torch.nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor], name: str,
                 directory: Path, weights_path: Path, trainable: bool = False) -> str:
    """Attach an adapter described by ``meta`` (our config format) with the given tensors,
    after checking that every tensor fits; the model is unchanged on any error."""
    method = get_method(meta["method"])
    try:
        cfg = method.config_cls(**meta["config"])
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{directory / CONFIG_FILE}: the stored {method.name} config is invalid: {e}") from None
    try:
        exact = sorted(n for n, t in meta["targets"].items() if t.get("delta", "method") == "method")
        p = plan(model, cfg, name, loading=True, exact=exact)
    except DeltatuneError as e:
        raise AdapterFileError(f"{directory}: this adapter does not fit the model: {e}") from None
    for mod_name, module, *_ in p.deltas:
        want = meta["targets"][mod_name].get("weight_shape") if mod_name in meta["targets"] else None
        have = list(module.base.weight.shape if hasattr(module, "base") else module.weight.shape)
        if want is not None and want != have:
            raise AdapterFileError(f"{directory}: module {mod_name} has weight shape {have} in this model but "
                                   f"{want} in the adapter; it was trained for a different model")
    expected = {}
    for mod_name, _, _, _, _, delta in p.deltas:
        expected.update({f"deltas.{mod_name}.{k}": t for k, t in delta.state_dict().items()})
    for mod_name, _, _, _, dup in p.copies:
        expected.update({f"modules.{mod_name}.{k}": t for k, t in dup.state_dict().items()})
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        raise AdapterFileError(f"{weights_path}: {'; '.join(parts)} (model and adapter disagree)")
    for k, t in expected.items():
        if tuple(tensors[k].shape) != tuple(t.shape):
            raise AdapterFileError(f"{weights_path}: tensor {k} has shape {tuple(tensors[k].shape)} but this "
                                   f"model needs {tuple(t.shape)}")
    with torch.no_grad():
        for mod_name, _, _, _, _, delta in p.deltas:
            prefix = f"deltas.{mod_name}."
            delta.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        for mod_name, _, _, _, dup in p.copies:
            prefix = f"modules.{mod_name}."
            dup.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    install(model, p, trainable=trainable)
    return name
