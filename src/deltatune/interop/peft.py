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
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from ..core.engine import adapters, copies, match_pattern, walk, wrappers
from ..core.errors import AdapterFileError, DeltatuneError
from ..core.io import PICKLE_SUFFIXES, _read_tensors, atomic_write_bytes, attach_state
from ..core.layers import out_in
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


def _lora_import(model, config, tensors):
    by_name = {n: m for n, m, _, _ in walk(model)}
    method = "dora" if config.get("use_dora") else "lora"
    ours: dict[str, torch.Tensor] = {}
    targets: dict[str, dict] = {}
    rank_pattern, alpha_pattern = {}, {}
    saved = set(config.get("modules_to_save") or [])
    bias_mode = config.get("bias", "none")
    for key, t in tensors.items():
        k = _strip(key)
        if k.endswith(".base_layer.weight"):
            # PEFT saves a targeted embedding in case it was resized; it must be the one we have
            mod = k[: -len(".base_layer.weight")]
            have = getattr(by_name.get(mod), "weight", None)
            have = getattr(getattr(by_name.get(mod), "base", None), "weight", have)
            if have is None or have.shape != t.shape or not torch.equal(have.detach().cpu(), t):
                raise AdapterFileError(f"{WEIGHTS}: holds a changed base weight for {mod} (a resized or "
                                       f"retrained embedding); deltatune adapters never replace base weights")
            continue
        for suffix, ours_name in ((".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B"),
                                  (".lora_embedding_A", "lora_A"), (".lora_embedding_B", "lora_B"),
                                  (".lora_magnitude_vector", "magnitude"), (".base_layer.bias", "lora_bias")):
            if k.endswith(suffix):
                mod = k[: -len(suffix)]
                if mod not in by_name:
                    raise AdapterFileError(f"{WEIGHTS}: module {mod} does not exist in {type(model).__name__}")
                base = getattr(by_name[mod], "base", by_name[mod])
                if ours_name == "lora_bias":
                    t = t - base.bias.detach()
                elif ours_name in ("lora_A", "lora_B"):
                    t = t.reshape(t.shape[0], -1)
                ours[f"deltas.{mod}.{ours_name}"] = t
                targets.setdefault(mod, {"weight_shape": list(base.weight.shape), "delta": "method"})
                break
        else:
            parts = k.split(".")
            owner = next((i for i in range(1, len(parts)) if any(
                match_pattern(".".join(parts[:i]), None, s) for s in saved)), None)
            mod, param = k.rsplit(".", 1)
            if owner is not None:
                ours[f"modules.{'.'.join(parts[:owner])}.{'.'.join(parts[owner:])}"] = t
            elif param == "bias" and bias_mode == "all" and mod in by_name:
                base = getattr(by_name[mod], "base", by_name[mod])
                ours[f"deltas.{mod}.bias"] = t - base.bias.detach()
                targets[mod] = {"weight_shape": list(base.weight.shape), "delta": "bias"}
            else:
                raise AdapterFileError(f"{WEIGHTS}: unexpected tensor {key} for a PEFT LoRA adapter")
    for mod in targets:
        if targets[mod]["delta"] == "method":
            r = ours[f"deltas.{mod}.lora_A"].shape[0]
            if r != config["r"]:
                rank_pattern[mod] = r
    cfg = {"r": config["r"], "alpha": config.get("lora_alpha", 8), "dropout": config.get("lora_dropout", 0.0),
           "rslora": bool(config.get("use_rslora", False)), "bias": bias_mode,
           "targets": _targets(config.get("target_modules")), "trainable_modules": sorted(saved),
           "rank_pattern": rank_pattern,
           "alpha_pattern": {_peft_pattern(k): v for k, v in (config.get("alpha_pattern") or {}).items()}}
    if config.get("layers_to_transform") is not None:
        layers = config["layers_to_transform"]
        cfg["layers"] = [layers] if isinstance(layers, int) else layers
    if bias_mode == "lora_only":
        for mod in targets:
            ours.setdefault(f"deltas.{mod}.lora_bias", torch.zeros(out_in(
                getattr(by_name[mod], "base", by_name[mod]), "linear")[0]))
    return method, cfg, targets, ours


def _ia3_import(model, config, tensors):
    by_name = {n: m for n, m, _, _ in walk(model)}
    ours, targets = {}, {}
    ff = []
    for key, t in tensors.items():
        k = _strip(key)
        if not k.endswith(".ia3_l"):
            continue
        mod = k[: -len(".ia3_l")]
        base = getattr(by_name[mod], "base", by_name[mod]) if mod in by_name else None
        if base is None:
            raise AdapterFileError(f"{WEIGHTS}: module {mod} does not exist in {type(model).__name__}")
        if t.shape[0] == 1 and t.dim() == 2 and t.shape[1] > 1:
            ff.append(mod)
        ours[f"deltas.{mod}.ia3_l"] = t.reshape(-1)
        targets[mod] = {"weight_shape": list(base.weight.shape), "delta": "method"}
    cfg = {"targets": _targets(config.get("target_modules")), "feedforward": ff,
           "trainable_modules": sorted(config.get("modules_to_save") or [])}
    return "ia3", cfg, targets, ours


def _prompt_import(model, config, tensors):
    from ..methods.prompts.prompt_tuning import default_targets
    (emb,) = default_targets(model)
    prompt = tensors.get("prompt_embeddings")
    if prompt is None:
        raise AdapterFileError(f"{WEIGHTS}: no prompt_embeddings tensor")
    by_name = {n: m for n, m, _, _ in walk(model)}
    base = getattr(by_name[emb], "base", by_name[emb])
    return "prompt_tuning", {"num_virtual_tokens": prompt.shape[0], "init": "random"}, \
        {emb: {"weight_shape": list(base.weight.shape), "delta": "method"}}, {f"deltas.{emb}.prompt": prompt}


IMPORTERS = {"LORA": _lora_import, "IA3": _ia3_import, "PROMPT_TUNING": _prompt_import}


def import_peft(model: torch.nn.Module, directory: str | os.PathLike, name: str = "default",
                trainable: bool = False) -> str:
    """Attach a Hugging Face PEFT adapter (LoRA, DoRA, IA3, prompt tuning) read from its
    safetensors files; the model is unchanged on any error. Returns the adapter name."""
    directory = Path(directory)
    if not (directory / CONFIG).exists():
        raise AdapterFileError(f"{directory}: no {CONFIG}; not a PEFT adapter directory")
    if not (directory / WEIGHTS).exists():
        pickles = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
        raise AdapterFileError(f"{directory}: no {WEIGHTS}" + (
            f"; {', '.join(pickles)} is a pickle, which deltatune never loads (it can run arbitrary code): "
            f"re-save the adapter with safe_serialization=True" if pickles else ""))
    try:
        config = json.loads((directory / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{directory / CONFIG}: not valid JSON ({e})") from None
    kind = config.get("peft_type")
    if kind not in IMPORTERS:
        raise AdapterFileError(f"{directory / CONFIG}: peft_type {kind!r} is not supported; "
                               f"supported: {', '.join(IMPORTERS)}")
    tensors = _read_tensors(directory / WEIGHTS)
    method, cfg, targets, ours = IMPORTERS[kind](model, config, tensors)
    meta = {"method": method, "config": cfg, "targets": targets}
    return attach_state(model, meta, ours, name, directory, directory / WEIGHTS, trainable)
