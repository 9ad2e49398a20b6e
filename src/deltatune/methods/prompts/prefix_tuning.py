"""Prefix tuning, from "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (Li and
Liang, 2021), as the deep prompts of "P-Tuning v2: Prompt Tuning Can Be Comparable to
Fine-tuning Universally Across Scales and Tasks" (Liu et al., 2022).

Every attention layer ``l`` of the frozen model gets ``k`` trained key vectors ``K_l^P`` and
value vectors ``V_l^P`` in front of the sequence's own, in every (key/value) head:

    head = softmax(q [K_l^P; K_l]^T / sqrt(d)) [V_l^P; V_l]

so each layer's attention can read a learned context, where prompt tuning changes the input
layer only. The trained table ``P`` is ``(layers, 2, kv_heads, k, head_dim)``; it enters the
model as a transformers ``Cache`` pre-filled with each layer's prefix (``deltatune.sequence``: the
attention mask gets ``k`` ones in front, positions are shifted by ``k`` as after ``k`` cached
tokens, and ``generate`` with a cache adds the prefix on its first step only). The engine wraps
the input embedding, whose delta holds the table, so it is named, saved and activated like any
delta; the model's geometry (layers, key/value heads, head size) comes from its config.

Reparametrisation (``prefix_projection``, Li and Liang sec. 4.3, for stable training):
``P = MLP(P')`` with ``P'`` a ``k x dim`` matrix and ``MLP = Linear(dim, h), tanh,
Linear(h, layers*2*kv_heads*head_dim)``, ``h = encoder_hidden_size``. Only ``P`` matters after
training, so the MLP is folded away at save: the delta's state (and the file) is the table ``P``,
and a loaded adapter is the plain table.

Initialisation (``init``): ``random`` draws ``P`` (or ``P'``) from N(0, 1), as P-tuning v2's
prefix embedding; ``vocab`` uses the real words of Li and Liang sec. 7.4: the keys and values the
model computes for ``k`` random vocabulary tokens (with the projection: their embeddings as
``P'``). Not the identity at init; not mergeable (it changes the attended sequence).

Parameters: ``layers * 2 * kv_heads * head_dim * k`` (the table: what the file holds). With the
projection, training holds ``k*dim + dim*h + h + h*T + T`` instead, ``T = layers*2*kv_heads*head_dim``.
Applies to models whose forward takes a key/value cache: causal LMs (Llama, SmolLM2, Qwen2,
Mistral, GPT-2) and BERT-like encoders (P-tuning v2's classification setting); other models get
a clear error at attach.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
from torch import nn

from ...core.config import check_choice, check_number, method_config, BaseConfig
from ...core.errors import DeltatuneError
from ...core.registry import Method, register
from ... import sequence


@method_config
class PrefixTuningConfig(BaseConfig):
    """Prefix tuning: ``num_virtual_tokens`` prefix positions in every layer; ``prefix_projection``
    trains them through an MLP of width ``encoder_hidden_size``; ``init`` random or vocab."""

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int = 512
    init: str = "random"

    def validate(self) -> None:
        check_number("num_virtual_tokens", self.num_virtual_tokens, kind=int, low=1, high=1 << 16)
        check_number("encoder_hidden_size", self.encoder_hidden_size, kind=int, low=1, high=1 << 16)
        check_choice("init", self.init, ("random", "vocab"))


class PrefixGeometry(nn.Module):
    """The adapter-level record of the model a prefix is for (no tensors: nothing is saved)."""

    def __init__(self, geometry: sequence.KVGeometry, host: nn.Module):
        super().__init__()
        self.geometry = geometry
        self.host = weakref.ref(host)       # for the real-word initialisation only

    def extra_repr(self) -> str:
        g = self.geometry
        return f"layers={g.num_layers}, kv_heads={g.kv_heads}, head_dim={g.head_dim}"


class PrefixDelta(sequence.SequenceDelta):
    def __init__(self, embedding: nn.Embedding, cfg: PrefixTuningConfig, shared: PrefixGeometry, loading: bool):
        super().__init__()
        g, k = shared.geometry, cfg.num_virtual_tokens
        w = embedding.weight
        self.shape = (g.num_layers, 2, g.kv_heads, k, g.head_dim)
        self.mlp: nn.Sequential | None = None
        ids = torch.randint(0, w.shape[0], (1, k), device=w.device)
        if cfg.prefix_projection and not loading:
            start = w.detach()[ids[0]].clone() if cfg.init == "vocab" else torch.randn(k, w.shape[1], dtype=w.dtype,
                                                                                     device=w.device)
            self.embedding = nn.Parameter(start)
            self.mlp = nn.Sequential(nn.Linear(w.shape[1], cfg.encoder_hidden_size), nn.Tanh(),
                                     nn.Linear(cfg.encoder_hidden_size, g.numel(1))).to(dtype=w.dtype, device=w.device)
            return
        self.prefix = nn.Parameter(torch.zeros(self.shape, dtype=w.dtype, device=w.device))
        if loading:
            return
        with torch.no_grad():
            if cfg.init == "vocab":
                host = shared.host()
                if host is None:
                    raise DeltatuneError("prefix_tuning init='vocab' needs the model it attaches to")
                self.prefix.copy_(sequence.real_token_prefix(host, ids))
            else:
                self.prefix.normal_(0.0, 1.0)

    def table(self) -> torch.Tensor:
        """``P``: the prefix table, ``(layers, 2, kv_heads, k, head_dim)``."""
        if self.mlp is None:
            return self.prefix
        layers, _, kv_heads, k, head_dim = self.shape
        flat = self.mlp(self.embedding)         # (k, layers*2*kv_heads*head_dim)
        return flat.view(k, layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4)

    def key_value_prefix(self) -> torch.Tensor:
        return self.table()

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The table only: the reparametrisation is folded away (what a saved file holds)."""
        if self.mlp is None:
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        out = OrderedDict() if destination is None else destination
        table = self.table()
        out[prefix + "prefix"] = table if keep_vars else table.detach().contiguous()
        return out


def default_targets(model: nn.Module) -> list[str]:
    return [sequence.find_host(model, "prefix_tuning").embedding]


def shared_state(model: nn.Module, cfg: PrefixTuningConfig) -> PrefixGeometry:
    host = sequence.find_host(model, "prefix_tuning").module
    return PrefixGeometry(sequence.kv_geometry(model, "prefix_tuning"), host)


def make_delta(base: nn.Module, kind: str, cfg: PrefixTuningConfig, name: str, loading: bool = False,
               shared: PrefixGeometry | None = None) -> PrefixDelta:
    if shared is None:
        raise DeltatuneError("prefix_tuning is built by dt.attach / dt.load_adapter, which read the model's geometry")
    return PrefixDelta(base, cfg, shared, loading)


def expected_parameters(base: nn.Module, kind: str, cfg: PrefixTuningConfig, name: str) -> int:
    """``layers * 2 * kv_heads * head_dim * k``: the table (the file's size, and the trained size
    without the projection)."""
    return sequence.remembered_geometry(base, "prefix_tuning").numel(cfg.num_virtual_tokens)


PREFIX_TUNING = register(Method(
    name="prefix_tuning",
    config_cls=PrefixTuningConfig,
    paper="Prefix-Tuning: Optimizing Continuous Prompts for Generation",
    hook="input",
    kinds=("embedding",),
    make_delta=make_delta,
    expected_parameters=expected_parameters,
    default_targets=default_targets,
    # swept on bbc at 5e-3 / 1e-2 / 3e-2 / 1e-1 (docs/results/README.md): like prompt tuning, the
    # prefixes want rates far above a weight delta's
    default_lr=1e-1,
    foldable=False,
    per_sample_safe=False,
    changes_sequence=True,
    variants=[{"init": "vocab"}],
    identity_at_init=False,
    shared_state=shared_state,
    on_attach=sequence.on_attach,
    on_remove=sequence.on_remove,
))
