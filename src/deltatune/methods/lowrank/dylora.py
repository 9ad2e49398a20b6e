"""DyLoRA, from "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free
Low-Rank Adaptation" (Valipour, Rezagholizadeh, Kobyzev and Ghodsi, 2023).

LoRA factors ``A (r, fan_in)`` and ``B (out, r)`` at a maximum rank ``r``, trained so that every
leading block of components is an adapter on its own. At each training step a rank ``b`` is drawn
uniformly from ``{1, ..., r}`` and the layer runs on the truncated factors::

    h = W x + (alpha / b) B[:, :b] A[:b] x

The paper's mode, ``frozen=True``: only the ``b``-th component (row ``b`` of A,
column ``b`` of B) is updated at that step; the ``b - 1`` before it take part in the forward but are
held as they are, so component ``b`` learns what the leading ones leave, and the components come
out ordered. Held exactly, whatever the optimizer: they get no gradient, and ``on_step`` puts back
what momentum or weight decay moved (``_component_steps.py``). ``frozen=False`` (the default
here): all of the first ``b`` components train. In one epoch of tweets at 3e-3 it reached 77.83 %
at r = 8 and 77.62 % truncated to r = 4 where the paper's mode reached 75.60 % and 75.33 %
(docs/results/README.md, "DyLoRA's nested ranks"): a step of the paper's mode updates one
component, so each gets about 1/r of LoRA's updates in a short run. Outside training (eval, merge, a frozen loaded adapter) the full rank runs,
with ``alpha / r``; ``truncate_rank(model, r')`` (``_nested_rank.py``) keeps the first ``r'``
components for good (then ``alpha / r'``).

``b`` comes from the config's ``seed`` and the optimizer step (``dt.step_hook`` passes it; one ``b``
per step for all the adapter's layers): a run draws the same ranks every time, and every forward of
one step (gradient accumulation, recomputation) uses the same ``b``. A training forward after the
factors changed with no ``dt.step_hook`` since raises (the rank would never move; seen by the
tensors' version counters, which every PyTorch optimizer but the fused ones advances).

Init as LoRA (``A`` Kaiming-uniform, ``B`` zero; an Embedding the other way round): the model is
unchanged at init. Trained per layer: ``r (out + fan_in)`` (``r`` the current rank). The forward is
LoRA's (``x Aᵀ Bᵀ``, convolutions, embeddings, the fused paths) on the truncated factors, with
``r / b`` folded into ``B``. The file holds ``lora_A`` and ``lora_B``.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ...core.config import BaseConfig, check_number, method_config
from ...core.engine import wrappers
from ...core.errors import DeltatuneError
from ...core.layers import check_groups, out_in
from ...core.registry import Method, register
from ._component_steps import Factor, remember, scale_last_update
from ._nested_rank import NESTED_METHODS
from .lora import DEFAULT_TARGETS, LoraDelta

FACTORS = (Factor("lora_A", 0), Factor("lora_B", 1))


@method_config
class DyLoraConfig(BaseConfig):
    """DyLoRA. ``r`` the maximum rank (every rank up to it is trained), ``alpha`` the scale numerator
    (``alpha / b`` at rank ``b``), ``dropout`` on the input, ``frozen`` the paper's mode (only the
    sampled component trains; off by default, see the module doc), ``seed`` what the sampled ranks
    are drawn from."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    frozen: bool = False
    seed: int = 0

    def validate(self) -> None:
        check_number("r", self.r, kind=int, low=1, high=1 << 16)
        check_number("alpha", self.alpha, low=0, low_open=True)
        check_number("dropout", self.dropout, low=0, high=1, high_open=True)
        check_number("seed", self.seed, kind=int, low=0)


def sampled_rank(seed: int, step: int, r: int) -> int:
    """The rank ``b`` of optimizer step ``step``: uniform on ``{1, ..., r}``, the same in every process."""
    digest = hashlib.sha256(f"deltatune-dylora:{seed}:{step}".encode()).digest()
    return 1 + int.from_bytes(digest[:8], "little") % r


class DyLoraDelta(LoraDelta):
    def __init__(self, base: nn.Module, kind: str, cfg: DyLoraConfig, loading: bool = False):
        super().__init__(base, kind, cfg.r, cfg.alpha / cfg.r, cfg.dropout, "default", False, loading)
        self.alpha, self.frozen, self.seed = cfg.alpha, cfg.frozen, cfg.seed
        # training state, not saved: the last optimizer step, the rank its forwards used, the factors
        # as that step found them (to hold the unsampled ones), and the tensors' versions then
        self.step, self.used, self.held, self.seen = 0, None, None, None

    def sampling(self) -> bool:
        return self.training and torch.is_grad_enabled() and self.lora_B.requires_grad

    def _versions(self) -> tuple:
        return tuple((id(p), p._version) for p in (self.lora_A, self.lora_B))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self.lora_A, self.lora_B
        if not self.sampling():
            return A, B
        if self.seen is None or any(i != j for (i, _), (j, _) in zip(self.seen, self._versions())):
            self.begin()
        elif self.seen != self._versions():
            raise DeltatuneError(
                "a dylora adapter's factors changed (an optimizer step) but dt.step_hook(model, step) was not "
                "called since: it advances the sampled rank, and holds the components that did not train. Call "
                "it after every optimizer step (deltatune train and with_deltatune(Trainer) do)")
        b = sampled_rank(self.seed, self.step + 1, self.r)
        self.used = b
        lead = b - 1 if self.frozen else 0      # frozen mode: the leading b - 1 get no gradient
        A = torch.cat([A[:lead].detach(), A[lead:b]])
        B = torch.cat([B[:, :lead].detach(), B[:, lead:b]], dim=1)
        return A, B * (self.r / b)

    def begin(self) -> None:
        """Start of an optimizer step: remember the factors (frozen mode) and their versions."""
        self.held = remember(self, FACTORS) if self.frozen else None
        self.seen, self.used = self._versions(), None

    def stepped(self, step: int) -> None:
        """After optimizer step ``step``: put back every component but the sampled one (frozen mode)."""
        if self.held is not None:
            w = torch.zeros(self.r)
            if self.used is not None:
                w[self.used - 1] = 1
            for factor in FACTORS:
                scale_last_update(self, self.held, factor, w)
        self.step = step
        self.begin()

    @torch.no_grad()
    def truncate(self, r: int) -> None:
        """Keep the first ``r`` components, dropping the rest from the parameters."""
        for attr, part in (("lora_A", self.lora_A[:r]), ("lora_B", self.lora_B[:, :r])):
            setattr(self, attr, nn.Parameter(part.clone(), requires_grad=getattr(self, attr).requires_grad))
        self.r, self.scale = r, self.alpha / r
        self.held = self.seen = self.used = None


def make_delta(base: nn.Module, kind: str, cfg: DyLoraConfig, name: str, loading: bool = False) -> DyLoraDelta:
    check_groups(base, kind, "dylora")
    out, fan_in = out_in(base, kind)
    if cfg.r > min(out, fan_in):
        raise DeltatuneError(f"r={cfg.r} does not fit {name} (weight shape {tuple(base.weight.shape)}): the rank "
                             f"must be at most min(out, fan_in) = {min(out, fan_in)}; lower r")
    return DyLoraDelta(base, kind, cfg, loading)


def expected_parameters(base: nn.Module, kind: str, cfg: DyLoraConfig, name: str) -> int:
    """``r (out + fan_in)`` per layer: A and B at the current rank."""
    out, fan_in = out_in(base, kind)
    return cfg.r * (out + fan_in)


def on_step(model: nn.Module, name: str, step: int) -> None:
    """After optimizer step ``step``: hold the unsampled components, and advance the sampled rank."""
    deltas = [w.deltas[name] for _, w in wrappers(model) if name in w.deltas]
    if deltas and deltas[0].lora_B.requires_grad:       # a frozen (loaded) adapter does not train
        for d in deltas:
            d.stepped(step)


DYLORA = register(Method(
    name="dylora", config_cls=DyLoraConfig,
    paper="DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation",
    hook="weight", kinds=("linear", "conv", "embedding", "conv1d_gpt2"), make_delta=make_delta,
    expected_parameters=expected_parameters, default_targets=DEFAULT_TARGETS, on_step=on_step,
    variants=[{"frozen": True}],
    # the paper trains at LoRA's rates; on tweets 3e-3 beat 1e-2 (which diverged with frozen=False)
    default_lr=3e-3))
NESTED_METHODS.add(DYLORA.name)
