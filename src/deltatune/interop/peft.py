"""Hugging Face PEFT's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

``export_peft`` writes an adapter so that ``peft.PeftModel.from_pretrained`` loads it (and so
vLLM, SGLang and diffusers, which read the same files); ``import_peft`` reads PEFT's files into
a deltatune adapter. Only safetensors are read: PEFT's pickled ``adapter_model.bin`` is refused.

Mapping (PEFT key -> ours; PEFT prefixes every key with ``base_model.model.``):
- LoRA ``<m>.lora_A.weight`` / ``<m>.lora_B.weight`` (Embedding: ``lora_embedding_A/B``) ->
  ``lora_A`` / ``lora_B`` reshaped to the 2-D view; DoRA ``<m>.lora_magnitude_vector`` ->
  ``magnitude``. PiSSA/MiLoRA adapters (``W + s(BA - B0 A0)``) export as a plain LoRA of rank
  2r: ``A' = [A; A0]``, ``B' = [B, -B0]``, the same function on the untouched base weights.
- PEFT trains *absolute* biases (``<m>.base_layer.bias``, or ``<m>.bias`` for ``bias="all"``);
  ours are shifts, so the export writes ``base bias + shift`` and the import the difference.
- ``modules_to_save`` <-> ``trainable_modules``; (IA)^3 ``ia3_l`` is ``(out, 1)`` for scaled
  outputs and ``(1, in)`` for feed-forward inputs.
- Prompt tuning ``prompt_embeddings`` ``(k, dim)`` <-> ``prompt``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save as st_save
from torch import nn

from ..checks import _finite, _is_int
from ..checks import _is_number as _is_plain_number
from ..core.engine import adapters, copies, unwrap, walk
from ..core.errors import AdapterFileError, DeltatuneError
from ..core.io import (PICKLE_SUFFIXES, _read_tensors, atomic_write_bytes, attach_state, check_float_tensor, json_type,
                       read_json_object, warn_casts)
from ..core.layers import layer_kind

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


# ----------------------------------------------------------------------------- export







@dataclasses.dataclass
class PeftFormat:
    """One PEFT ``peft_type``, registered beside the method(s) it maps to: ``export(model, name,
    cfg) -> (config, tensors)``, ``import_(model, config, tensors, where) -> (method, cfg, targets,
    ours)`` and ``check(checker, config)`` of its config fields."""
    peft_type: str
    methods: tuple[str, ...]
    export: Callable[..., tuple[dict, dict]]
    import_: Callable[..., tuple]
    check: Callable[["_Checker", dict], None] | None = None


FORMATS: dict[str, PeftFormat] = {}


def register_peft(fmt: PeftFormat) -> PeftFormat:
    FORMATS[fmt.peft_type] = fmt
    return fmt


def _format_of(method: str) -> PeftFormat | None:
    return next((f for f in FORMATS.values() if method in f.methods), None)


def export_peft(model: torch.nn.Module, directory: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter ``name`` in Hugging Face PEFT's format (lora, dora, ia3, prompt_tuning)."""
    if name not in adapters(model):
        raise DeltatuneError(f"no adapter named {name!r}; attached: {', '.join(adapters(model)) or 'none'}")
    cfg = adapters(model)[name]
    fmt = _format_of(cfg.method)
    if fmt is None:
        raise DeltatuneError(f"{cfg.method} has no Hugging Face PEFT equivalent to export to; "
                             f"exportable: {', '.join(m for f in FORMATS.values() for m in f.methods)}")
    config, tensors = fmt.export(model, name, cfg)
    if cfg.trainable_modules:
        if cfg.method == "prompt_tuning":
            raise DeltatuneError("PEFT's prompt tuning files hold no modules_to_save for a custom model; "
                                 "export the head separately")
        config["modules_to_save"] = []
        for mod_name, c in copies(model):
            if name in c.copies:
                config["modules_to_save"].append(mod_name)
                for k, t in c.copies[name].state_dict().items():
                    tensors[f"{PREFIX}{mod_name}.{k}"] = t.detach()
    config.update({"base_model_name_or_path": None, "inference_mode": True, "revision": None,
                   "task_type": config.get("task_type")})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(directory / WEIGHTS, st_save(tensors, metadata={"format": "pt"}))
    atomic_write_bytes(directory / CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return directory


# ----------------------------------------------------------------------------- import

def _peft_pattern(p: str) -> str:
    """PEFT matches rank/alpha pattern keys as ``(.*\\.)?(key)$``; ours as a full regex."""
    return f"re:(?:.*\\.)?(?:{p})"


def _targets(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return ["all-linear"] if value == "all-linear" else [f"re:{value}"]
    return list(value)


def _strip(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


# ----------------------------------------------------------------------------- config checks

def _is_number(v: Any) -> bool:
    return _is_plain_number(v) and _finite(v)


# PEFT options whose non-default value changes what the adapter computes, and that this
# importer does not implement: loading such a file as a plain LoRA would silently be wrong.


class _Checker:
    """Type checks of a PEFT ``adapter_config.json``, each naming the file and the field."""

    def __init__(self, config: dict[str, Any], path: Path):
        self.config, self.path = config, path

    def fail(self, field: str, want: str) -> None:
        value = self.config.get(field)
        raise AdapterFileError(f"{self.path}: {field} must be {want}, got {json_type(value)} ({value!r:.60}); "
                               f"the file is corrupted or not a PEFT adapter config")

    def names(self, field: str, allow_regex: bool) -> None:
        v = self.config.get(field)
        if v is None or (allow_regex and isinstance(v, str) and v):
            return
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            self.fail(field, "a list of module names" + (" or a regex string" if allow_regex else ""))

    def flag(self, field: str) -> None:
        if self.config.get(field) is not None and not isinstance(self.config[field], bool):
            self.fail(field, "true or false")

    def number(self, field: str, low: float, high: float | None = None, low_open: bool = False) -> None:
        v = self.config.get(field)
        if v is None:
            return
        ok = _is_number(v) and (v > low if low_open else v >= low) and (high is None or v < high)
        if not ok:
            rng = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if high is not None else "")
            self.fail(field, f"a finite number {rng}")

    def positive_int(self, field: str, required: bool = False) -> None:
        if field not in self.config or (self.config[field] is None and not required):
            if required:
                raise AdapterFileError(f"{self.path}: missing {field!r}; the file is incomplete")
            return
        v = self.config[field]
        if not _is_int(v) or v < 1:
            self.fail(field, "a positive int")

    def pattern_dict(self, field: str, value_ok, want: str) -> None:
        v = self.config.get(field)
        if v is None:
            return
        if not isinstance(v, dict) or not all(k and value_ok(x) for k, x in v.items()):
            self.fail(field, f"an object mapping module patterns to {want}")

    def check(self, kind: str) -> None:
        c = self.config
        self.names("target_modules", allow_regex=True)
        self.names("modules_to_save", allow_regex=False)
        self.flag("fan_in_fan_out")
        fmt = FORMATS[kind]
        if fmt.check is not None:
            fmt.check(self, c)


# ----------------------------------------------------------------------------- import

def _layer(by_name: dict, mod: str, key: str, where: Path, model) -> nn.Module:
    """The frozen layer a PEFT tensor adapts: it must exist and be a layer with a weight (a
    container module such as an attention block has neither a weight nor a LoRA)."""
    if mod not in by_name:
        raise AdapterFileError(f"{where}: tensor {key} is for module {mod!r}, which does not exist in "
                               f"{type(model).__name__}; the adapter was made for another model")
    base = unwrap(by_name[mod])
    if layer_kind(base) is None or not isinstance(getattr(base, "weight", None), torch.Tensor):
        raise AdapterFileError(f"{where}: tensor {key} is for {mod} ({type(base).__name__}), which is not a layer "
                               f"with a weight (Linear, Conv, Embedding); the adapter was made for another model")
    return base


def _bias_shift(base: nn.Module, mod: str, key: str, t: torch.Tensor, where: Path) -> torch.Tensor:
    """PEFT stores absolute biases; ours are shifts of the base bias, which must exist and match."""
    bias = getattr(base, "bias", None)
    if not isinstance(bias, torch.Tensor):
        raise AdapterFileError(f"{where}: tensor {key} is a trained bias for {mod}, which has no bias in this model; "
                               f"the adapter was made for another model")
    if tuple(t.shape) != tuple(bias.shape):
        raise AdapterFileError(f"{where}: tensor {key} has shape {tuple(t.shape)} but the bias of {mod} has shape "
                               f"{tuple(bias.shape)}")
    return t - bias.detach().to(t.dtype)


def _owner(k: str, saved: list[str]) -> int | None:
    """How many leading name parts of ``k`` name a ``modules_to_save`` module (PEFT matches its
    entries as exact names or dotted suffixes), or None."""
    parts = k.split(".")
    for i in range(1, len(parts)):
        name = ".".join(parts[:i])
        if any(name == s or name.endswith("." + s) for s in saved):
            return i
    return None


def _put(ours: dict, key: str, t: torch.Tensor, source: str, where: Path) -> None:
    if key in ours:
        raise AdapterFileError(f"{where}: tensor {source} maps to {key}, which another tensor already fills; "
                               f"the file is corrupted")
    ours[key] = t


def _saved_module(ours: dict, k: str, key: str, t: torch.Tensor, saved: list[str], where: Path) -> bool:
    owner = _owner(k, saved)
    if owner is None:
        return False
    parts = k.split(".")
    _put(ours, f"modules.{'.'.join(parts[:owner])}.{'.'.join(parts[owner:])}", t, key, where)
    return True










def _float_dtype(module: nn.Module | None) -> torch.dtype | None:
    if module is None:
        return None
    base = unwrap(module)
    w = getattr(base, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w.dtype
    return next((p.dtype for p in base.parameters() if p.is_floating_point()), None)


def _converted(model, tensors: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the file checked (floating point, finite) and cast to the dtype of the
    module it belongs to, before any arithmetic on it (an integer bias minus a float bias would
    silently become float); one notice for all the casts."""
    by_name = {n: m for n, m, _, _ in walk(model)}
    default = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    out, casts = {}, []
    for key, t in tensors.items():
        parts = _strip(key).split(".")
        owner = next((by_name[".".join(parts[:i])] for i in range(len(parts), 0, -1)
                      if ".".join(parts[:i]) in by_name), None)
        dtype = _float_dtype(owner) or default
        out[key] = check_float_tensor(key, t, where, dtype)
        if t.dtype != dtype:
            casts.append((key, t.dtype, dtype))
    warn_casts(where, casts)
    return out


def import_peft(model: torch.nn.Module, directory: str | os.PathLike, name: str = "default",
                trainable: bool = False) -> str:
    """Attach a Hugging Face PEFT adapter (LoRA, DoRA, IA3, prompt tuning) read from its
    safetensors files; the model is unchanged on any error. Returns the adapter name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"{directory}: no such adapter directory")
    if not (directory / CONFIG).exists():
        raise AdapterFileError(f"{directory}: no {CONFIG}; not a PEFT adapter directory")
    if not (directory / WEIGHTS).exists():
        pickles = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
        raise AdapterFileError(f"{directory}: no {WEIGHTS}" + (
            f"; {', '.join(pickles)} is a pickle, which deltatune never loads (it can run arbitrary code): "
            f"re-save the adapter with safe_serialization=True" if pickles else ""))
    config_path, weights_path = directory / CONFIG, directory / WEIGHTS
    config = read_json_object(config_path)
    kind = config.get("peft_type")
    if not isinstance(kind, str) or kind not in FORMATS:
        raise AdapterFileError(f"{config_path}: peft_type {kind!r:.60} is not supported; "
                               f"supported: {', '.join(FORMATS)}")
    _Checker(config, config_path).check(kind)
    raw = _read_tensors(weights_path)
    if not raw:
        raise AdapterFileError(f"{weights_path}: holds no tensors; it would load as an adapter that changes nothing")
    tensors = _converted(model, raw, weights_path)
    try:
        method, cfg, targets, ours = FORMATS[kind].import_(model, config, tensors, weights_path)
    except AdapterFileError:
        raise
    except DeltatuneError as e:     # e.g. prompt tuning on a model without an input embedding
        raise AdapterFileError(f"{directory}: this adapter does not fit the model: {e}") from None
    meta = {"method": method, "config": cfg, "targets": targets}
    return attach_state(model, meta, ours, name, directory, weights_path, trainable)
