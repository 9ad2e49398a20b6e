"""Where the sub-layers of a transformer block are, per architecture. ``SUBLAYER_OUTPUTS``: the
leaf modules whose output is a sub-layer's output just before its residual add (and, in
post-norm models, its LayerNorm): sequential adapters (Houlsby, Pfeiffer) act there.
``SUBLAYER_BLOCKS``: the whole sub-layer as one module (an MLP, an attention block returning a
tuple; in BERT's post-norm layout the module that adds the residual, called with the sub-layer's
input as ``input_tensor``): parallel adapters read its input and add beside it. Any other model
takes explicit ``targets``.
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
_BERT_BLOCKS = {"attention": r"re:.*layer\.\d+\.attention\.output", "feedforward": r"re:.*layer\.\d+\.output"}
_LLAMA_BLOCKS = {"attention": "self_attn", "feedforward": "mlp"}
_VIT_BLOCKS = {"attention": r"re:.*layers?\.\d+\.attention", "feedforward": r"re:.*layers?\.\d+\.mlp"}
SUBLAYER_BLOCKS: dict[str, dict[str, str]] = {
    "bert": _BERT_BLOCKS, "roberta": _BERT_BLOCKS, "vit": _VIT_BLOCKS, "dinov2": _VIT_BLOCKS,
    "audio-spectrogram-transformer": _VIT_BLOCKS,
    "llama": _LLAMA_BLOCKS, "mistral": _LLAMA_BLOCKS, "qwen2": _LLAMA_BLOCKS,
    "gpt2": {"attention": "attn", "feedforward": "mlp"},
}


def sublayer_targets(model: nn.Module, which: tuple[str, ...], method: str, blocks: bool = False) -> list[str]:
    """Target patterns for the ends of the ``which`` sub-layers ("attention", "feedforward"), or
    (``blocks``) for the sub-layer modules themselves."""
    from .matching import model_type
    kind = model_type(model)
    table = SUBLAYER_BLOCKS if blocks else SUBLAYER_OUTPUTS
    if kind not in table:
        raise DeltatuneError(
            f"{method}: {type(model).__name__} (model type {kind!r}) has no sub-layer map here (known: "
            f"{', '.join(sorted(table))}); pass targets=[...] naming the module whose output ends each "
            f"attention / feed-forward sub-layer (see `deltatune inspect`)")
    return [table[kind][w] for w in which]
