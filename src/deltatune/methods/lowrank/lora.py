"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021).

The frozen weight's 2-D view ``W (out, fan_in)`` becomes ``W + s B A`` with ``A (r, fan_in)``,
``B (out, r)`` and ``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA, "A Rank
Stabilization Scaling Factor for Fine-Tuning with LoRA"). ``B`` starts at zero so the model is
unchanged at initialisation. The forward never builds ``B A``: it computes ``x A^T B^T``; for a
convolution ``A`` is a convolution with the layer's kernel and ``B`` a 1x1 convolution; for an
Embedding ``A`` is looked up by token id.

Initialisations (``init``):
- ``default``: A Kaiming-uniform, B zero (for Embedding: A zero, B normal, so lookups train B).
- ``gaussian``: A normal with std 1/r, B zero.
- ``pissa`` (PiSSA: Principal Singular Values and Singular Vectors Adaptation of LLMs): A, B from
  the top-r singular triplets of W, ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T`` (divided by
  sqrt(s) each so that ``s B A`` is the principal part), with the frozen residual
  ``W - s B0 A0``. We keep W untouched and hold the initial factors ``B0, A0`` as frozen
  buffers: ``W + s (B A - B0 A0)`` is the same function and the same gradients, and the base
  model is never modified (unmerge and delete stay exact, the file is self-contained).
- ``milora``: the same with the smallest r singular triplets (minor components).

``bias``: ``none``; ``lora_only`` adds a trainable zero-init bias shift to each wrapped layer;
``all`` also gives every other layer that has a bias a trainable shift (all mergeable).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import BaseConfig, _normalise_pattern, check, check_choice, check_number, method_config
from ...core.engine import pattern_value
from ...core.errors import DeltatuneError
from ...core.layers import channel_view, check_groups, merge_bias_shift, out_in, to_2d
from ...core.registry import Method, register
from ...core.wrapper import Delta

INITS = ("default", "gaussian", "pissa", "milora")
SVD_INITS = ("pissa", "milora")

DEFAULT_TARGETS = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "t5": ["q", "v"], "vit": ["query", "value"],
    # EfficientNet-Lite (deltatune.train.vision): the 1x1 convolutions, which mix channels like a
    # Linear; a depthwise kernel has one input channel per group, so a low-rank update of it is void
    "efficientnet_lite": ["_expand_conv", "_project_conv", "_conv_head"],
}


@method_config
class LoraConfig(BaseConfig):
    """LoRA. ``r`` rank, ``alpha`` scale numerator, ``dropout`` on the LoRA input, ``rslora``
    scales by ``alpha/sqrt(r)``; ``rank_pattern``/``alpha_pattern`` map target patterns to
    per-layer r/alpha."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    bias: str = "none"
    init: str = "default"
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    # LoRA+ ("LoRA+: Efficient Low Rank Adaptation of Large Models"): B trains at this many times
    # A's rate (the paper suggests 16); None trains both at the run's rate
    loraplus_lr_ratio: float | None = None

    def validate(self) -> None:
        if self.loraplus_lr_ratio is not None:
            check_number("loraplus_lr_ratio", self.loraplus_lr_ratio, low=0, low_open=True)
        check_number("r", self.r, kind=int, low=1)
        check_number("alpha", self.alpha, low=0, low_open=True)
        check_number("dropout", self.dropout, low=0, high=1, high_open=True)
        check(isinstance(self.rslora, bool), f"rslora must be True or False, got {self.rslora!r}")
        check_choice("bias", self.bias, ("none", "all", "lora_only"))
        check_choice("init", self.init, INITS)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        for pat, r in self.rank_pattern.items():
            # the keys are matched like targets, so a bad regex must fail here, not at attach
            _normalise_pattern(pat, "rank_pattern")
            check_number(f"rank_pattern[{pat!r}]", r, kind=int, low=1)
        for pat, a in self.alpha_pattern.items():
            _normalise_pattern(pat, "alpha_pattern")
            check_number(f"alpha_pattern[{pat!r}]", a, low=0, low_open=True)

    def rank_alpha(self, name: str) -> tuple[int, float]:
        return pattern_value(name, self.rank_pattern, self.r), pattern_value(name, self.alpha_pattern, self.alpha)

    def scale(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.rslora else alpha / r


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Where dropout zeroes ``x`` (True = dropped): each element independently with probability
    ``p`` (to 1/65536). Four 16-bit draws come from each 64-bit random word, about 5x faster on a
    CPU than ``bernoulli_``, whose per-element draws cost LoRA-with-dropout ~8 % of a MiniLM step."""
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, 2 ** 63 - 1)
    return (words.view(torch.int16)[:n] < round(p * 65536) - 32768).view(x.shape)


class FusedLoraLinear(torch.autograd.Function):
    """``g * (x W^T + s (drop(x) A^T) B^T) + b (+ lora_bias)`` for a frozen ``W`` in one function;
    ``g = magnitude / norm`` per output unit is DoRA's rescaling (``g = 1`` for LoRA, where the
    magnitude is None).

    Against composing the ops with autograd it saves: the dropped input (only a 1-byte mask is
    kept; ``x`` itself is referenced, not copied), the full-size passes for the scale and the add
    (they go into ``addmm_``), and in backward ``g B`` is computed once and shared between the
    factor gradients and the input gradient, which is accumulated with ``addmm_`` too. DoRA keeps
    one full-size tensor (the pre-scale output, for the magnitude's gradient) where composed ops
    keep three. The dropout mask comes from ``dropout_mask`` on both paths, so they agree for the
    same RNG state.
    """

    @staticmethod
    def forward(ctx, x, w2, bias, A, B, lora_bias, magnitude, norm, scale: float, p: float):
        x2 = x.reshape(-1, x.shape[-1])
        drop = None
        if p > 0:
            drop = dropout_mask(x2, p)
            z = (x2.masked_fill(drop, 0) @ A.t()).mul_(1 / (1 - p))
        else:
            z = x2 @ A.t()
        pre = None
        if magnitude is None:
            out = torch.addmm(bias, x2, w2.t()) if bias is not None else x2 @ w2.t()
            out.addmm_(z, B.t(), alpha=scale)
        else:
            pre = (x2 @ w2.t()).addmm_(z, B.t(), alpha=scale)
            out = pre * (magnitude / norm) if bias is None else torch.addcmul(bias, pre, magnitude / norm)
        if lora_bias is not None:
            out += lora_bias
        ctx.save_for_backward(x2, drop, z, w2, A, B, pre, magnitude, norm)
        ctx.scale, ctx.p, ctx.has_lora_bias = scale, p, lora_bias is not None
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x2, drop, z, w2, A, B, pre, magnitude, norm = ctx.saved_tensors
        s, p = ctx.scale, ctx.p
        g2 = g.reshape(-1, g.shape[-1])
        dA = dB = dx = dlb = dmag = None
        if ctx.has_lora_bias and ctx.needs_input_grad[5]:
            dlb = g2.sum(0)
        if magnitude is not None:
            if ctx.needs_input_grad[6]:
                dmag = (g2 * pre).sum(0) / norm
            g2 = g2 * (magnitude / norm)
        gB = g2 @ B
        if ctx.needs_input_grad[4]:
            dB = (g2.t() @ z).mul_(s)
        if ctx.needs_input_grad[3]:
            if drop is None:
                dA = (gB.t() @ x2).mul_(s)
            else:
                dA = (gB.t() @ x2.masked_fill(drop, 0)).mul_(s / (1 - p))
        if ctx.needs_input_grad[0]:
            dx = g2 @ w2
            if drop is None:
                dx.addmm_(gB, A, alpha=s)
            else:
                dx.add_((gB @ A).masked_fill_(drop, 0), alpha=s / (1 - p))
            dx = dx.reshape(*g.shape[:-1], dx.shape[-1])
        return dx, None, None, dA, dB, dlb, dmag, None, None, None


class FusedLoraGroup(torch.autograd.Function):
    """Several LoRA layers on one input (q/k/v, gate/up), without dropout: ``FusedLoraLinear`` for
    each, except that the input is read once for all the down-projections (``x [A_1; A_2; ...]^T``)
    and once for all their gradients, and the input gradient takes all the low-rank terms in one
    ``addmm_``. An output the model never used gets no gradient and costs nothing in backward."""

    @staticmethod
    def forward(ctx, x, n: int, scales: tuple, *tensors):
        x2 = x.reshape(-1, x.shape[-1])
        ws, biases, As, Bs, lbs = (tensors[i * n:(i + 1) * n] for i in range(5))
        A_cat = torch.cat(As)
        Z = x2 @ A_cat.t()
        ranks = [A.shape[0] for A in As]
        outs = []
        for w2, b, z, B, lb, s in zip(ws, biases, Z.split(ranks, dim=1), Bs, lbs, scales):
            y = torch.addmm(b, x2, w2.t()) if b is not None else x2 @ w2.t()
            y.addmm_(z, B.t(), alpha=s)
            if lb is not None:
                y += lb
            outs.append(y.reshape(*x.shape[:-1], y.shape[-1]))
        ctx.save_for_backward(x2, Z, A_cat, *ws, *Bs)
        ctx.n, ctx.scales, ctx.ranks, ctx.x_shape = n, scales, ranks, x.shape
        ctx.has_lb = [lb is not None for lb in lbs]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x2, Z, A_cat, *rest = ctx.saved_tensors
        n, scales, ranks = ctx.n, ctx.scales, ctx.ranks
        ws, Bs = rest[:n], rest[n:]
        need = ctx.needs_input_grad
        dx = None
        gBs, dBs, dlbs = [], [None] * n, [None] * n
        for i, (g, w2, B, z, s) in enumerate(zip(grads, ws, Bs, Z.split(ranks, dim=1), scales)):
            if g is None:
                gBs.append(Z.new_zeros(Z.shape[0], ranks[i]))
                continue
            g2 = g.reshape(-1, g.shape[-1])
            gBs.append(g2 @ B * s)
            if need[3 + 3 * n + i]:
                dBs[i] = (g2.t() @ z).mul_(s)
            if ctx.has_lb[i] and need[3 + 4 * n + i]:
                dlbs[i] = g2.sum(0)
            if need[0]:
                dx = g2 @ w2 if dx is None else dx.addmm_(g2, w2)
        gB = torch.cat(gBs, dim=1)
        dA = gB.t() @ x2
        dAs = list(dA.split(ranks))
        if need[0]:
            dx = gB @ A_cat if dx is None else dx.addmm_(gB, A_cat)
            dx = dx.reshape(ctx.x_shape)
        return (dx, None, None, *([None] * 2 * n), *dAs, *dBs, *dlbs)


def check_rank(base: nn.Module, kind: str, r: int, layer: str | None = None) -> None:
    """Refuse, before anything is allocated, a rank the layer cannot use: ``B A`` has rank at most
    ``min(out, fan_in)``, so a larger ``r`` only adds parameters (and a huge one, e.g. a typo'd
    ``r=1000000000``, would try to allocate terabytes). PEFT does not check this."""
    out, fan_in = out_in(base, kind)
    if r > min(out, fan_in):
        what = f"layer {layer} ({type(base).__name__}" if layer else f"this layer ({type(base).__name__}"
        raise DeltatuneError(
            f"r={r} does not fit {what}, weight shape {tuple(base.weight.shape)}): r must be at most "
            f"min(out, fan_in) = {min(out, fan_in)}; lower r, or set rank_pattern for this layer")


class LoraDelta(Delta):
    def __init__(self, base: nn.Module, kind: str, r: int, scale: float, dropout: float,
                 init: str, bias: bool, loading: bool = False):
        super().__init__()
        check_groups(base, kind, "lora")
        if kind == "conv" and base.padding_mode != "zeros":
            raise DeltatuneError(f"lora supports zero-padded convolutions only, not padding_mode={base.padding_mode!r}")
        check_rank(base, kind, r)
        out, fan_in = out_in(base, kind)
        self.kind, self.r, self.scale = kind, r, scale
        self.dropout = dropout
        dtype = base.weight.dtype if base.weight.is_floating_point() else torch.float32
        self.lora_A = nn.Parameter(torch.zeros(r, fan_in, dtype=dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out, r, dtype=dtype, device=base.weight.device))
        self.lora_bias = nn.Parameter(torch.zeros(out, dtype=dtype, device=base.weight.device)) if bias else None
        self.svd = init in SVD_INITS
        if self.svd:
            self.register_buffer("A0", torch.zeros_like(self.lora_A))
            self.register_buffer("B0", torch.zeros_like(self.lora_B))
        if not loading:
            self.initialise(base, init)

    @torch.no_grad()
    def initialise(self, base: nn.Module, init: str) -> None:
        if init == "default":
            if self.kind == "embedding":
                nn.init.normal_(self.lora_B)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            w2 = to_2d(base.weight, self.kind).double()
            U, S, Vh = torch.linalg.svd(w2, full_matrices=False)
            idx = slice(0, self.r) if init == "pissa" else slice(S.shape[0] - self.r, S.shape[0])
            root = S[idx].sqrt() / math.sqrt(self.scale)
            self.lora_B.copy_(U[:, idx] * root)
            self.lora_A.copy_(root[:, None] * Vh[idx])
            self.B0.copy_(self.lora_B)
            self.A0.copy_(self.lora_A)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the effective update ``s B A`` (for PiSSA/MiLoRA: ``[A; A0]``, ``[B, -B0]``)."""
        if self.svd:
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
        weights); None where it does not apply, and the plain path runs."""
        if not self.fusable(x, base):
            return None
        return self.fused_apply(x, base, *self.rescale(base))

    def rescale(self, base: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(magnitude, norm)`` of a rescaled update (DoRA); LoRA has none."""
        return None, None

    def fusable(self, x: torch.Tensor, base: nn.Module) -> bool:
        return self.kind in ("linear", "conv1d_gpt2") and not base.weight.requires_grad and not (
            base.bias is not None and base.bias.requires_grad) and (
            x.dtype == base.weight.dtype or torch.is_autocast_enabled(x.device.type))

    def fused_apply(self, x, base, magnitude, norm):
        A, B = self.factors()
        p = self.dropout if self.training else 0.0
        args = [x, to_2d(base.weight, self.kind), base.bias, A, B, self.lora_bias, magnitude, norm]
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # what autocast would do to each matmul: run them all in its dtype (the casts are
            # in the graph, so the fp32 parameters get fp32 gradients)
            dtype = torch.get_autocast_dtype(device)
            args = [None if t is None else t.to(dtype) for t in args]
            with torch.autocast(device, enabled=False):
                return FusedLoraLinear.apply(*args, self.scale, p)
        return FusedLoraLinear.apply(*args, self.scale, p)

    @staticmethod
    def grouped_forward(members: list[tuple["LoraDelta", nn.Module]], x: torch.Tensor):
        """Outputs of several wrapped layers that read ``x`` (see ``FusedLoraGroup``); None where
        the group does not apply (dropout while training, autocast, another delta type)."""
        if torch.is_autocast_enabled(x.device.type):
            return None
        for d, base in members:
            if type(d) is not LoraDelta or d.kind != "linear" or not d.fusable(x, base) or (
                    d.training and d.dropout > 0):
                return None
        factors = [d.factors() for d, _ in members]
        tensors = ([base.weight for _, base in members] + [base.bias for _, base in members]
                   + [A for A, _ in factors] + [B for _, B in factors] + [d.lora_bias for d, _ in members])
        return FusedLoraGroup.apply(x, len(members), tuple(d.scale for d, _ in members), *tensors)

    def forward(self, x, y, base):
        y = y + self.lora_out(x, base)
        if self.lora_bias is not None:
            y = y + channel_view(self.lora_bias, y, self.kind)
        return y

    @staticmethod
    def batched_forward(deltas: list["LoraDelta"], index: torch.Tensor, x: torch.Tensor, base: nn.Module,
                        training: bool, *args, **kwargs):
        """Mixed-batch LoRA: sample i uses ``deltas[index[i]]`` (-1: none). The factors of each
        sample's adapter are gathered into ``(N, r, fan_in)`` / ``(N, out, r)`` stacks (ranks
        zero-padded) and applied with two batched matmuls, whatever the number of adapters."""
        d0 = deltas[0]
        if d0.kind not in ("linear", "conv1d_gpt2") or type(d0) is not LoraDelta or (
                training and any(d.dropout > 0 for d in deltas)):
            return None
        factors = [d.factors() for d in deltas]
        rmax = max(A.shape[0] for A, _ in factors)
        out = factors[0][1].shape[0]
        # the scale goes into B and the base output into the last product (baddbmm), so the
        # low-rank terms cost two batched products and no full-size elementwise pass
        A_all = x.new_zeros(len(deltas) + 1, rmax, factors[0][0].shape[1])
        B_all = x.new_zeros(len(deltas) + 1, out, rmax)
        for i, (d, (A, B)) in enumerate(zip(deltas, factors)):
            A_all[i, : A.shape[0]] = A
            B_all[i, :, : B.shape[1]] = B * d.scale
        slot = torch.where(index < 0, len(deltas), index)   # the last slot is all zeros: the base model
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        z = torch.bmm(x3, A_all[slot].transpose(1, 2))
        y = base(x, *args, **kwargs)
        y3 = y.reshape(x.shape[0], -1, out)
        if any(d.lora_bias is not None for d in deltas):
            bias = x.new_zeros(len(deltas) + 1, out)
            for i, d in enumerate(deltas):
                if d.lora_bias is not None:
                    bias[i] = d.lora_bias
            y3 = y3 + bias[slot][:, None, :]
        return torch.baddbmm(y3, z, B_all[slot].transpose(1, 2)).reshape(y.shape)

    def delta_2d(self, dtype=torch.float64) -> torch.Tensor:
        A, B = self.factors()
        return self.scale * (B.to(dtype) @ A.to(dtype))

    def merge(self, w2, b):
        return self.merge_bias(w2 + self.delta_2d(), b)

    def merge_bias(self, w2, b):
        if self.lora_bias is not None:
            w2, b = merge_bias_shift(w2, b, self.lora_bias, self.kind)
        return w2, b

    @classmethod
    def from_config(cls, base: nn.Module, kind: str, cfg: LoraConfig, name: str, loading: bool = False):
        r, alpha = cfg.rank_alpha(name)
        check_rank(base, kind, r, name)       # here too, to name the layer in the message
        return cls(base, kind, r, cfg.scale(r, alpha), cfg.dropout, cfg.init, cfg.bias != "none", loading)


make_delta = LoraDelta.from_config


def expected_parameters(base: nn.Module, kind: str, cfg: LoraConfig, name: str) -> int:
    """The paper's count: ``r (fan_in + out)`` per layer, plus ``out`` with a trained bias."""
    r, _ = cfg.rank_alpha(name)
    out, fan_in = out_in(base, kind)
    return r * (fan_in + out) + (out if cfg.bias != "none" else 0)


def lr_multipliers(cfg: LoraConfig) -> dict[str, float]:
    """LoRA+: B's rate is ``loraplus_lr_ratio`` times A's (``dt.parameter_groups``)."""
    return {} if cfg.loraplus_lr_ratio is None else {"lora_B": float(cfg.loraplus_lr_ratio)}


LORA = register(Method(
    name="lora",
    config_cls=LoraConfig,
    paper="LoRA: Low-Rank Adaptation of Large Language Models",
    hook="weight",
    kinds=("linear", "conv", "embedding", "conv1d_gpt2"),
    make_delta=make_delta,
    expected_parameters=expected_parameters,
    default_targets=DEFAULT_TARGETS,
    default_lr=3e-3,     # sweep (docs/results/README.md): tweets 78.8 % vs 78.3 % at 1e-3, fashion 84.7 vs 82.8
    variants=[{"init": "gaussian"}, {"init": "pissa"}, {"init": "milora"}, {"rslora": True, "dropout": 0.1},
              {"bias": "lora_only"}, {"bias": "all"}],
    lr_multipliers=lr_multipliers,
))
