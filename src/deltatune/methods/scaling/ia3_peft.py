"""(IA)^3 in Hugging Face PEFT's format (``peft_type`` IA3; see ``deltatune.interop.peft``)."""

from __future__ import annotations

from ...core.engine import walk, wrappers
from ...core.errors import AdapterFileError, DeltatuneError
from ...interop.peft import PREFIX, PeftFormat, _layer, _put, _saved_module, _strip, _targets, register_peft

def check_config(check, c: dict) -> None:
    check.names("feedforward_modules", allow_regex=True)


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


register_peft(PeftFormat("IA3", ("ia3",), export=_ia3_export, import_=_ia3_import, check=check_config))
