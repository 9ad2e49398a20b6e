"""Which modules a method must wrap, computed here from the model's own module names and what the
method's targets mean, never from the engine's matching code.

Each architecture family has a *layout*: a role (the query projection, the feed-forward output, the
token embedding, ...) and the regular expression that names the modules playing it, written from
the transformers source. Each method states, per family, which roles its default targets are (from
its paper: LoRA adapts the query and value projections; IA3 rescales keys, values and the
feed-forward's intermediate activation; Houlsby puts an adapter after both sub-layers; ...).
Explicit ``targets`` mean what the public API says: an exact module name, a dotted suffix, or
``re:<regex>`` matching the whole name.

A method added to the registry without an entry in ``DEFAULT_ROLES`` (or a rule below) makes its
conformance cases fail with a message saying what to add.
"""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from deltatune.core.wrapper import DeltaLayer, ModuleCopies

SHARED_CHILD = "deltatune_shared"    # the root model's child holding adapter-level modules


# ----------------------------------------------------------------------------- reading a model

def kind_of(module: nn.Module) -> str | None:
    """The layer kind, from the module's class (the kinds DESIGN.md names)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D":        # transformers' GPT-2 projection
        return "conv1d_gpt2"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("RMSNorm"):
        return "norm"
    return None


def walk(model: nn.Module):
    """(path in the live model, logical name, module) for every module. A wrapper stands for the
    module it wraps: its ``base`` child keeps the wrapper's logical name; its deltas and copies, and
    the adapter-level holder, are not entered (they are the adapters, not the model)."""

    def rec(path: str, logical: str, module: nn.Module):
        yield path, logical, module
        for child_name, child in module._modules.items():
            if child is None:
                continue
            child_path = f"{path}.{child_name}" if path else child_name
            if isinstance(module, (DeltaLayer, ModuleCopies)):
                if child_name == "base":
                    yield from rec(child_path, logical, child)
                continue
            if module is model and child_name == SHARED_CHILD:
                continue
            yield from rec(child_path, f"{logical}.{child_name}" if logical else child_name, child)

    yield from rec("", "", model)


def matches(name: str, pattern: str) -> bool:
    """The public meaning of a target pattern (without the ``type:`` and ``all-linear`` forms)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def under(name: str, patterns: list[str]) -> bool:
    """Whether ``name`` or a module above it matches a pattern (exclusions cover whole subtrees)."""
    parts = name.split(".")
    return any(matches(".".join(parts[:i]), p) for i in range(1, len(parts) + 1) for p in patterns)


# ----------------------------------------------------------------------------- layouts

_BERT = {  # transformers' BertModel (MiniLM is one), inside tests/models.py's Classifier
    "query": r"encoder\.encoder\.layer\.\d+\.attention\.self\.query",
    "key": r"encoder\.encoder\.layer\.\d+\.attention\.self\.key",
    "value": r"encoder\.encoder\.layer\.\d+\.attention\.self\.value",
    "attention_out": r"encoder\.encoder\.layer\.\d+\.attention\.output\.dense",
    "ffn_out": r"encoder\.encoder\.layer\.\d+\.output\.dense",
    "token_embedding": r"encoder\.embeddings\.word_embeddings",
    # post-norm: no module is the feed-forward alone; BertOutput (dense, then LayerNorm(h + input))
    # and BertSelfOutput end each sub-layer and take its input as input_tensor
    "ffn_block": r"encoder\.encoder\.layer\.\d+\.output",
    "attention_block": r"encoder\.encoder\.layer\.\d+\.attention\.output",
}
_LLAMA = {
    "query": r"model\.layers\.\d+\.self_attn\.q_proj", "key": r"model\.layers\.\d+\.self_attn\.k_proj",
    "value": r"model\.layers\.\d+\.self_attn\.v_proj", "attention_out": r"model\.layers\.\d+\.self_attn\.o_proj",
    "ffn_out": r"model\.layers\.\d+\.mlp\.down_proj", "token_embedding": r"model\.embed_tokens",
    "ffn_block": r"model\.layers\.\d+\.mlp", "attention_block": r"model\.layers\.\d+\.self_attn",
}
_GPT2 = {  # one fused query/key/value projection per block
    "qkv": r"transformer\.h\.\d+\.attn\.c_attn", "attention_out": r"transformer\.h\.\d+\.attn\.c_proj",
    "ffn_out": r"transformer\.h\.\d+\.mlp\.c_proj", "token_embedding": r"transformer\.wte",
    "ffn_block": r"transformer\.h\.\d+\.mlp", "attention_block": r"transformer\.h\.\d+\.attn",
}


def _vit_like(prefix: str) -> dict[str, str]:
    """transformers 5 ViT / AST encoders: q_proj, k_proj, v_proj, o_proj and mlp.fc1/fc2 per layer;
    their input is a patch embedding (a Conv2d), no token embedding."""
    layer = rf"{prefix}\.layers\.\d+"
    return {"query": rf"{layer}\.attention\.q_proj", "key": rf"{layer}\.attention\.k_proj",
            "value": rf"{layer}\.attention\.v_proj", "attention_out": rf"{layer}\.attention\.o_proj",
            "ffn_out": rf"{layer}\.mlp\.fc2", "ffn_block": rf"{layer}\.mlp", "attention_block": rf"{layer}\.attention"}


LAYOUTS: dict[str, dict[str, str]] = {
    "bert": _BERT, "llama": _LLAMA, "gpt2": _GPT2, "vit": _vit_like("vit"),
    "ast": _vit_like("audio_spectrogram_transformer"), "cnn": {},
}

# Per method and family, the roles of the default targets (from each paper; see the module
# docstring), and for IA3 which of them are rescaled at their input (the feed-forward's
# intermediate activation is the down projection's input).
_ATTENTION_QV = {"bert": ["query", "value"], "llama": ["query", "value"], "gpt2": ["qkv"],
                 "vit": ["query", "value"], "ast": ["query", "value"]}
DEFAULT_ROLES: dict[str, dict[str, list[str]]] = {
    "lora": _ATTENTION_QV, "dora": _ATTENTION_QV, "vera": _ATTENTION_QV, "adalora": _ATTENTION_QV,
    "ia3": {"bert": ["key", "value", "ffn_out"], "llama": ["key", "value", "ffn_out"], "gpt2": ["qkv", "ffn_out"],
            "vit": ["key", "value", "ffn_out"], "ast": ["key", "value", "ffn_out"]},
    "houlsby": {f: ["attention_out", "ffn_out"] for f in ("bert", "llama", "gpt2", "vit", "ast")},
    "pfeiffer": {f: ["ffn_out"] for f in ("bert", "llama", "gpt2", "vit", "ast")},
    # prompts enter through the token embedding (wrapped to hold them): models with token inputs only
    "prompt_tuning": {f: ["token_embedding"] for f in ("bert", "llama", "gpt2")},
    "prefix_tuning": {f: ["token_embedding"] for f in ("bert", "llama", "gpt2")},
}
IA3_INPUT_ROLES = ("ffn_out",)
# He et al.'s parallel adapter runs beside whole sub-layers (config ``sublayers``, default the feed-forward)
PARALLEL_BLOCK_ROLES = {"feedforward": "ffn_block", "attention": "attention_block"}
# methods whose default targets are read from the model rather than named by role
FROM_THE_MODEL = {
    "bitfit": "every layer with a bias tensor",
    "ln_tuning": "every LayerNorm / RMSNorm / GroupNorm with affine parameters",
}


@dataclasses.dataclass(frozen=True)
class Target:
    """A module the method must wrap, and what it is there for: ``target`` (a targeted layer),
    ``input`` (IA3: rescaled at its input), ``bias_only`` (LoRA ``bias="all"``: only its bias shifts)."""
    module: nn.Module
    role: str = "target"


class NoSemantics(Exception):
    """The test has no statement of this method's targets: the method's author must add one."""


def roles_of(family: str, role: str, model: nn.Module) -> list[str]:
    pattern = LAYOUTS[family].get(role)
    if pattern is None:
        return []
    return [n for _, n, _ in walk(model) if re.fullmatch(pattern, n)]


def expected_targets(method: str, cfg, family: str, model: nn.Module) -> dict[str, Target]:
    """Logical module name -> Target, for ``cfg`` attached to ``model`` (a model of ``family``)."""
    modules = {n: m for _, n, m in walk(model) if n}
    skip = list(cfg.exclude) + list(cfg.trainable_modules)
    found: dict[str, Target] = {}
    if cfg.targets is not None:
        for name, module in modules.items():
            if any(matches(name, p) for p in cfg.targets) and not under(name, skip):
                found[name] = Target(module)
    elif method in FROM_THE_MODEL:
        for name, module in modules.items():
            if under(name, skip):
                continue
            if method == "bitfit" and kind_of(module) in ("linear", "conv", "conv1d_gpt2", "norm") \
                    and getattr(module, "bias", None) is not None:
                found[name] = Target(module)
            if method == "ln_tuning" and kind_of(module) == "norm" and (
                    getattr(module, "weight", None) is not None or getattr(module, "bias", None) is not None):
                found[name] = Target(module)
    elif method == "parallel_adapter":
        for sublayer in cfg.sublayers or ["feedforward"]:
            for name in roles_of(family, PARALLEL_BLOCK_ROLES[sublayer], model):
                if not under(name, skip):
                    found[name] = Target(modules[name])
    else:
        if method not in DEFAULT_ROLES:
            raise NoSemantics(
                f"tests/conformance/expected_targets.py states no default targets for {method!r}: add the roles "
                f"its paper adapts to DEFAULT_ROLES (per family), so the conformance suite can check what it wraps")
        for role in DEFAULT_ROLES[method].get(family, []):
            for name in roles_of(family, role, model):
                if not under(name, skip):
                    found[name] = Target(modules[name])
    if cfg.layers is not None:
        found = {n: t for n, t in found.items() if _layer_index(n) in cfg.layers}
    if method == "ia3":
        found = {n: Target(t.module, "input" if _ia3_input(cfg, family, n) else "target") for n, t in found.items()}
    if getattr(cfg, "bias", "none") == "all":       # LoRA: every other layer with a bias shifts it
        for name, module in modules.items():
            if name not in found and not under(name, skip) and kind_of(module) is not None \
                    and getattr(module, "bias", None) is not None:
                found[name] = Target(module, "bias_only")
    return found


def _layer_index(name: str) -> int | None:
    return next((int(p) for p in name.split(".") if p.isdigit()), None)


def _ia3_input(cfg, family: str, name: str) -> bool:
    if cfg.feedforward is not None:
        return any(matches(name, p) for p in cfg.feedforward)
    if cfg.targets is not None:     # explicit targets without feedforward patterns: outputs only
        return False
    return any(re.fullmatch(LAYOUTS[family][r], name) for r in IA3_INPUT_ROLES if r in LAYOUTS[family])


def wrapped_by(model: nn.Module, adapter: str) -> set[str]:
    """Logical names of the modules the live model has wrapped for ``adapter``."""
    return {n for _, n, m in walk(model) if isinstance(m, DeltaLayer) and adapter in m.deltas}
