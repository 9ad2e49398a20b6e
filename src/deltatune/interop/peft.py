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

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from ..core.engine import adapters, copies, unwrap, walk, wrappers
from ..core.errors import AdapterFileError, DeltatuneError
from ..core.io import (PICKLE_SUFFIXES, _read_tensors, atomic_write_bytes, attach_state, check_float_tensor, json_type,
                       read_json_object, warn_casts)
from ..core.layers import layer_kind, out_in
from ..core.wrapper import BiasDelta

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


# ----------------------------------------------------------------------------- export

def _lora_export(model, name, cfg) -> tuple[dict, dict]:
    tensors, ranks, alphas = {}, {}, {}
    fan_in_fan_out = False
    for mod_name, w in wrappers(model):
        d = w.deltas[name] if name in w.deltas else None
        if d is None:
            continue
        if isinstance(d, BiasDelta):
            base_bias = w.base.bias
            tensors[f"{PREFIX}{mod_name}.bias"] = (base_bias + d.bias).detach()
            continue
        A, B = d.factors()
        r = A.shape[0]
        ranks[mod_name], alphas[mod_name] = r, d.scale * (r ** 0.5 if cfg.rslora else r)
        if w.kind == "embedding":
            tensors[f"{PREFIX}{mod_name}.lora_embedding_A"] = A.detach()
            tensors[f"{PREFIX}{mod_name}.lora_embedding_B"] = B.detach()
        else:
            if w.kind == "conv":
                if cfg.method == "dora":
                    raise DeltatuneError(f"{mod_name}: DoRA on convolutions has no PEFT export yet")
                k = w.base.weight.shape[2:]
                A = A.reshape(r, w.base.weight.shape[1], *k)
                B = B.reshape(*B.shape, *([1] * len(k)))
            fan_in_fan_out |= w.kind == "conv1d_gpt2"
            tensors[f"{PREFIX}{mod_name}.lora_A.weight"] = A.detach()
            tensors[f"{PREFIX}{mod_name}.lora_B.weight"] = B.detach()
        if cfg.method == "dora":
            tensors[f"{PREFIX}{mod_name}.lora_magnitude_vector"] = d.magnitude.detach()
        if d.lora_bias is not None:
            base_bias = getattr(w.base, "bias", None)
            if base_bias is None:
                raise DeltatuneError(f"{mod_name} has no bias in the base model, so PEFT cannot hold its "
                                     f"trained bias; train with bias='none' to export")
            tensors[f"{PREFIX}{mod_name}.base_layer.bias"] = (base_bias + d.lora_bias).detach()
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora, "use_dora": cfg.method == "dora", "bias": cfg.bias,
        "target_modules": sorted(ranks), "fan_in_fan_out": fan_in_fan_out,
        # exact module names, matched by PEFT as `(.*\.)?(name)$`
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "init_lora_weights": True,
    }
    return config, tensors


def _ia3_export(model, name, cfg) -> tuple[dict, dict]:
    tensors, targets, ff = {}, [], []
    for mod_name, w in wrappers(model):
        d = w.deltas[name] if name in w.deltas else None
        if d is None:
            continue
        if w.kind == "conv":
            raise DeltatuneError(f"{mod_name}: (IA)^3 on convolutions has no PEFT export yet")
        targets.append(mod_name)
        if d.transforms_input:
            ff.append(mod_name)
            tensors[f"{PREFIX}{mod_name}.ia3_l"] = d.ia3_l.detach()[None, :]
        else:
            tensors[f"{PREFIX}{mod_name}.ia3_l"] = d.ia3_l.detach()[:, None]
    fan = any(w.kind == "conv1d_gpt2" for _, w in wrappers(model))
    return {"peft_type": "IA3", "target_modules": targets, "feedforward_modules": ff, "fan_in_fan_out": fan,
            "init_ia3_weights": True}, tensors


def _prompt_export(model, name, cfg) -> tuple[dict, dict]:
    (mod_name, w), = [(n, w) for n, w in wrappers(model) if name in w.deltas]
    prompt = w.deltas[name].prompt.detach()
    host_cfg = next((m.config for m in model.modules() if hasattr(m, "config")
                     and getattr(m.config, "model_type", None)), None)
    causal = any(type(m).__name__.endswith("ForCausalLM") for m in model.modules())
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM" if causal else "FEATURE_EXTRACTION",
              "num_virtual_tokens": prompt.shape[0], "token_dim": prompt.shape[1],
              "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM",
              "num_attention_heads": getattr(host_cfg, "num_attention_heads", None),
              "num_layers": getattr(host_cfg, "num_hidden_layers", None)}
    return config, {"prompt_embeddings": prompt}


EXPORTERS = {"lora": _lora_export, "dora": _lora_export, "ia3": _ia3_export, "prompt_tuning": _prompt_export}


def export_peft(model: torch.nn.Module, directory: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter ``name`` in Hugging Face PEFT's format (lora, dora, ia3, prompt_tuning)."""
    if name not in adapters(model):
        raise DeltatuneError(f"no adapter named {name!r}; attached: {', '.join(adapters(model)) or 'none'}")
    cfg = adapters(model)[name]
    if cfg.method not in EXPORTERS:
        raise DeltatuneError(f"{cfg.method} has no Hugging Face PEFT equivalent to export to; "
                             f"exportable: {', '.join(EXPORTERS)}")
    config, tensors = EXPORTERS[cfg.method](model, name, cfg)
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

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v)


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


# PEFT options whose non-default value changes what the adapter computes, and that this
# importer does not implement: loading such a file as a plain LoRA would silently be wrong.
_UNSUPPORTED_LORA = {
    "lora_bias": "a trained bias on lora_B", "layer_replication": "replicated layers",
    "trainable_token_indices": "trained token embeddings", "target_parameters": "LoRA on nn.Parameters",
    "alora_invocation_tokens": "activated LoRA (aLoRA)", "use_qalora": "QALoRA", "arrow_config": "Arrow routing",
}
# init_lora_weights values with which PEFT replaces the base weights by a residual at init: the
# adapter is relative to that modified base, unless PEFT converted it on save (then it writes True)
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")


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
        if kind == "LORA":
            self.positive_int("r", required=True)
            self.number("lora_alpha", 0, low_open=True)
            self.number("lora_dropout", 0, 1)
            self.flag("use_rslora")
            self.flag("use_dora")
            if c.get("bias", "none") not in ("none", "all", "lora_only"):
                self.fail("bias", "'none', 'all' or 'lora_only'")
            layers = c.get("layers_to_transform")
            if layers is not None and not (_is_int(layers) and layers >= 0) and not (
                    isinstance(layers, list) and all(_is_int(i) and i >= 0 for i in layers)):
                self.fail("layers_to_transform", "a non-negative int or a list of them")
            self.pattern_dict("rank_pattern", lambda x: _is_int(x) and x >= 1, "positive ints")
            self.pattern_dict("alpha_pattern", lambda x: _is_number(x) and x > 0, "positive numbers")
            for field, what in _UNSUPPORTED_LORA.items():
                if c.get(field) not in (None, False, [], {}):
                    raise AdapterFileError(f"{self.path}: {field}={c[field]!r:.60} ({what}) is not supported by "
                                           f"dt.import_peft; loading it as a plain LoRA would compute something else")
            init = c.get("init_lora_weights")
            if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
                raise AdapterFileError(
                    f"{self.path}: init_lora_weights={init!r}: PEFT replaced the base weights by a residual when "
                    f"this adapter was made, so it does not apply to the original model; save it with PEFT's "
                    f"path_initial_model_for_weight_conversion to get a plain LoRA")
        elif kind == "IA3":
            self.names("feedforward_modules", allow_regex=True)
        elif kind == "PROMPT_TUNING":
            self.positive_int("num_virtual_tokens")
            self.positive_int("token_dim")
            if c.get("num_transformer_submodules") not in (None, 1):
                self.fail("num_transformer_submodules", "1 (prompts for encoder-decoder models are not supported)")


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


_LORA_SUFFIXES = ((".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B"),
                  (".lora_embedding_A", "lora_A"), (".lora_embedding_B", "lora_B"),
                  (".lora_magnitude_vector", "magnitude"), (".base_layer.bias", "lora_bias"))
_LORA_KINDS = ("linear", "conv", "embedding", "conv1d_gpt2")


def _lora_import(model, config, tensors, where):
    by_name = {n: m for n, m, _, _ in walk(model)}
    method = "dora" if config.get("use_dora") else "lora"
    ours: dict[str, torch.Tensor] = {}
    targets: dict[str, dict] = {}
    rank_pattern = {}
    saved = list(config.get("modules_to_save") or [])
    bias_mode = config.get("bias", "none")
    for key, t in tensors.items():
        k = _strip(key)
        if k.endswith(".base_layer.weight"):
            # PEFT saves a targeted embedding in case it was resized; it must be the one we have
            mod = k[: -len(".base_layer.weight")]
            have = getattr(unwrap(by_name[mod]), "weight", None) if mod in by_name else None
            if not isinstance(have, torch.Tensor) or have.shape != t.shape or not torch.equal(
                    have.detach().cpu(), t.to(have.dtype)):
                raise AdapterFileError(f"{where}: holds a changed base weight for {mod} (a resized or "
                                       f"retrained embedding); deltatune adapters never replace base weights")
            continue
        hit = next(((suffix, n) for suffix, n in _LORA_SUFFIXES if k.endswith(suffix)), None)
        if hit is not None:
            suffix, ours_name = hit
            mod = k[: -len(suffix)]
            base = _layer(by_name, mod, key, where, model)
            if ours_name == "lora_bias":
                t = _bias_shift(base, mod, key, t, where)
            elif ours_name in ("lora_A", "lora_B"):
                if t.dim() < 2 or 0 in t.shape:
                    raise AdapterFileError(f"{where}: tensor {key} has shape {tuple(t.shape)}; a LoRA factor is a "
                                           f"non-empty matrix ((r, in) for lora_A, (out, r) for lora_B)")
                t = t.reshape(t.shape[0], -1)
            _put(ours, f"deltas.{mod}.{ours_name}", t, key, where)
            targets.setdefault(mod, {"weight_shape": list(base.weight.shape), "delta": "method"})
            continue
        if _saved_module(ours, k, key, t, saved, where):
            continue
        mod, _, param = k.rpartition(".")
        if param == "bias" and bias_mode == "all" and mod in by_name and mod not in targets:
            base = _layer(by_name, mod, key, where, model)
            _put(ours, f"deltas.{mod}.bias", _bias_shift(base, mod, key, t, where), key, where)
            targets[mod] = {"weight_shape": list(base.weight.shape), "delta": "bias"}
        else:
            raise AdapterFileError(f"{where}: unexpected tensor {key} for a PEFT LoRA adapter")
    lora = [mod for mod, t in targets.items() if t["delta"] == "method"]
    if not lora:
        raise AdapterFileError(f"{where}: holds no LoRA tensors (lora_A / lora_B); it would load as an adapter "
                               f"that changes nothing")
    for mod in lora:
        if f"deltas.{mod}.lora_A" not in ours:
            raise AdapterFileError(f"{where}: has tensors for {mod} but not its lora_A; the file is incomplete")
        r = ours[f"deltas.{mod}.lora_A"].shape[0]
        if r != config["r"]:
            rank_pattern[mod] = r
    alpha = config.get("lora_alpha")
    cfg = {"r": config["r"], "alpha": 8 if alpha is None else alpha, "dropout": config.get("lora_dropout") or 0.0,
           "rslora": bool(config.get("use_rslora")), "bias": bias_mode,
           "targets": _targets(config.get("target_modules")), "trainable_modules": sorted(saved),
           "rank_pattern": rank_pattern,
           "alpha_pattern": {_peft_pattern(k): v for k, v in (config.get("alpha_pattern") or {}).items()}}
    if config.get("layers_to_transform") is not None:
        layers = config["layers_to_transform"]
        cfg["layers"] = [layers] if isinstance(layers, int) else layers
    if bias_mode == "lora_only":
        for mod in lora:
            base = unwrap(by_name[mod])
            kind = layer_kind(base)
            if f"deltas.{mod}.lora_bias" in ours or kind not in _LORA_KINDS:
                continue        # other kinds: plan refuses them, naming the kinds lora wraps
            if isinstance(getattr(base, "bias", None), torch.Tensor):
                # PEFT saves the trained bias of every LoRA layer that has one
                raise AdapterFileError(f"{where}: bias='lora_only' but the file has no {PREFIX}{mod}.base_layer.bias "
                                       f"for {mod}; the file is incomplete")
            # a layer without a bias: PEFT trains none there; ours starts at zero
            ours[f"deltas.{mod}.lora_bias"] = torch.zeros(out_in(base, kind)[0], dtype=base.weight.dtype)
    return method, cfg, targets, ours


def _ia3_import(model, config, tensors, where):
    by_name = {n: m for n, m, _, _ in walk(model)}
    ours, targets = {}, {}
    ff = []
    saved = list(config.get("modules_to_save") or [])
    for key, t in tensors.items():
        k = _strip(key)
        if not k.endswith(".ia3_l"):
            if _saved_module(ours, k, key, t, saved, where):
                continue
            raise AdapterFileError(f"{where}: unexpected tensor {key} for a PEFT IA3 adapter")
        mod = k[: -len(".ia3_l")]
        base = _layer(by_name, mod, key, where, model)
        if t.dim() != 2 or 1 not in t.shape or t.numel() == 0:
            raise AdapterFileError(f"{where}: tensor {key} has shape {tuple(t.shape)}; an IA3 vector is stored as "
                                   f"(out, 1), or (1, in) for a feed-forward layer")
        if t.shape[0] == 1 and t.shape[1] > 1:
            ff.append(mod)
        _put(ours, f"deltas.{mod}.ia3_l", t.reshape(-1), key, where)
        targets[mod] = {"weight_shape": list(base.weight.shape), "delta": "method"}
    if not targets:
        raise AdapterFileError(f"{where}: holds no ia3_l tensors; it would load as an adapter that changes nothing")
    cfg = {"targets": _targets(config.get("target_modules")), "feedforward": ff, "trainable_modules": sorted(saved)}
    return "ia3", cfg, targets, ours


def _prompt_import(model, config, tensors, where):
    from ..methods.prompts.prompt_tuning import default_targets
    (emb,) = default_targets(model)
    extra = sorted(k for k in tensors if k != "prompt_embeddings")
    if extra:
        raise AdapterFileError(f"{where}: unexpected tensors {extra[:5]} for a PEFT prompt tuning adapter")
    prompt = tensors.get("prompt_embeddings")
    if prompt is None:
        raise AdapterFileError(f"{where}: no prompt_embeddings tensor")
    if prompt.dim() != 2 or prompt.shape[0] == 0:
        raise AdapterFileError(f"{where}: prompt_embeddings has shape {tuple(prompt.shape)}; it must be "
                               f"(num_virtual_tokens, token_dim)")
    k, dim = config.get("num_virtual_tokens"), config.get("token_dim")
    if (k is not None and k != prompt.shape[0]) or (dim is not None and dim != prompt.shape[1]):
        raise AdapterFileError(f"{where}: prompt_embeddings has shape {tuple(prompt.shape)} but the config says "
                               f"num_virtual_tokens={k}, token_dim={dim}; the files disagree")
    by_name = {n: m for n, m, _, _ in walk(model)}
    base = unwrap(by_name[emb])
    return "prompt_tuning", {"num_virtual_tokens": prompt.shape[0], "init": "random"}, \
        {emb: {"weight_shape": list(base.weight.shape), "delta": "method"}}, {f"deltas.{emb}.prompt": prompt}


IMPORTERS = {"LORA": _lora_import, "IA3": _ia3_import, "PROMPT_TUNING": _prompt_import}


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
    if not isinstance(kind, str) or kind not in IMPORTERS:
        raise AdapterFileError(f"{config_path}: peft_type {kind!r:.60} is not supported; "
                               f"supported: {', '.join(IMPORTERS)}")
    _Checker(config, config_path).check(kind)
    raw = _read_tensors(weights_path)
    if not raw:
        raise AdapterFileError(f"{weights_path}: holds no tensors; it would load as an adapter that changes nothing")
    tensors = _converted(model, raw, weights_path)
    try:
        method, cfg, targets, ours = IMPORTERS[kind](model, config, tensors, weights_path)
    except AdapterFileError:
        raise
    except DeltatuneError as e:     # e.g. prompt tuning on a model without an input embedding
        raise AdapterFileError(f"{directory}: this adapter does not fit the model: {e}") from None
    meta = {"method": method, "config": cfg, "targets": targets}
    return attach_state(model, meta, ours, name, directory, weights_path, trainable)
