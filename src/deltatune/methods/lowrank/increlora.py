"""IncreLoRA, from "IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient
Fine-tuning" (Zhang et al., 2023).

AdaLoRA's SVD-like update, grown a component at a time instead of pruned: ``W' = W + (alpha / k) P diag(λ ⊙ m) Q``
on the 2-D view, P (out, max_r), λ (max_r,), Q (max_r, fan_in), ``m`` marking the layer's ``k`` active components,
its first (``alpha / k``: with the rank it has now, as the authors' code). Layers start at ``init_r`` (1, the
paper's). A layer's importance per step: ``I = Σ |ΔW ⊙ ∂L/∂ΔW| / sqrt(out fan_in)`` (over the step's backward
passes), smoothed as AdaLoRA (``Ī = β1 Ī + (1 - β1) I``, ``Ū = β2 Ū + (1 - β2) |I - Ī|``, score ``Ī Ū``). Every
``deltaT`` steps after ``tinit`` the ``top_h`` best layers get ``incre_rank_num`` components each, until the total
is ``target_rank`` x layers.

Advance learning: each layer holds ``incre_rank_num`` reserve components, next in line, whose P, Q train from the
start with λ fixed at 1e-5 (outputs barely move; Adam, blind to a gradient's scale, learns their directions); a
chosen layer's reserve becomes active (λ trainable from 1e-5, the scale now alpha / (k + 1)), the next slots its
reserve; at the budget reserves are dropped (with ``advance_learning=False`` new components start at λ = 0). Restart
warmup: a parameter joining training at an allocation (an activated λ; the new reserve's P, Q, or the activated
ones' without advance learning) has its rate warmed up again over ``restart_warmup`` steps (``_component_steps``).

Fixed shapes: factors allocated at ``max_r``, saved buffers ``increlora_mask`` and ``increlora_reserve`` saying what
runs; the optimizer never needs rebuilding, and other components get λ = 0 in the forward, hence no gradient (stored
λ reset to 0 after each step). Init: λ zero, P and Q Gaussian of std 0.02 (the authors' code; the paper: Gaussian):
unchanged at init up to the reserves' 1e-5 term. Trained per layer, pre-allocated: ``max_r (out + fan_in + 1)``.
Regulariser (``dt.auxiliary_loss``): ``orth_reg_weight x mean over layers of ||PᵀP - I||²_F + ||QQᵀ - I||²_F`` on
the components that train. Defaults: the paper's; tinit, restart_warmup one interval as its recipe; deltaT unset
spreads the rounds over the first half of ``total_step``; max_r unset: 4 x target_rank; targets LoRA's q, v as
adalora.py (the paper adapts every projection of a block: pass ``targets``)."""

from __future__ import annotations

import functools
import math
import weakref
from typing import NamedTuple

import torch
from torch import nn

from ...core.config import BaseConfig, check, check_number, method_config
from ...core.engine import adapters, wrappers
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import WeightDelta, apply_2d, weight_dtype
from ._component_steps import Factor, RestartWarmup
from .lora import DEFAULT_TARGETS

RESERVE_LAMBDA = 1e-5     # a reserve's fixed λ: small enough to leave outputs as they are, not zero (no gradient)
JOINING = {"lambda": (Factor("increlora_Lambda", 0),), "factors": (Factor("increlora_P", 1), Factor("increlora_Q", 0))}


@method_config
class IncreLoraConfig(BaseConfig):
    """IncreLoRA: ``init_r`` components per layer grown to ``target_rank`` on average, ``incre_rank_num`` at a
    time in the ``top_h`` most important layers, at most ``max_r`` per layer."""

    init_r: int = 1
    target_rank: int = 2
    max_r: int | None = None
    alpha: float = 16.0
    top_h: int = 2
    incre_rank_num: int | None = None
    tinit: int | None = None
    deltaT: int | None = None
    restart_warmup: int | None = None
    advance_learning: bool = True
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    total_step: int | None = None

    def validate(self) -> None:
        self.max_r = 4 * self.target_rank if self.max_r is None else self.max_r
        self.incre_rank_num = max(1, self.target_rank // 2) if self.incre_rank_num is None else self.incre_rank_num
        for field in ("init_r", "target_rank", "max_r", "top_h", "incre_rank_num"):
            check_number(field, getattr(self, field), kind=int, low=1, high=1 << 16)
        check(self.init_r <= self.target_rank <= self.max_r,
              f"init_r={self.init_r}, target_rank={self.target_rank}, max_r={self.max_r}: need init_r <= target_rank "
              f"<= max_r (IncreLoRA grows each layer from init_r, within the max_r components allocated per layer)")
        for field in ("tinit", "deltaT", "restart_warmup", "total_step"):
            if getattr(self, field) is not None:
                check_number(field, getattr(self, field), kind=int, low=0 if field == "tinit" else 1)
        for field, low, high in (("beta1", 0, 1), ("beta2", 0, 1), ("alpha", 0, None), ("orth_reg_weight", 0, None)):
            check_number(field, getattr(self, field), low=low, high=high, high_open=True, low_open=field == "alpha")

    def schedule(self, name: str, layers: int) -> "Schedule":
        deltaT = self.deltaT
        if deltaT is None:
            check(self.total_step is not None, f"increlora adapter {name!r}: the allocation interval needs total_step, "
                                               f"the run's number of optimizer steps (or set deltaT)")
            rounds = math.ceil(layers * (self.target_rank - self.init_r) / (self.top_h * self.incre_rank_num))
            deltaT = max(1, self.total_step // (2 * (rounds + 1)))
        return Schedule(self.target_rank * layers, deltaT if self.tinit is None else self.tinit, deltaT,
                        deltaT if self.restart_warmup is None else self.restart_warmup)


class Schedule(NamedTuple):
    budget: int         # the adapter's total rank at the end
    tinit: int          # steps before the first allocation
    deltaT: int         # steps between allocations
    warmup: int         # restart-warmup steps of a parameter that joins


def _record(ref: weakref.ref, update: torch.Tensor, grad: torch.Tensor) -> None:
    delta = ref()
    if delta is not None:
        i = (update * grad).abs().sum().float() / math.sqrt(update.numel())
        delta.sensitivity = i if delta.sensitivity is None else delta.sensitivity + i


class IncreLoraDelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, cfg: IncreLoraConfig, loading: bool = False):
        super().__init__()
        (out, fan_in), r, like = out_in(base, kind), cfg.max_r, weight_dtype(base)
        self.kind, self.alpha = kind, cfg.alpha
        self.bind(base)
        self.increlora_P = nn.Parameter(torch.zeros(out, r, **like))
        self.increlora_Lambda = nn.Parameter(torch.zeros(r, **like))
        self.increlora_Q = nn.Parameter(torch.zeros(r, fan_in, **like))
        slots = torch.arange(r, device=like["device"])
        self.register_buffer("increlora_mask", slots < cfg.init_r)
        self.register_buffer("increlora_reserve", (slots >= cfg.init_r) & (slots < cfg.init_r + cfg.incre_rank_num)
                             & cfg.advance_learning)
        if not loading:
            nn.init.normal_(self.increlora_P, std=0.02)
            nn.init.normal_(self.increlora_Q, std=0.02)
        # training state, not saved: this step's sensitivity, Ī and Ū, the restart warmup, the last step
        self.sensitivity, self.importance, self.uncertainty = None, torch.zeros(()), torch.zeros(())
        self.warmup, self.last_step, self.growing = RestartWarmup(JOINING), 0, True

    def rank(self) -> int:
        return int(self.increlora_mask.sum())

    def update(self, dtype: torch.dtype) -> torch.Tensor:
        """``(alpha / k) P diag(λ ⊙ m) Q`` in ``dtype``, the reserve's λ at 1e-5."""
        fixed = torch.where(self.increlora_reserve, RESERVE_LAMBDA, 0.0).to(dtype)
        lam = torch.where(self.increlora_mask, self.increlora_Lambda.to(dtype), fixed)
        scale = (self.alpha / self.increlora_mask.sum().clamp_min(1)).to(dtype)
        return scale * (self.increlora_P.to(dtype) * lam) @ self.increlora_Q.to(dtype)

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        return self.update(w2.dtype)        # the frozen weight's values do not enter the update

    def forward(self, x, y, base):
        update = self.update(x.dtype if x.is_floating_point() else self.increlora_P.dtype)
        if self.growing and self.training and update.requires_grad:
            update.register_hook(functools.partial(_record, weakref.ref(self), update.detach()))
        return y + apply_2d(x, update, base, self.kind)

    def orthogonality(self) -> torch.Tensor:
        trained = self.increlora_mask | self.increlora_reserve
        P, Q = self.increlora_P[:, trained], self.increlora_Q[trained]
        eye = torch.eye(Q.shape[0], dtype=Q.dtype, device=Q.device)
        return ((P.t() @ P - eye) ** 2).sum() + ((Q @ Q.t() - eye) ** 2).sum()

    @torch.no_grad()
    def update_importance(self, beta1: float, beta2: float) -> None:
        if self.sensitivity is not None:
            i, self.sensitivity = self.sensitivity, None
            self.importance = beta1 * self.importance.to(i) + (1 - beta1) * i
            self.uncertainty = beta2 * self.uncertainty.to(i) + (1 - beta2) * (i - self.importance).abs()

    def score(self) -> float:       # -inf when full: nothing left to grow into
        return -math.inf if self.rank() >= self.increlora_mask.numel() else float(self.importance * self.uncertainty)

    @torch.no_grad()
    def grow(self, add: int, step: int, advance: bool, reserve: int) -> int:
        """Activate the next ``add`` components, the ``reserve`` after them the new reserve; how many grew."""
        k, r = self.rank(), self.increlora_mask.numel()
        new = list(range(k, min(k + add, r)))
        spare = list(range(k + len(new), min(k + len(new) + reserve, r))) if advance else []
        self.increlora_mask[new], self.increlora_reserve[new], self.increlora_reserve[spare] = True, False, True
        self.increlora_Lambda[new] = RESERVE_LAMBDA if advance else 0.0
        self.warmup.join("lambda", new, step)
        self.warmup.join("factors", spare if advance else new, step)
        return len(new)

    @torch.no_grad()
    def stepped(self, step: int, warmup: int) -> None:
        self.warmup.after_step(self, step, warmup, self.increlora_mask.numel())
        self.increlora_Lambda.masked_fill_(~self.increlora_mask, 0)
        self.last_step = step


def make_delta(base: nn.Module, kind: str, cfg: IncreLoraConfig, name: str, loading: bool = False):
    limit = min(out_in(base, kind))
    check(cfg.max_r <= limit, f"max_r={cfg.max_r} (default 4 x target_rank) does not fit {name} (weight shape "
                              f"{tuple(base.weight.shape)}): it can be at most min(out, fan_in) = {limit}; lower max_r")
    check(kind != "conv" or base.padding_mode == "zeros", f"increlora supports zero-padded convolutions only; {name} "
                                                          f"has padding_mode={getattr(base, 'padding_mode', '')!r}")
    return IncreLoraDelta(base, kind, cfg, loading)


def expected_parameters(base: nn.Module, kind: str, cfg: IncreLoraConfig, name: str) -> int:
    """``max_r (out + fan_in + 1)`` per layer: P, Q and λ, allocated at the most a layer may grow to."""
    out, fan_in = out_in(base, kind)
    return cfg.max_r * (out + fan_in + 1)


def layer_deltas(model: nn.Module, name: str) -> dict[str, IncreLoraDelta]:
    check(getattr(adapters(model).get(name), "method", None) == "increlora",
          f"no increlora adapter named {name!r}; attached: {', '.join(adapters(model)) or 'none'}")
    return {mod: w.deltas[name] for mod, w in wrappers(model) if name in w.deltas}


def ranks(model: nn.Module, name: str = "default") -> dict[str, int]:
    """``{layer: rank}``: the active components adapter ``name`` has in each layer (its mask)."""
    return {mod: d.rank() for mod, d in layer_deltas(model, name).items()}


def on_step(model: nn.Module, name: str, step: int) -> None:
    """After optimizer step ``step``: importance, an allocation every deltaT steps, restart warmup."""
    cfg, deltas = adapters(model)[name], list(layer_deltas(model, name).values())
    if not deltas or not deltas[0].increlora_Lambda.requires_grad:
        return                      # a frozen (loaded) adapter keeps the ranks it was saved with
    plan, last = cfg.schedule(name, len(deltas)), max(d.last_step for d in deltas)
    check(step > last, f"increlora adapter {name!r}: dt.step_hook got step {step} after step {last}; pass optimizer "
                       f"steps counted from 1, each once")
    room = plan.budget - sum(d.rank() for d in deltas)
    if room > 0 and deltas[0].growing:
        for d in deltas:
            d.update_importance(cfg.beta1, cfg.beta2)
        if step > plan.tinit and (step - plan.tinit) % plan.deltaT == 0:
            scores = torch.tensor([d.score() for d in deltas])
            for i in torch.argsort(scores, descending=True, stable=True)[:cfg.top_h].tolist():
                if room == 0 or scores[i] == -math.inf:
                    break
                room -= deltas[i].grow(min(cfg.incre_rank_num, room), step, cfg.advance_learning, cfg.incre_rank_num)
    for d in deltas:
        if room <= 0 and d.growing:     # the budget is reached: reserves dropped, importance no longer recorded
            d.increlora_reserve.zero_()
            d.growing, d.sensitivity = False, None
        d.stepped(step, plan.warmup)


def auxiliary_loss(model: nn.Module, name: str) -> torch.Tensor | None:
    """``orth_reg_weight x mean R(P, Q)`` over the adapter's layers (None when the weight is 0)."""
    weight, deltas = adapters(model)[name].orth_reg_weight, list(layer_deltas(model, name).values())
    if weight == 0 or not deltas[0].increlora_P.requires_grad:
        return None                 # nothing to regularise, or a frozen adapter (a constant term)
    return weight * sum(d.orthogonality() for d in deltas) / len(deltas)


INCRELORA = register(Method(
    name="increlora", config_cls=IncreLoraConfig,
    paper="IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning",
    hook="weight", kinds=("linear", "conv", "embedding", "conv1d_gpt2"), make_delta=make_delta,
    expected_parameters=expected_parameters, default_targets=DEFAULT_TARGETS, on_step=on_step,
    auxiliary_loss=auxiliary_loss, variants=[{"advance_learning": False, "incre_rank_num": 2}],
    # the paper's DeBERTaV3-base rates are 3.5e-4..1.2e-3, as AdaLoRA's (1e-3 here)
    default_lr=1e-3))   # from the paper's recipe; not yet swept here
