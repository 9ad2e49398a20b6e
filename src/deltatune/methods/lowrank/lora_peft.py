"""LoRA and DoRA in Hugging Face PEFT's format (``peft_type`` LORA; the shared mapping and checks
are in ``deltatune.interop.peft``)."""

from __future__ import annotations

import torch

from ...core.engine import unwrap, walk, wrappers
from ...core.errors import AdapterFileError, DeltatuneError
from ...core.layers import layer_kind, out_in
from ...core.wrapper import BiasDelta
from ...interop.peft import (PREFIX, PeftFormat, _bias_shift, _is_int, _is_number, _layer, _peft_pattern, _put,
                             _saved_module, _strip, _targets, register_peft)

_UNSUPPORTED_LORA = {
    "lora_bias": "a trained bias on lora_B", "layer_replication": "replicated layers",
    "trainable_token_indices": "trained token embeddings", "target_parameters": "LoRA on nn.Parameters",
    "alora_invocation_tokens": "activated LoRA (aLoRA)", "use_qalora": "QALoRA", "arrow_config": "Arrow routing",
}
# init_lora_weights values with which PEFT replaces the base weights by a residual at init: the
# adapter is relative to that modified base, unless PEFT converted it on save (then it writes True)
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")


def check_config(check, c: dict) -> None:
    check.positive_int("r", required=True)
    check.number("lora_alpha", 0, low_open=True)
    check.number("lora_dropout", 0, 1)
    check.flag("use_rslora")
    check.flag("use_dora")
    if c.get("bias", "none") not in ("none", "all", "lora_only"):
        check.fail("bias", "'none', 'all' or 'lora_only'")
    layers = c.get("layers_to_transform")
    if layers is not None and not (_is_int(layers) and layers >= 0) and not (
            isinstance(layers, list) and all(_is_int(i) and i >= 0 for i in layers)):
        check.fail("layers_to_transform", "a non-negative int or a list of them")
    check.pattern_dict("rank_pattern", lambda x: _is_int(x) and x >= 1, "positive ints")
    check.pattern_dict("alpha_pattern", lambda x: _is_number(x) and x > 0, "positive numbers")
    for field, what in _UNSUPPORTED_LORA.items():
        if c.get(field) not in (None, False, [], {}):
            raise AdapterFileError(f"{check.path}: {field}={c[field]!r:.60} ({what}) is not supported by "
                                   f"dt.import_peft; loading it as a plain LoRA would compute something else")
    init = c.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        raise AdapterFileError(
            f"{check.path}: init_lora_weights={init!r}: PEFT replaced the base weights by a residual when "
            f"this adapter was made, so it does not apply to the original model; save it with PEFT's "
            f"path_initial_model_for_weight_conversion to get a plain LoRA")


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


register_peft(PeftFormat("LORA", ("lora", "dora"), export=_lora_export, import_=_lora_import, check=check_config))
