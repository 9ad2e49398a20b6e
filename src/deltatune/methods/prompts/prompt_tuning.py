"""Prompt tuning, from "The Power of Scale for Parameter-Efficient Prompt Tuning" (Lester et
al., 2021).

``k`` trainable embeddings (soft prompt tokens) are prepended to the input embeddings; the
frozen model attends to them like real tokens. The engine wraps the model's input embedding
so that the prompt is named, saved and activated like any delta; a pre-hook on the model that
owns that embedding (a transformers ``PreTrainedModel``: encoder or causal LM) turns
``input_ids`` into ``inputs_embeds`` with the prompt in front, extends ``attention_mask`` (ones)
and ``token_type_ids`` (zeros), and pads ``labels`` with -100. A post-hook removes the ``k``
prompt positions from ``last_hidden_state`` and ``logits``, so callers see outputs aligned
with their own tokens.

Initialisation (``init``): ``vocab`` copies the embeddings of ``k`` random vocabulary tokens (the
paper's sampled-vocabulary init), ``text`` copies the embeddings of ``init_token_ids`` (cycled
to ``k``), ``random`` draws from a normal with the embedding table's std.
Not mergeable: it changes the input sequence, not a weight. Generation with a key/value cache
is not supported yet.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ...core.config import check, check_choice, check_number, method_config, BaseConfig
from ...core.engine import unwrap, walk
from ...core.errors import DeltatuneError
from ...core.registry import Method, register
from ...core.wrapper import Delta, DeltaLayer

_HOOKS = "_deltatune_prompt_hooks"
_PROMPT_LEN = "_deltatune_prompt_len"


@method_config
class PromptTuningConfig(BaseConfig):
    """Prompt tuning: ``num_virtual_tokens`` soft tokens; ``init`` one of vocab, text, random."""

    num_virtual_tokens: int = 20
    init: str = "vocab"
    init_token_ids: list[int] | None = None

    def validate(self) -> None:
        check_number("num_virtual_tokens", self.num_virtual_tokens, kind=int, low=1)
        check_choice("init", self.init, ("vocab", "text", "random"))
        if self.init == "text":
            check(bool(self.init_token_ids) and all(isinstance(i, int) and i >= 0 for i in self.init_token_ids),
                  "init='text' needs init_token_ids: the token ids of the initial text (tokenizer(text).input_ids)")


class PromptDelta(Delta):
    def __init__(self, embedding: nn.Embedding, cfg: PromptTuningConfig, loading: bool = False):
        super().__init__()
        k, (vocab, dim) = cfg.num_virtual_tokens, embedding.weight.shape
        w = embedding.weight
        self.prompt = nn.Parameter(torch.zeros(k, dim, dtype=w.dtype, device=w.device))
        if loading:
            return
        with torch.no_grad():
            if cfg.init == "random":
                self.prompt.normal_(0, float(w.std()))
            else:
                if cfg.init == "vocab":
                    ids = torch.randint(0, vocab, (k,))
                else:
                    if max(cfg.init_token_ids) >= vocab:
                        raise DeltatuneError(f"init_token_ids holds id {max(cfg.init_token_ids)} but the "
                                             f"vocabulary has {vocab} tokens")
                    ids = torch.tensor(cfg.init_token_ids)[torch.arange(k) % len(cfg.init_token_ids)]
                self.prompt.copy_(w[ids.to(w.device)])

    def forward(self, x, y, base):
        return y        # the prompt enters through the host model's pre-hook


def _host(model: nn.Module) -> tuple[nn.Module, str]:
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
                return module, name
    raise DeltatuneError(f"prompt_tuning needs a model with an input embedding (a transformers model with "
                         f"get_input_embeddings()); {type(model).__name__} has none")


def default_targets(model: nn.Module) -> list[str]:
    return [_host(model)[1]]


def _prompt_layer(host: nn.Module) -> DeltaLayer | None:
    emb = host.get_input_embeddings()
    return emb if isinstance(emb, DeltaLayer) else None


def _pre_hook(host: nn.Module, args: tuple, kwargs: dict):
    layer = _prompt_layer(host)
    prompts = [d.prompt for d in (layer.running() if layer is not None else []) if isinstance(d, PromptDelta)]
    host.__dict__[_PROMPT_LEN] = 0
    if not prompts:
        return None
    bound = inspect.signature(host.forward).bind_partial(*args, **kwargs).arguments
    extra = bound.pop("kwargs", {}) or {}
    kw = {**bound, **extra}
    if kw.get("past_key_values") is not None:
        raise DeltatuneError("prompt_tuning does not support generation with a key/value cache yet; "
                             "call generate(..., use_cache=False)")
    ids, embeds = kw.pop("input_ids", None), kw.get("inputs_embeds")
    if embeds is None:
        if ids is None:
            raise DeltatuneError("prompt_tuning needs input_ids or inputs_embeds")
        embeds = layer(ids)
    prompt = torch.cat(prompts).to(embeds.dtype)
    n, k = embeds.shape[0], prompt.shape[0]
    kw["inputs_embeds"] = torch.cat([prompt.unsqueeze(0).expand(n, -1, -1), embeds], dim=1)
    fills = {"attention_mask": 1, "token_type_ids": 0, "labels": -100}
    for key, fill in fills.items():
        t = kw.get(key)
        if t is not None and t.dim() >= 2:
            kw[key] = torch.cat([torch.full((n, k), fill, dtype=t.dtype, device=t.device), t], dim=1)
    if kw.get("position_ids") is not None:
        raise DeltatuneError("prompt_tuning cannot combine with explicit position_ids; leave them to the model")
    host.__dict__[_PROMPT_LEN] = k
    return (), kw


def _post_hook(host: nn.Module, args: tuple, kwargs: dict, output):
    k = host.__dict__.get(_PROMPT_LEN, 0)
    if not k:
        return output
    for key in ("last_hidden_state", "logits"):
        t = output.get(key) if hasattr(output, "get") else None
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            output[key] = t[:, k:]
    return output


def on_attach(model: nn.Module, name: str) -> None:
    if _HOOKS in model.__dict__:
        return
    host, _ = _host(model)
    model.__dict__[_HOOKS] = [host.register_forward_pre_hook(_pre_hook, with_kwargs=True),
                              host.register_forward_hook(_post_hook, with_kwargs=True)]


def on_remove(model: nn.Module, name: str) -> None:
    from ...core.engine import adapters
    others = [n for n, c in adapters(model).items() if n != name and c.method == "prompt_tuning"]
    if not others:
        for h in model.__dict__.pop(_HOOKS, []):
            h.remove()


def make_delta(base: nn.Module, kind: str, cfg: PromptTuningConfig, name: str, loading: bool = False):
    return PromptDelta(base, cfg, loading)


def expected_parameters(base: nn.Module, kind: str, cfg: PromptTuningConfig, name: str) -> int:
    """``num_virtual_tokens x embedding dim``."""
    return cfg.num_virtual_tokens * base.weight.shape[1]


PROMPT_TUNING = register(Method(
    name="prompt_tuning",
    config_cls=PromptTuningConfig,
    paper="The Power of Scale for Parameter-Efficient Prompt Tuning",
    hook="input",
    kinds=("embedding",),
    make_delta=make_delta,
    expected_parameters=expected_parameters,
    default_targets=default_targets,
    default_lr=1e-1,     # sweep on BBC: 95.7 % at 3e-2, 96.4 % at 1e-1, 96.2 % at 3e-1
    foldable=False,
    per_sample_safe=False,
    changes_sequence=True,
    variants=[{"init": "random"}, {"init": "text", "init_token_ids": [7, 42, 101]}],
    identity_at_init=False,
    on_attach=on_attach,
    on_remove=on_remove,
))
