"""Prompt tuning, from "The Power of Scale for Parameter-Efficient Prompt Tuning" (Lester et
al., 2021).

``k`` trainable embeddings (soft prompt tokens) are prepended to the input embeddings; the
frozen model attends to them like real tokens: for tokens ``x_1..x_n`` with embeddings ``E x``,
the model runs on ``[P; E x]`` with ``P`` the ``k x dim`` prompt. The engine wraps the model's
input embedding so that the prompt is named, saved and activated like any delta; the shared
sequence plumbing (``deltatune.sequence``) prepends it, extends the attention mask, token types, labels
and position ids, removes the ``k`` prompt positions from the outputs, and keeps generation with
a key/value cache right (the prompt enters the cache on the first step only).

Initialisation (``init``): ``vocab`` copies the embeddings of ``k`` random vocabulary tokens (the
paper's sampled-vocabulary init), ``text`` copies the embeddings of ``init_token_ids`` (cycled
to ``k``), ``random`` draws from a normal with the embedding table's std.
Not mergeable: it changes the input sequence, not a weight. Parameters: ``k x dim``.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.config import check, check_choice, check_number, method_config, BaseConfig
from ...core.errors import DeltatuneError
from ...core.registry import Method, register
from ... import sequence


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


class PromptDelta(sequence.SequenceDelta):
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

    def prepended(self) -> torch.Tensor:
        return self.prompt


def default_targets(model: nn.Module) -> list[str]:
    return [sequence.find_host(model, "prompt_tuning").embedding]


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
    on_attach=sequence.on_attach,
    on_remove=sequence.on_remove,
))
