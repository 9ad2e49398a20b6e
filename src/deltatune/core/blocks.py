"""Where the sub-layers of a transformer block end, per architecture: the modules whose output
is a sub-layer's output just before its residual add (and, in post-norm models, its LayerNorm).
Adapters that act on "the attention output" or "the feed-forward output" (Houlsby, Pfeiffer)
find their targets here; any other model takes explicit ``targets``.
"""

from __future__ import annotations

from torch import nn

from .errors import DeltatuneError

_BERT_LIKE = {"attention": r"re:.*layer\.\d+\.attention\.output\.dense", "feedforward": r"re:.*layer\.\d+\.output\.dense"}
_LLAMA_LIKE = {"attention": "self_attn.o_proj", "feedforward": "mlp.down_proj"}
# ViT-style encoders, in both of transformers' layouts (older: BERT's names; newer: o_proj, mlp.fc2)
_VIT_LIKE = {"attention": r"re:.*layers?\.\d+\.attention\.(output\.dense|o_proj)",
             "feedforward": r"re:.*layers?\.\d+\.(output\.dense|mlp\.fc2)"}
SUBLAYER_OUTPUTS: dict[str, dict[str, str]] = {
    "bert": _BERT_LIKE, "roberta": _BERT_LIKE, "vit": _VIT_LIKE, "dinov2": _VIT_LIKE,
    "audio-spectrogram-transformer": _VIT_LIKE,
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE,
    "gpt2": {"attention": "attn.c_proj", "feedforward": "mlp.c_proj"},
}


def sublayer_targets(model: nn.Module, which: tuple[str, ...], method: str) -> list[str]:
    """Target patterns for the ends of the ``which`` sub-layers ("attention", "feedforward")."""
    from .engine import model_type
    kind = model_type(model)
    if kind not in SUBLAYER_OUTPUTS:
        raise DeltatuneError(
            f"{method}: {type(model).__name__} (model type {kind!r}) has no sub-layer map here (known: "
            f"{', '.join(sorted(SUBLAYER_OUTPUTS))}); pass targets=[...] naming the module whose output ends each "
            f"attention / feed-forward sub-layer (see `deltatune inspect`)")
    return [SUBLAYER_OUTPUTS[kind][w] for w in which]
