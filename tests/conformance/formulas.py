"""Trainable-parameter counts, one function per registry name, each the formula of the method's
paper written out here from the layers' shapes (read from the modules' own attributes, not from
the engine's weight views). The conformance suite compares them with what ``attach`` made
trainable; a registered method without a formula fails there, asking its author to add one.

Each function takes the pristine model, the config, and the expected targets
(``expected_targets.expected_targets``: logical name -> Target) and returns the count for the
adapter's deltas; the trainable modules (a new head) are counted by the suite itself.
"""

from __future__ import annotations

import math

from torch import nn

from expected_targets import Target, matches


def out_and_in(module: nn.Module) -> tuple[int, int]:
    """(output features, input features) of the layer as a linear map: a convolution's input is a
    receptive field (in_channels / groups x kernel), an Embedding maps a one-hot of its vocabulary."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.out_channels, module.in_channels // module.groups * math.prod(module.kernel_size)
    if isinstance(module, nn.Embedding):
        return module.embedding_dim, module.num_embeddings
    if type(module).__name__ == "Conv1D":      # GPT-2: weight (in, out), nf = out
        return module.nf, module.weight.shape[0]
    if hasattr(module, "out_features") and hasattr(module, "in_features"):     # a quantised Linear
        return module.out_features, module.in_features
    raise AssertionError(f"formulas.out_and_in does not know {type(module).__name__}")


def input_channels(module: nn.Module) -> int:
    """The features an input scaling multiplies: a Linear's inputs, a convolution's input channels."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.in_channels
    return out_and_in(module)[1]


def _numel(module: nn.Module, attr: str) -> int:
    t = getattr(module, attr, None)
    return 0 if t is None else t.numel()


def _rank(cfg, name: str) -> int:
    for pattern, r in (getattr(cfg, "rank_pattern", None) or {}).items():
        if matches(name, pattern):
            return r
    return cfg.r


def lora(model: nn.Module, cfg, targets: dict[str, Target]) -> int:
    """LoRA: ``r (in + out)`` per layer (A is r x in, B is out x r); LoRA-FA (``freeze_A``) trains
    B alone, ``r out``; a trained bias adds ``out``; ``bias="all"`` also trains every other layer's bias."""
    total = 0
    for name, t in targets.items():
        if t.role == "bias_only":
            total += _numel(t.module, "bias")
            continue
        out, fan_in = out_and_in(t.module)
        factors = out if getattr(cfg, "freeze_A", False) else fan_in + out
        total += _rank(cfg, name) * factors + (out if cfg.bias != "none" else 0)
    return total


def dora(model: nn.Module, cfg, targets: dict[str, Target]) -> int:
    """DoRA: LoRA's count plus the magnitude vector, one per output feature."""
    return lora(model, cfg, targets) + sum(out_and_in(t.module)[0] for t in targets.values()
                                           if t.role != "bias_only")


def ia3(model: nn.Module, cfg, targets: dict[str, Target]) -> int:
    """(IA)^3: one scale per rescaled feature: a key/value output, or a feed-forward intermediate
    activation (the down projection's input)."""
    return sum(input_channels(t.module) if t.role == "input" else out_and_in(t.module)[0]
               for t in targets.values())


def vera(model: nn.Module, cfg, targets: dict[str, Target]) -> int:
    """VeRA: the vectors ``d`` (r) and ``b`` (out) per layer; the random matrices are frozen."""
    return sum(cfg.r + out_and_in(t.module)[0] for t in targets.values())


def _bottleneck(d: int, cfg) -> int:
    """``2 d m + m + d``: W_down (m x d), b_down (m), W_up (d x m), b_up (d)."""
    m = getattr(cfg, "bottleneck_size", None) or d // cfg.reduction_factor
    return 2 * d * m + m + d


def houlsby(model: nn.Module, cfg, targets: dict[str, Target]) -> int:
    """Houlsby et al.: one bottleneck per adapted sub-layer output of width d."""
    return sum(_bottleneck(out_and_in(t.module)[0], cfg) for t in targets.values())


pfeiffer = houlsby          # the same bottleneck, one per block (after the feed-forward)


def hidden_width(model: nn.Module) -> int:
    """The model's hidden size d (what every sub-layer returns), from its transformers config."""
    c = next(m.config for m in model.modules() if getattr(m, "config", None) is not None)
    return getattr(c, "hidden_size", None) or c.n_embd


def parallel_adapter(model: nn.Module, cfg, targets: dict[str, Target]) -> int:
    """He et al.: the same bottleneck beside each targeted sub-layer, reading its input of width d."""
    return sum(_bottleneck(hidden_width(model), cfg) for _ in targets.values())


def prompt_tuning(model: nn.Module, cfg, targets: dict[str, Target]) -> int:
    """Lester et al.: ``k`` soft tokens of the embedding width."""
    return sum(cfg.num_virtual_tokens * t.module.embedding_dim for t in targets.values())


def prefix_tuning(model: nn.Module, cfg, targets: dict[str, Target]) -> int:
    """P-tuning v2 / prefix tuning: a key and a value prefix of ``k`` positions in every layer:
    ``num_layers x 2 x kv_heads x head_dim x k``. With Li and Liang's reparametrisation, training
    holds ``P'`` (k x dim) and the MLP ``dim -> h -> T`` instead (T = the per-position table size)."""
    c = next(m.config for m in model.modules() if getattr(m, "config", None) is not None)
    layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    heads = getattr(c, "num_attention_heads", None) or c.n_head
    dim = getattr(c, "hidden_size", None) or c.n_embd
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or dim // heads
    per_position = layers * 2 * kv_heads * head_dim
    k = cfg.num_virtual_tokens
    if getattr(cfg, "prefix_projection", False):
        h = cfg.encoder_hidden_size
        return k * dim + dim * h + h + h * per_position + per_position
    return per_position * k


def adalora(model: nn.Module, cfg, targets: dict[str, Target]) -> int:
    """AdaLoRA: ``P`` (out x r), ``Q`` (r x in) and the singular values ``Λ`` (r) at ``init_r``."""
    return sum(cfg.init_r * (out_and_in(t.module)[1] + out_and_in(t.module)[0]) + cfg.init_r
               for t in targets.values())


def bitfit(model: nn.Module, cfg, targets: dict[str, Target]) -> int:
    """BitFit: the bias terms of the adapted layers."""
    return sum(_numel(t.module, "bias") for t in targets.values())


def ln_tuning(model: nn.Module, cfg, targets: dict[str, Target]) -> int:
    """LN tuning: each norm layer's gain and (where it has one) bias."""
    return sum(_numel(t.module, "weight") + _numel(t.module, "bias") for t in targets.values())


FORMULAS = {
    "lora": lora, "dora": dora, "ia3": ia3, "vera": vera, "houlsby": houlsby, "pfeiffer": pfeiffer,
    "parallel_adapter": parallel_adapter, "prompt_tuning": prompt_tuning, "prefix_tuning": prefix_tuning,
    "adalora": adalora, "bitfit": bitfit, "ln_tuning": ln_tuning,
}
