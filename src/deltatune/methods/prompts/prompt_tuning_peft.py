"""Prompt tuning in Hugging Face PEFT's format (``peft_type`` PROMPT_TUNING; see ``deltatune.interop.peft``)."""

from __future__ import annotations

from ...core.engine import unwrap, walk, wrappers
from ...core.errors import AdapterFileError
from ...interop.peft import PeftFormat, register_peft

def check_config(check, c: dict) -> None:
    check.positive_int("num_virtual_tokens")
    check.positive_int("token_dim")
    if c.get("num_transformer_submodules") not in (None, 1):
        check.fail("num_transformer_submodules", "1 (prompts for encoder-decoder models are not supported)")


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


def _prompt_import(model, config, tensors, where):
    from .prompt_tuning import default_targets
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


register_peft(PeftFormat("PROMPT_TUNING", ("prompt_tuning",), export=_prompt_export, import_=_prompt_import,
                         check=check_config))
