"""SSF, from "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning" (Lian et
al., NeurIPS 2022).

After chosen operations of the frozen model the features are scaled and shifted per channel::

    y <- γ ⊙ y + β

Here the operation is a wrapped layer and ``y`` its output (per output feature; a convolution's per
output channel; a LayerNorm's per normalised feature). Trained: ``γ`` (``ssf_scale``) and ``β``
(``ssf_shift``); frozen: everything else. Initialisation: ``γ = 1``, ``β = 0``, so the model is
unchanged at init (the official code draws ``γ ~ N(1, 0.02²)``, ``β ~ N(0, 0.02²)``; the exact identity
is kept here so an attached adapter starts as the base model).

The paper's re-parameterisation: every wrapped layer is affine in its weight, so SSF folds into it
on merge, ``W' = diag(γ) W``, ``b' = γ ⊙ b + β`` (a layer without a bias gets one; an Embedding's
shift joins every row). A LayerNorm ``γ_ln ⊙ x̂ + β_ln`` folds the same way into ``γ_ln' = γ ⊙ γ_ln``,
``β_ln' = γ ⊙ β_ln + β``; a norm with no bias to take ``β`` (RMSNorm) or no affine weight, or one
that does not normalise the last dimension (GroupNorm), is refused at attach.

Default targets: the paper puts SSF after the attention (its qkv and output projections), the
MLP's linear layers and the LayerNorms of each block. Here: the query, key, value and attention
output projections and the feed-forward output projection of every block. The norms (Llama's
RMSNorm cannot fold a shift) and the feed-forward input projections are left to explicit targets.

Parameters per layer: ``2 · out`` (``2 ·`` the norm's weight size).
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.config import BaseConfig, method_config
from ...core.errors import DeltatuneError
from ...core.layers import channel_view, merge_bias_shift, out_in
from ...core.registry import Method, register
from ...core.weights import weight_dtype
from ...core.wrapper import Delta

_BERT_FF = r"re:.*layer\.\d+\.output\.dense"
_ATTENTION_FF = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
# ViT, AST: attention.attention.query/... and output.dense before transformers 5, q_proj/.../o_proj and mlp.fc2 since
_VIT = ["query", "key", "value", "attention.output.dense", _BERT_FF, "q_proj", "k_proj", "v_proj", "o_proj", "mlp.fc2"]
DEFAULT_TARGETS = {
    "bert": ["query", "key", "value", "attention.output.dense", _BERT_FF],
    "roberta": ["query", "key", "value", "attention.output.dense", _BERT_FF],
    "llama": _ATTENTION_FF, "mistral": _ATTENTION_FF, "qwen2": _ATTENTION_FF,
    "gpt2": ["c_attn", "c_proj"],       # c_proj: the attention's and the MLP's output projections
    "vit": _VIT, "dinov2": _VIT, "audio-spectrogram-transformer": _VIT,
}


@method_config
class SSFConfig(BaseConfig):
    """SSF: a per-channel scale and shift of each wrapped layer's output (no fields of its own)."""


def _check_norm(base: nn.Module, name: str) -> None:
    missing = ("it has no affine weight" if getattr(base, "weight", None) is None
               else "it has no bias to take the shift β" if getattr(base, "bias", None) is None
               else None if isinstance(base, nn.LayerNorm)
               else "only a LayerNorm's γ ⊙ x̂ + β over the last dimensions is known to fold exactly")
    if missing:
        raise DeltatuneError(f"ssf on {name} ({type(base).__name__}): {missing}, so the scale and shift cannot fold "
                             f"into it; target the layer after it instead (or exclude {name})")


class SSFDelta(Delta):
    def __init__(self, base: nn.Module, kind: str, name: str):
        super().__init__()
        if kind == "norm":
            _check_norm(base, name)
        shape = base.weight.shape if kind == "norm" else (out_in(base, kind)[0],)
        like = weight_dtype(base)
        self.kind = kind
        self.ssf_scale = nn.Parameter(torch.ones(shape, **like))
        self.ssf_shift = nn.Parameter(torch.zeros(shape, **like))

    def forward(self, x, y, base):
        return y * channel_view(self.ssf_scale, y, self.kind) + channel_view(self.ssf_shift, y, self.kind)

    def merge(self, w2, b):
        scale = self.ssf_scale.double()
        if self.kind == "norm":          # the 1-D affine weight and bias of the norm
            return w2 * scale, b * scale + self.ssf_shift.double()
        return merge_bias_shift(w2 * scale[:, None], None if b is None else b * scale, self.ssf_shift, self.kind)


def make_delta(base: nn.Module, kind: str, cfg: SSFConfig, name: str, loading: bool = False) -> SSFDelta:
    return SSFDelta(base, kind, name)


def expected_parameters(base: nn.Module, kind: str, cfg: SSFConfig, name: str) -> int:
    """``2 · out``: one scale and one shift per output feature."""
    return 2 * (base.weight.numel() if kind == "norm" else out_in(base, kind)[0])


SSF = register(Method(
    name="ssf", config_cls=SSFConfig,
    paper="Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning",
    hook="activation", kinds=("linear", "conv", "embedding", "conv1d_gpt2", "norm"), make_delta=make_delta,
    expected_parameters=expected_parameters, default_targets=DEFAULT_TARGETS,
    # the official ViT recipes train γ, β with AdamW at 2.5e-4..5e-3
    default_lr=3e-3,    # from the paper's recipe; not yet swept here
))
