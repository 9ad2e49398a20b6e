"""The *input / sequence* hook point: one plumbing for every method that lengthens the sequence.

A sequence method wraps the model's input embedding with a ``SequenceDelta`` (so it is named,
saved and activated like any delta) and contributes either or both of:

- ``prepended()``: ``k`` embeddings put in front of the token embeddings (prompt tuning; later
  visual prompts, DePT);
- ``key_value_prefix()``: per-layer keys and values, ``(layers, 2, kv_heads, k, head_dim)``, that
  every attention layer sees in front of the sequence's own (prefix tuning, P-tuning v2). They
  enter through transformers' ``Cache``: a ``DynamicCache`` pre-filled with each layer's prefix is
  passed to the model as its cache.

Hooks on the *host* (the outermost module owning the input embedding: a causal LM or an
encoder) do the rest, for every active sequence delta at once, in one order: the key/value
prefixes (``p`` positions), then the prepended embeddings (``e`` positions), then the caller's
tokens. So, with ``k = p + e``:

- ``attention_mask`` (2-D) gets ``k`` ones in front; ``token_type_ids`` ``e`` zeros and
  ``labels`` ``e`` times -100 (only the prepended positions are real inputs);
- ``position_ids`` (and ``cache_position``, for transformers versions that take it) given in
  the caller's frame (their first token at 0) become ``p .. p+e-1`` for the prepended positions
  and ``k + i`` for the caller's; this is what the model computes itself when none are given,
  so both give the same result;
- outputs (``logits``, ``last_hidden_state``, ``hidden_states``) lose the ``e`` prepended
  positions; a prefix adds no output positions.

With a key/value cache (``generate``): a cache that is empty, or none, means the first step and
the prefix is filled in, the prompt prepended; a non-empty cache already holds them, so nothing
is added again, but the mask (which ``generate`` keeps the length of the caller's tokens) gets
its ``k`` ones, and positions are shifted by ``k``. A cache the hooks created for a caller who
did not ask for one (``use_cache`` not True) is dropped from the outputs, as the model would
have returned none.
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from typing import NamedTuple

import torch
from torch import nn

from .core.engine import unwrap, walk
from .core.errors import DeltatuneError
from .core.wrapper import Delta, DeltaLayer

_HOOKS = "_deltatune_sequence_hooks"   # plain attribute on the root model
_CALL = "_deltatune_sequence_call"     # plain attribute on the host: what the post-hook undoes
_PAUSED = "_deltatune_sequence_paused"  # set on the host while it computes an initialisation


class SequenceDelta(Delta):
    """A delta on the input embedding that lengthens the sequence; the embedding itself is left
    as it is (``forward`` returns the frozen output)."""

    def prepended(self) -> torch.Tensor | None:
        """``(k, dim)`` embeddings put in front of the tokens', or None."""
        return None

    def key_value_prefix(self) -> torch.Tensor | None:
        """``(layers, 2, kv_heads, k, head_dim)`` keys (index 0) and values (1), or None."""
        return None

    def forward(self, x, y, base):
        return y


class Host(NamedTuple):
    module: nn.Module       # the module whose forward the hooks rewrite
    embedding: str          # the logical name of its input embedding


@dataclasses.dataclass(frozen=True)
class KVGeometry:
    """What a key/value prefix must look like for one model."""
    num_layers: int
    kv_heads: int
    head_dim: int

    def numel(self, k: int) -> int:
        return self.num_layers * 2 * self.kv_heads * k * self.head_dim


# input embedding -> the geometry of its model: lets a per-layer formula (which sees only the
# embedding) know the model's layers and heads; weak, so it never keeps a model alive
_GEOMETRY: "weakref.WeakKeyDictionary[nn.Module, KVGeometry]" = weakref.WeakKeyDictionary()


def find_host(model: nn.Module, method: str) -> Host:
    """The outermost module that owns the input embedding, and that embedding's logical name."""
    for _, module, _, _ in [("", model, None, "")] + list(walk(model)):
        get = getattr(module, "get_input_embeddings", None)
        if not callable(get) or isinstance(module, DeltaLayer):
            continue
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            continue
        if emb is None:
            continue
        for name, m, _, _ in walk(model):
            if m is emb or unwrap(m) is unwrap(emb):
                return Host(module, name)
    raise DeltatuneError(f"{method} needs a model with an input embedding (a transformers model with "
                         f"get_input_embeddings()); {type(model).__name__} has none")


def _cache_argument(host: nn.Module) -> str | None:
    """The name the host's forward takes its key/value cache under (transformers renamed it)."""
    params = inspect.signature(host.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in params), None)


def kv_geometry(model: nn.Module, method: str) -> KVGeometry:
    """The prefix geometry of ``model`` from its config, remembered for its input embedding; a
    clear error for a model whose forward takes no key/value cache."""
    host = find_host(model, method).module
    cfg = getattr(host, "config", None)
    kind = getattr(cfg, "model_type", None) or type(host).__name__
    if cfg is None or _cache_argument(host) is None or getattr(cfg, "is_encoder_decoder", False):
        raise DeltatuneError(f"{method} passes its prefix as a key/value cache, and {type(host).__name__} "
                             f"(model type {kind!r}) takes none: use a causal LM (Llama, Qwen2, Mistral, GPT-2) "
                             f"or a BERT-like encoder, or prompt_tuning for this model")
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = getattr(text, "num_attention_heads", None)
    layers = getattr(text, "num_hidden_layers", None)
    if not heads or not layers:
        raise DeltatuneError(f"{method}: the config of {kind!r} names no num_hidden_layers / num_attention_heads")
    geometry = KVGeometry(layers, getattr(text, "num_key_value_heads", None) or heads,
                          getattr(text, "head_dim", None) or text.hidden_size // heads)
    _GEOMETRY[unwrap(host.get_input_embeddings())] = geometry
    return geometry


def remembered_geometry(embedding: nn.Module, method: str) -> KVGeometry:
    geometry = _GEOMETRY.get(unwrap(embedding))
    if geometry is None:
        raise DeltatuneError(f"{method}: the prefix size depends on the whole model; attach to it first")
    return geometry


def real_token_prefix(host: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The keys and values the model computes for the tokens ``ids`` ``(1, k)`` in every layer,
    ``(layers, 2, kv_heads, k, head_dim)`` (prefix tuning's initialisation from real words), with
    the sequence adapters already attached left out."""
    from transformers import DynamicCache
    cache = DynamicCache()
    host.__dict__[_PAUSED] = True
    try:
        with torch.no_grad():
            host(input_ids=ids, use_cache=True, **{_cache_argument(host) or "past_key_values": cache})
    finally:
        host.__dict__.pop(_PAUSED, None)
    return torch.stack([torch.stack([kv[0][0], kv[1][0]]) for kv in cache])


# ----------------------------------------------------------------------------- the hooks

@dataclasses.dataclass
class _Call:
    prepended: int          # output positions to remove
    tokens: int             # the caller's positions in this call
    drop_cache: bool


def _shift(positions: torch.Tensor, prefix: int, prepended: int, first: bool) -> torch.Tensor:
    """Caller-frame positions (last dim) shifted past everything in front; on the first step
    the prepended positions get theirs."""
    shifted = positions + (prefix + prepended)
    if not first or not prepended:
        return shifted
    own = torch.arange(prefix, prefix + prepended, dtype=positions.dtype, device=positions.device)
    return torch.cat([own.expand(*positions.shape[:-1], prepended), shifted], dim=-1)


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    if not hasattr(cache, "get_seq_length"):
        raise DeltatuneError(f"sequence methods need the key/value cache as a transformers Cache (DynamicCache), "
                             f"not {type(cache).__name__}")
    return int(cache.get_seq_length())


def _fill_cache(host: nn.Module, cache, prefix: torch.Tensor, batch: int):
    if cache is None:
        from transformers import DynamicCache
        try:
            cache = DynamicCache(config=host.config)
        except TypeError:       # transformers before caches took a config
            cache = DynamicCache()
    for layer, kv in enumerate(prefix):
        keys, values = (t.unsqueeze(0).expand(batch, -1, -1, -1) for t in kv)
        cache.update(keys, values, layer)
    return cache


def _pre_hook(host: nn.Module, args: tuple, kwargs: dict):
    host.__dict__[_CALL] = None
    layer = host.get_input_embeddings()
    deltas = [d for d in layer.running() if isinstance(d, SequenceDelta)] if isinstance(layer, DeltaLayer) else []
    if not deltas or host.__dict__.get(_PAUSED):
        return None
    bound = inspect.signature(host.forward).bind_partial(*args, **kwargs).arguments
    kw = {**bound, **(bound.pop("kwargs", None) or {})}
    cache_arg = _cache_argument(host) or "past_key_values"
    if cache_arg != "past_key_values" and kw.get("past_key_values") is not None:
        kw[cache_arg] = kw.pop("past_key_values")     # the deprecated name, as the model would take it
    ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
    tokens = embeds if embeds is not None else ids
    if tokens is None:
        raise DeltatuneError("sequence methods need input_ids or inputs_embeds")
    n, q = tokens.shape[0], tokens.shape[1]
    dtype = embeds.dtype if embeds is not None else layer.base.weight.dtype
    prompts = [p for p in (d.prepended() for d in deltas) if p is not None]
    prefixes = [p for p in (d.key_value_prefix() for d in deltas) if p is not None]
    e = sum(p.shape[0] for p in prompts)
    p = sum(t.shape[3] for t in prefixes)
    cache = kw.get(cache_arg)
    past = _cache_length(cache)
    first = past == 0
    created = False
    if first and prefixes:
        created = cache is None
        kw[cache_arg] = _fill_cache(host, cache, torch.cat(prefixes, dim=3).to(dtype), n)
    if first and prompts:
        if embeds is None:
            embeds = layer(kw.pop("input_ids"))
        kw.pop("input_ids", None)
        prompt = torch.cat(prompts).to(embeds.dtype)
        kw["inputs_embeds"] = torch.cat([prompt.unsqueeze(0).expand(n, -1, -1), embeds], dim=1)
        for key, fill in (("token_type_ids", 0), ("labels", -100)):
            t = kw.get(key)
            if isinstance(t, torch.Tensor) and t.dim() >= 2:
                kw[key] = torch.cat([torch.full((n, e), fill, dtype=t.dtype, device=t.device), t], dim=1)
    mask = kw.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise DeltatuneError(f"sequence methods extend a 2-D attention_mask (batch, length); got shape "
                                 f"{tuple(mask.shape)}: pass the 2-D padding mask and let the model build its own")
        caller = (past - p - e if past else 0) + q      # the caller's frame: their tokens, past and present
        if mask.shape[1] == caller:
            kw["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], p + e), mask], dim=1)
        elif mask.shape[1] != caller + p + e:
            raise DeltatuneError(f"attention_mask has length {mask.shape[1]}, but the inputs span {caller} positions "
                                 f"({caller + p + e} with the {p + e} prompt/prefix positions in front): pass a "
                                 f"mask covering the cached and the new tokens")
    for key in ("position_ids", "cache_position"):
        t = kw.get(key)
        if isinstance(t, torch.Tensor):
            kw[key] = _shift(t, p, e, first)
    host.__dict__[_CALL] = _Call(e if first else 0, q, created and kw.get("use_cache") is not True)
    return (), kw


def _post_hook(host: nn.Module, args: tuple, kwargs: dict, output):
    call = host.__dict__.pop(_CALL, None)
    if call is None or not hasattr(output, "get"):
        return output

    def own(t):     # the caller's positions only (logits_to_keep may already have cut the front)
        return t[:, -call.tokens:] if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[1] > call.tokens else t

    if call.prepended:
        for key in ("logits", "last_hidden_state"):
            if output.get(key) is not None:
                output[key] = own(output[key])
        if isinstance(output.get("hidden_states"), tuple):
            output["hidden_states"] = tuple(own(t) for t in output["hidden_states"])
    if call.drop_cache:
        for key in ("cache", "past_key_values"):
            if key in output and output[key] is not None:       # `in`: no deprecated-name lookup
                output[key] = None
    return output


@dataclasses.dataclass
class _Hooks:
    handles: list
    users: set[str]     # the sequence adapters relying on them (unload removes each in turn)


def on_attach(model: nn.Module, name: str) -> None:
    """Hook the host once for all sequence adapters (``name`` is one more user of the hooks)."""
    hooks = model.__dict__.get(_HOOKS)
    if hooks is None:
        host = find_host(model, "a sequence method").module
        model.__dict__[_HOOKS] = hooks = _Hooks([host.register_forward_pre_hook(_pre_hook, with_kwargs=True),
                                                 host.register_forward_hook(_post_hook, with_kwargs=True)], set())
    hooks.users.add(name)


def on_remove(model: nn.Module, name: str) -> None:
    hooks = model.__dict__.get(_HOOKS)
    if hooks is None:
        return
    hooks.users.discard(name)
    if not hooks.users:
        for h in hooks.handles:
            h.remove()
        del model.__dict__[_HOOKS]
