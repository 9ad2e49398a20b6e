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
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from ..files import (_read_tensors, atomic_write_bytes, check_float_tensor, json_type,  # noqa: F401
                     read_json_object, warn_casts)
from ..checks import _is_int
from .engine import adapters, install, plan
from .errors import AdapterFileError, DeltatuneError
from .registry import get_method
from .wrapper import BiasDelta, DeltaLayer, ModuleCopies

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def adapter_state(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    from .engine import shared_state, walk
    state = {}
    for mod_name, module, _, _ in walk(model):
        if isinstance(module, DeltaLayer) and name in module.deltas:
            for k, t in module.deltas[name].state_dict().items():
                state[f"deltas.{mod_name}.{k}"] = t
        elif isinstance(module, ModuleCopies) and name in module.copies:
            for k, t in module.copies[name].state_dict().items():
                state[f"modules.{mod_name}.{k}"] = t
    shared = shared_state(model, name)
    for k, t in (shared.state_dict() if shared is not None else {}).items():
        state[f"shared.{k}"] = t      # adapter-level state: saved once, not per layer
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
            weight = getattr(module.base, "weight", None)     # a block (an MLP) has none
            targets[mod_name] = {"type": type(module.base).__name__, "kind": module.kind,
                                 "weight_shape": list(weight.shape) if isinstance(weight, torch.Tensor) else None,
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
    meta = read_json_object(path)
    if meta.get("library") != "deltatune":
        raise AdapterFileError(f"{path}: not a deltatune adapter config (for a Hugging Face PEFT adapter "
                               f"use dt.import_peft)")
    version = meta.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        raise AdapterFileError(f"{path}: format_version {version!r} is not supported "
                               f"(this deltatune reads version {FORMAT_VERSION})")
    for key in ("method", "config", "tensors", "targets"):
        if key not in meta:
            raise AdapterFileError(f"{path}: missing the {key!r} entry; the file is incomplete")

    def bad(field: str, want: str, value: Any) -> AdapterFileError:
        return AdapterFileError(f"{path}: {field} must be {want}, got {json_type(value)} ({value!r:.60}); "
                                f"the file is corrupted")

    if not isinstance(meta["method"], str):
        raise bad("method", "a method name (a string)", meta["method"])
    for key in ("config", "tensors", "targets"):
        if not isinstance(meta[key], dict):
            raise bad(key, "an object", meta[key])
    for mod, t in meta["targets"].items():
        if not isinstance(t, dict):
            raise bad(f"targets[{mod!r}]", "an object", t)
        shape = t.get("weight_shape")
        if shape is not None and not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise bad(f"targets[{mod!r}].weight_shape", "a list of non-negative ints", shape)
        if t.get("delta", "method") not in ("method", "bias"):
            raise bad(f"targets[{mod!r}].delta", "'method' or 'bias'", t.get("delta"))
    if meta.get("name") is not None and not isinstance(meta["name"], str):
        raise bad("name", "a string", meta["name"])
    return meta


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
    from .lifecycle import _NAME_RE
    directory = Path(directory)
    meta, tensors = read_adapter(directory)
    if name is None and meta.get("name") is not None and not _NAME_RE.match(meta["name"]):
        raise AdapterFileError(f"{directory / CONFIG_FILE}: the stored name {meta['name']!r} is not a valid adapter "
                               f"name; pass name=... to load the adapter under another")
    name = name or meta.get("name") or "default"
    return attach_state(model, meta, tensors, name, directory, directory / WEIGHTS_FILE, trainable)


# Below this many parameters a layer's deltas are built and the exact name and shape checks
# report what differs; above it, a config that the file cannot back is refused before allocating.
_SMALL_ALLOCATION = 1 << 24


def _check_sizes(model: torch.nn.Module, method: Any, cfg: Any, meta: dict[str, Any],
                 tensors: dict[str, torch.Tensor], weights_path: Path) -> None:
    """Before any delta is built: each wrapped layer's parameter count, from the method's own
    formula for the stored config, must be covered by the file's tensors for that layer, when it
    is large. A hostile or damaged config (``num_virtual_tokens: 10**12``) is refused here instead
    of attempting the allocation it asks for; a file's tensors are bounded by its size."""
    from .engine import unwrap, walk
    from .layers import layer_kind
    wanted = {n for n, t in meta["targets"].items() if t.get("delta", "method") == "method"}
    for mod_name, module, _, _ in walk(model):
        if mod_name not in wanted:
            continue
        # by prefix: a delta's own submodules nest its keys; a nested target only over-counts
        held = sum(t.numel() for k, t in tensors.items() if k.startswith(f"deltas.{mod_name}."))
        base = unwrap(module)
        kind = layer_kind(base)
        if kind not in method.kinds:
            continue            # plan refuses it, naming the layer kinds the method applies to
        try:
            need = method.expected_parameters(base, kind, cfg, mod_name)
        except DeltatuneError:
            continue
        if need > held and need > _SMALL_ALLOCATION:
            raise AdapterFileError(f"{weights_path}: the stored {method.name} config needs {need:,} parameters for "
                                   f"{mod_name} but the file holds {held:,} values for it; the "
                                   f"config and the tensors disagree (the file is corrupted)")


def _install(model: torch.nn.Module, p: Any, trainable: bool) -> None:
    """``install``, undone if it raises (a method's attach hook can still refuse the model): the
    model must be left as it was on any error."""
    from .engine import active_adapters, delete_adapter, set_active
    grads = [(q, q.requires_grad) for q in model.parameters()]
    active = active_adapters(model)
    try:
        install(model, p, trainable=trainable)
    except BaseException:
        try:
            adapters(model).setdefault(p.name, p.cfg)
            delete_adapter(model, p.name)
            for q, g in grads:
                q.requires_grad_(g)
            set_active(model, active)
        except Exception:       # the original error is the one to report
            pass
        raise


def attach_state(model: torch.nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor], name: str,
                 directory: Path, weights_path: Path, trainable: bool = False) -> str:
    """Attach an adapter described by ``meta`` (our config format) with the given tensors,
    after checking that every tensor fits; the model is unchanged on any error."""
    from .lifecycle import _check_name
    config_path = directory / CONFIG_FILE
    try:
        method = get_method(meta["method"])
    except DeltatuneError as e:
        raise AdapterFileError(f"{config_path}: {e}") from None
    _check_name(model, name)
    try:
        cfg = method.config_cls(**meta["config"])
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{config_path}: the stored {method.name} config is invalid: {e}") from None
    _check_sizes(model, method, cfg, meta, tensors, weights_path)
    try:
        exact = sorted(n for n, t in meta["targets"].items() if t.get("delta", "method") == "method")
        p = plan(model, cfg, name, loading=True, exact=exact)
    except DeltatuneError as e:
        raise AdapterFileError(f"{directory}: this adapter does not fit the model: {e}") from None
    if not p.deltas:
        # an adapter that wraps nothing would load "successfully" and change nothing
        raise AdapterFileError(f"{config_path}: the adapter wraps no module (its targets entry is empty); the file "
                               f"is corrupted or incomplete")
    for mod_name, module, *_ in p.deltas:
        want = meta["targets"][mod_name].get("weight_shape") if mod_name in meta["targets"] else None
        weight = getattr(module.base if hasattr(module, "base") else module, "weight", None)
        have = list(weight.shape) if isinstance(weight, torch.Tensor) else None
        if want is not None and want != have:
            raise AdapterFileError(f"{directory}: module {mod_name} has weight shape {have} in this model but "
                                   f"{want} in the adapter; it was trained for a different model")
    expected = {}
    for mod_name, _, _, _, _, delta in p.deltas:
        expected.update({f"deltas.{mod_name}.{k}": t for k, t in delta.state_dict().items()})
    for mod_name, _, _, _, dup in p.copies:
        expected.update({f"modules.{mod_name}.{k}": t for k, t in dup.state_dict().items()})
    if p.shared is not None:
        expected.update({f"shared.{k}": t for k, t in p.shared.state_dict().items()})
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
    checked, casts = {}, []
    for k, want in expected.items():
        t = tensors[k]
        if not want.dtype.is_floating_point:
            # an integer buffer of a trainable module copy (BatchNorm's num_batches_tracked): kept exact
            if t.dtype != want.dtype:
                raise AdapterFileError(f"{weights_path}: tensor {k} has dtype {t.dtype} but this model needs "
                                       f"{want.dtype}")
            checked[k] = t
            continue
        checked[k] = check_float_tensor(k, t, weights_path, want.dtype)
        if t.dtype != want.dtype:
            casts.append((k, t.dtype, want.dtype))
    warn_casts(weights_path, casts)
    with torch.no_grad():
        for mod_name, _, _, _, _, delta in p.deltas:
            prefix = f"deltas.{mod_name}."
            delta.load_state_dict({k[len(prefix):]: v for k, v in checked.items() if k.startswith(prefix)})
        for mod_name, _, _, _, dup in p.copies:
            prefix = f"modules.{mod_name}."
            dup.load_state_dict({k[len(prefix):]: v for k, v in checked.items() if k.startswith(prefix)})
        if p.shared is not None:
            p.shared.load_state_dict({k[len("shared."):]: v for k, v in checked.items() if k.startswith("shared.")})
    try:
        _install(model, p, trainable)
    except DeltatuneError as e:
        raise AdapterFileError(f"{directory}: this adapter does not fit the model: {e}") from None
    return name
