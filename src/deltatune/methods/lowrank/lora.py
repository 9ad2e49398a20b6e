"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021).

The frozen weight's 2-D view ``W (out, fan_in)`` becomes ``W + s B A`` with ``A (r, fan_in)``,
``B (out, r)`` and ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA, "A Rank Stabilization
Scaling Factor for Fine-Tuning with LoRA"): ``r (fan_in + out)`` parameters per layer. The forward
computes ``x A^T B^T``, never ``B A``; for a convolution ``A`` is a convolution with the layer's
kernel and ``B`` a 1x1 convolution; for an Embedding ``A`` is looked up by token id.

Variants, all this one delta, chosen by the config (never told apart by type): ``init``
(``lora_init.py``: default, gaussian, PiSSA, MiLoRA, LoRA-GA); a magnitude term (DoRA,
``dora.py``); ``bias`` (``lora_only``: a trainable zero-init shift of each wrapped layer's bias;
``all``: of every other layer's bias too); LoRA+ (``loraplus_lr_ratio``); LoRA-FA (``freeze_A``,
"LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning": ``A`` a saved
buffer at its init, ``B`` alone trained, ``r out`` per layer; backward keeps ``x A^T``, not ``x``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import BaseConfig, _normalise_pattern, check, check_choice, check_number, method_config
from ...core.engine import pattern_value
from ...core.errors import DeltatuneError
from ...kernels import FusedLoraGroup, FusedLoraLinear, batched_low_rank, dropout_mask
from ...core.layers import channel_view, check_groups, merge_bias_shift, out_in, to_2d
from ...core.registry import Method, register
from ...core.wrapper import Delta
from .lora_init import INITS, LORA_GA_GAMMA, RESIDUAL_INITS, calibrate, check_calibrated, check_rank, initialise

DEFAULT_TARGETS = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "t5": ["q", "v"],
    # ViT, AST: attention.attention.query/value before transformers 5, attention.q_proj/v_proj since
    **{kind: ["query", "value", "q_proj", "v_proj"] for kind in ("vit", "audio-spectrogram-transformer")},
    # EfficientNet-Lite (deltatune.train.vision): the 1x1 convolutions, which mix channels like a
    # Linear; a depthwise kernel has one input channel per group, so a low-rank update of it is void
    "efficientnet_lite": ["_expand_conv", "_project_conv", "_conv_head"],
}


@method_config
class LoraConfig(BaseConfig):
    """LoRA. ``r`` rank, ``alpha`` scale numerator, ``dropout`` on the LoRA input, ``rslora``: ``alpha/sqrt(r)``;
    ``rank_pattern``/``alpha_pattern``: per-layer r/alpha by target pattern; ``lora_ga_gamma``: LoRA-GA's gamma."""

    magnitude_term: ClassVar[Any] = None     # a variant's norm, forward and merge: DoraConfig sets DoRA's

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    bias: str = "none"
    init: str = "default"
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    # LoRA+ ("LoRA+: Efficient Low Rank Adaptation of Large Models"): B at this multiple of A's rate (paper: 16)
    loraplus_lr_ratio: float | None = None
    freeze_A: bool = False      # LoRA-FA: A frozen at its (random) init, B alone trains
    lora_ga_gamma: float = LORA_GA_GAMMA

    def validate(self) -> None:
        if self.loraplus_lr_ratio is not None:
            check_number("loraplus_lr_ratio", self.loraplus_lr_ratio, low=0, low_open=True)
            check(not self.freeze_A, "loraplus_lr_ratio sets B's rate relative to A's, and freeze_A trains no A: "
                                     "drop one (to train B faster under freeze_A, raise the learning rate)")
        check_number("r", self.r, kind=int, low=1)
        check_number("alpha", self.alpha, low=0, low_open=True)
        check_number("dropout", self.dropout, low=0, high=1, high_open=True)
        check(isinstance(self.rslora, bool), f"rslora must be True or False, got {self.rslora!r}")
        check_choice("bias", self.bias, ("none", "all", "lora_only"))
        check_choice("init", self.init, INITS)
        check_number("lora_ga_gamma", self.lora_ga_gamma, low=0, low_open=True)
        check(self.init == "lora_ga" or self.lora_ga_gamma == LORA_GA_GAMMA,
              f"lora_ga_gamma={self.lora_ga_gamma} applies to init='lora_ga' only, and init={self.init!r}")
        self.rank_pattern, self.alpha_pattern = dict(self.rank_pattern or {}), dict(self.alpha_pattern or {})
        for field, kind in (("rank_pattern", int), ("alpha_pattern", float)):
            for pat, value in getattr(self, field).items():
                # the keys are matched like targets, so a bad regex must fail here, not at attach
                _normalise_pattern(pat, field)
                check_number(f"{field}[{pat!r}]", value, kind=kind, low=0, low_open=True)

    def rank_alpha(self, name: str) -> tuple[int, float]:
        return pattern_value(name, self.rank_pattern, self.r), pattern_value(name, self.alpha_pattern, self.alpha)

    def scale(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.rslora else alpha / r


class LoraDelta(Delta):
    def __init__(self, base: nn.Module, kind: str, r: int, scale: float, dropout: float,
                 init: str, bias: bool, loading: bool = False, magnitude_term: Any = None, freeze_A: bool = False):
        super().__init__()
        check_groups(base, kind, "lora")
        if kind == "conv" and base.padding_mode != "zeros":
            raise DeltatuneError(f"lora supports zero-padded convolutions only, not padding_mode={base.padding_mode!r}")
        check_rank(base, kind, r, init)
        out, fan_in = out_in(base, kind)
        self.kind, self.r, self.scale, self.dropout, self.init = kind, r, scale, dropout, init
        like = dict(dtype=base.weight.dtype if base.weight.is_floating_point() else torch.float32,
                    device=base.weight.device)
        self.lora_B, self.freeze_A = nn.Parameter(torch.zeros(out, r, **like)), freeze_A
        if freeze_A:        # a buffer: never trained, yet saved, since its random init cannot be redrawn
            self.register_buffer("lora_A", torch.zeros(r, fan_in, **like))
        else:
            self.lora_A = nn.Parameter(torch.zeros(r, fan_in, **like))
        self.lora_bias = nn.Parameter(torch.zeros(out, **like)) if bias else None
        self.term = magnitude_term
        self.reads_preceding = magnitude_term is not None
        self.magnitude = None if self.term is None else nn.Parameter(self.term.initial(base, kind).to(**like))
        self.residual = init in RESIDUAL_INITS
        if self.residual:
            self.register_buffer("A0", torch.zeros_like(self.lora_A))
            self.register_buffer("B0", torch.zeros_like(self.lora_B))
        self.needs_data = init == "lora_ga"     # until dt.calibrate, or a saved file, brings A0 and B0
        if not loading:
            initialise(self, base, init)
            if freeze_A and kind == "embedding" and init == "default":
                # that init draws B and zeroes A, and a frozen zero A would learn nothing: swap them
                nn.init.normal_(self.lora_A)
                nn.init.zeros_(self.lora_B)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the effective update ``s B A`` (residual inits: ``[A; A0]``, ``[B, -B0]``)."""
        if self.needs_data and self.training and torch.is_grad_enabled():
            check_calibrated(self)
        if self.residual:
            return torch.cat([self.lora_A, self.A0]), torch.cat([self.lora_B, -self.B0], dim=1)
        return self.lora_A, self.lora_B

    def lora_out(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """``s * B A x`` for this layer kind, without materialising ``B A``."""
        A, B = self.factors()
        if self.kind == "embedding":
            z = F.embedding(x, A.t(), base.padding_idx, base.max_norm, base.norm_type,
                            base.scale_grad_by_freq, base.sparse)
            return F.linear(z, B) * self.scale
        if self.training and self.dropout > 0:
            x = x.masked_fill(dropout_mask(x, self.dropout), 0) * (1 / (1 - self.dropout))
        if self.kind == "conv":
            w = base.weight
            conv = (F.conv1d, F.conv2d, F.conv3d)[w.dim() - 3]
            z = conv(x, A.reshape(A.shape[0], *w.shape[1:]), None, base.stride, base.padding, base.dilation)
            return conv(z, B.reshape(*B.shape, *([1] * (w.dim() - 2)))) * self.scale
        return F.linear(F.linear(x, A), B) * self.scale

    def fused_forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """The whole wrapped layer in one autograd function (Linear and GPT-2 Conv1D with frozen
        weights; a magnitude term's rescaling ``m / norm`` folded in); None where it does not
        apply, and the plain path runs."""
        if not self.fusable(x, base):
            return None
        A, B = self.factors()
        norm = None if self.term is None else self.term.norm(self, base)
        args = [x, to_2d(base.weight, self.kind), base.bias, A, B, self.lora_bias, self.magnitude, norm]
        p, device = self.dropout if self.training else 0.0, x.device.type
        if not torch.is_autocast_enabled(device):
            return FusedLoraLinear.apply(*args, self.scale, p)
        # what autocast would do to each matmul: run them all in its dtype (the casts are in the
        # graph, so the fp32 parameters get fp32 gradients)
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return FusedLoraLinear.apply(*[None if t is None else t.to(dtype) for t in args], self.scale, p)

    def fusable(self, x: torch.Tensor, base: nn.Module) -> bool:
        return self.kind in ("linear", "conv1d_gpt2") and not base.weight.requires_grad and not (
            base.bias is not None and base.bias.requires_grad) and (
            x.dtype == base.weight.dtype or torch.is_autocast_enabled(x.device.type))

    @staticmethod
    def grouped_forward(members: list[tuple["LoraDelta", nn.Module]], x: torch.Tensor):
        """Outputs of several wrapped layers that read ``x`` (see ``FusedLoraGroup``); None where
        the group does not apply (autocast, dropout while training, a magnitude term: see dora.py)."""
        if torch.is_autocast_enabled(x.device.type) or any(
                d.term is not None or d.kind != "linear" or not d.fusable(x, base) or (d.training and d.dropout > 0)
                for d, base in members):
            return None
        factors = [d.factors() for d, _ in members]
        tensors = ([base.weight for _, base in members] + [base.bias for _, base in members]
                   + [A for A, _ in factors] + [B for _, B in factors] + [d.lora_bias for d, _ in members])
        return FusedLoraGroup.apply(x, len(members), tuple(d.scale for d, _ in members), *tensors)

    def forward(self, x, y, base, preceding=()):
        y = y + self.lora_out(x, base) if self.term is None else self.term.forward(self, x, y, base, preceding)
        if self.lora_bias is not None:
            y = y + channel_view(self.lora_bias, y, self.kind)
        return y

    @staticmethod
    def batched_forward(deltas: list["LoraDelta"], index: torch.Tensor, x: torch.Tensor, base: nn.Module,
                        training: bool, *args, **kwargs):
        """Mixed-batch LoRA: sample i uses ``deltas[index[i]]`` (-1: none), in two batched products
        whatever the number of adapters (``kernels.batched_low_rank``)."""
        if deltas[0].kind not in ("linear", "conv1d_gpt2") or any(
                d.term is not None or (training and d.dropout > 0) for d in deltas):
            return None
        return batched_low_rank(x, base(x, *args, **kwargs), [d.factors() for d in deltas],
                                [d.scale for d in deltas], [d.lora_bias for d in deltas], index)

    def delta_2d(self, dtype=torch.float64) -> torch.Tensor:
        A, B = self.factors()
        return self.scale * (B.to(dtype) @ A.to(dtype))

    def merge(self, w2, b):
        w2 = w2 + self.delta_2d()
        if self.term is not None:
            w2 = self.term.merge(self, w2)
        return merge_bias_shift(w2, b, self.lora_bias, self.kind) if self.lora_bias is not None else (w2, b)

    @classmethod
    def from_config(cls, base: nn.Module, kind: str, cfg: LoraConfig, name: str, loading: bool = False):
        r, alpha = cfg.rank_alpha(name)
        check_rank(base, kind, r, cfg.init, name)       # here too, to name the layer in the message
        return cls(base, kind, r, cfg.scale(r, alpha), cfg.dropout, cfg.init, cfg.bias != "none", loading,
                   magnitude_term=cfg.magnitude_term, freeze_A=cfg.freeze_A)


make_delta = LoraDelta.from_config


def expected_parameters(base: nn.Module, kind: str, cfg: LoraConfig, name: str) -> int:
    """The paper's count: ``r (fan_in + out)`` per layer (freeze_A: ``r out``), ``+ out`` with a trained bias."""
    r, _ = cfg.rank_alpha(name)
    out, fan_in = out_in(base, kind)
    return r * (out if cfg.freeze_A else fan_in + out) + (out if cfg.bias != "none" else 0)


def lr_multipliers(cfg: LoraConfig) -> dict[str, float]:
    """LoRA+: B's rate is ``loraplus_lr_ratio`` times A's (``dt.parameter_groups``)."""
    return {} if cfg.loraplus_lr_ratio is None else {"lora_B": float(cfg.loraplus_lr_ratio)}


LORA = register(Method(
    name="lora", config_cls=LoraConfig, paper="LoRA: Low-Rank Adaptation of Large Language Models",
    hook="weight", kinds=("linear", "conv", "embedding", "conv1d_gpt2"), make_delta=make_delta,
    expected_parameters=expected_parameters, default_targets=DEFAULT_TARGETS,
    default_lr=3e-3,     # sweep (docs/results/README.md): tweets 78.8 % vs 78.3 % at 1e-3, fashion 84.7 vs 82.8
    variants=[{"init": "gaussian"}, {"init": "pissa"}, {"init": "milora"}, {"init": "lora_ga", "r": 4},
              {"rslora": True, "dropout": 0.1}, {"bias": "lora_only"}, {"bias": "all"}, {"freeze_A": True}],
    lr_multipliers=lr_multipliers, calibrate=calibrate))
