"""AdaLoRA, from "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (Zhang et al., 2023).

A frozen weight's 2-D view ``W (out, fan_in)`` gets an update in SVD form, masked per triplet
``G_i = (P[:, i], λ_i, Q[i, :])`` by a saved boolean buffer ``m``::

    W' = W + s P diag(Λ ⊙ m) Q,     P (out, r), Λ (r,), Q (r, fan_in), s = alpha / r,  r = init_r

Λ starts at zero (the model is unchanged at init); P, Q are Gaussian as in the paper, with variances
1/out and 1/fan_in (near the orthonormal frames the regulariser asks for). Parameters per layer:
``r (out + fan_in + 1)``. Importance (Eq. 7-10), per entry w of P, Λ, Q: ``I = |w ∂L/∂w|``,
``Ī = β1 Ī + (1 - β1) I``, ``Ū = β2 Ū + (1 - β2) |I - Ī|`` (the new Ī), ``s(w) = Ī Ū``, and per triplet
``S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)``. Budget (Eq. 12) over the adapter's L layers, with
``T = total_step``: ``b = init_r L`` up to ``tinit``, then ``target_r L + (init_r - target_r) L (1 - (t - tinit)
/ (T - tinit - tfinal))^3`` (rounded down), ``target_r L`` at ``T - tfinal``. Every ``deltaT`` steps after
``tinit`` and at ``T - tfinal`` the mask keeps the adapter's ``b`` best triplets; then it is fixed (the
paper's final fine-tuning). Regulariser (Eq. 4), through ``dt.auxiliary_loss``:
``orth_reg_weight Σ_layers (||PᵀP - I||²_F + ||QQᵀ - I||²_F)``, a sum over layers as in the paper.

Loops clear gradients before ``dt.step_hook``, so post-accumulate-grad hooks record ``|w g|`` (with
the weights the gradient was taken at) and ``on_step`` folds it into Ī, Ū and reallocates; only
trainable adapters run the schedule (a loaded, frozen one keeps its ranks). The optimiser view stays
correct: the forward uses ``Λ ⊙ m``, so the task gradient of a masked λ_i, P[:, i], Q[i, :] is exactly
zero and Adam's updates of them cannot move the outputs. Adam's old moments (and weight decay) still
shift a masked λ_i, so ``on_step`` resets masked λ_i to zero after every optimizer step: the stored Λ
equals ``Λ ⊙ m``, the file holds zeros there, and a triplet that importance re-admits restarts at
λ_i = 0 as at init (outputs unchanged), never at a value drifted by stale moments. No optimiser state
is touched (the hook cannot see it); no shape changes.

Without ``dt.step_hook`` all ``init_r`` ranks stay; saving allows it (checkpoints are saved mid-schedule
by design), and ``check_budget(model, name)`` raises, naming the cause, when the ranks exceed ``target_r
x layers``; ``ranks(model, name)`` gives ``{layer: rank}``. Defaults: PEFT's names and values (init_r 12,
target_r 8, alpha 8, β 0.85, orth_reg_weight 0.5, tinit 0, tfinal 0, deltaT 1); ``total_step`` none.
"""

from __future__ import annotations

import functools
import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import BaseConfig, check, check_number, method_config
from ...core.engine import adapters, wrappers
from ...core.errors import DeltatuneError
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.wrapper import Delta
from .lora import DEFAULT_TARGETS

FACTORS = ("adalora_P", "adalora_Lambda", "adalora_Q")


@method_config
class AdaLoraConfig(BaseConfig):
    """AdaLoRA: ``init_r`` ranks per layer pruned to a ``target_r`` average over ``total_step`` steps."""

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    def validate(self) -> None:
        check_number("init_r", self.init_r, kind=int, low=1, high=1 << 16)
        check_number("target_r", self.target_r, kind=int, low=1)
        check(self.target_r <= self.init_r, f"target_r={self.target_r} must be at most init_r={self.init_r}: "
                                            f"AdaLoRA prunes ranks from init_r down to the target_r average")
        check_number("alpha", self.alpha, low=0, low_open=True)
        for field, low in (("tinit", 0), ("tfinal", 0), ("deltaT", 1)):
            check_number(field, getattr(self, field), kind=int, low=low)
        for field in ("beta1", "beta2"):
            check_number(field, getattr(self, field), low=0, high=1, high_open=True)
        check_number("orth_reg_weight", self.orth_reg_weight, low=0)
        if self.total_step is not None:
            check_number("total_step", self.total_step, kind=int, low=1)
            check(self.tinit + self.tfinal < self.total_step,
                  f"tinit + tfinal = {self.tinit} + {self.tfinal} must be less than total_step={self.total_step}: "
                  f"the budget has to fall from init_r to target_r between the warm-up and the final steps")

    def budget(self, step: int, layers: int) -> int:
        """b(t): how many triplets the adapter keeps over its ``layers`` layers at ``step``."""
        start, end = self.init_r * layers, self.target_r * layers
        progress = min(1.0, max(0.0, (step - self.tinit) / (self.total_step - self.tinit - self.tfinal)))
        return int(math.floor(end + (start - end) * (1 - progress) ** 3))


def _record(ref: weakref.ref, name: str, p: torch.Tensor) -> None:
    """The sensitivity ``|w g|`` of one parameter, kept by its delta until ``on_step``."""
    delta = ref()
    if delta is not None and p.grad is not None:
        delta.sensitivity[name] = (p.detach() * p.grad).abs()


class AdaLoraDelta(Delta):
    def __init__(self, base: nn.Module, kind: str, cfg: AdaLoraConfig, loading: bool = False):
        super().__init__()
        (out, fan_in), r, w = out_in(base, kind), cfg.init_r, base.weight
        like = {"dtype": w.dtype, "device": w.device}
        self.kind, self.scale = kind, cfg.alpha / r
        self.adalora_P = nn.Parameter(torch.zeros(out, r, **like))
        self.adalora_Lambda = nn.Parameter(torch.zeros(r, **like))
        self.adalora_Q = nn.Parameter(torch.zeros(r, fan_in, **like))
        self.register_buffer("adalora_mask", torch.ones(r, dtype=torch.bool, device=w.device))
        if not loading:
            nn.init.normal_(self.adalora_P, std=out ** -0.5)
            nn.init.normal_(self.adalora_Q, std=fan_in ** -0.5)
        # training state, not saved: |w g| of the last backward, and Ī, Ū per entry (see the docstring)
        self.sensitivity, self.importance, self.uncertainty = {}, {}, {}
        self.last_step, self.hooked = 0, ()

    def record_gradients(self) -> None:
        """(Re)install the ``|w g|`` hooks, by parameter identity: a deep copy of the model drops them."""
        params = [getattr(self, n) for n in FACTORS]
        if self.hooked != tuple(map(id, params)):
            for name, p in zip(FACTORS, params):
                p.register_post_accumulate_grad_hook(functools.partial(_record, weakref.ref(self), name))
            self.hooked = tuple(map(id, params))

    def forward(self, x, y, base):
        if self.training and torch.is_grad_enabled():
            self.record_gradients()
        z = F.linear(x, self.adalora_Q) * (self.adalora_Lambda * self.adalora_mask)
        return y + F.linear(z, self.adalora_P) * self.scale

    def delta_2d(self) -> torch.Tensor:
        """``s P diag(Λ ⊙ m) Q`` on the 2-D ``(out, fan_in)`` view, in float64."""
        kept = (self.adalora_Lambda * self.adalora_mask).double()
        return self.scale * (self.adalora_P.double() * kept) @ self.adalora_Q.double()

    def merge(self, w2, b):
        return w2 + self.delta_2d(), b

    def orthogonality(self) -> torch.Tensor:
        """``||PᵀP - I||²_F + ||QQᵀ - I||²_F`` (the paper's R(P, Q))."""
        P, Q = self.adalora_P, self.adalora_Q
        eye = torch.eye(Q.shape[0], dtype=Q.dtype, device=Q.device)
        return ((P.t() @ P - eye) ** 2).sum() + ((Q @ Q.t() - eye) ** 2).sum()

    @torch.no_grad()
    def update_importance(self, beta1: float, beta2: float) -> None:
        for name, i in self.sensitivity.items():
            self.importance[name] = beta1 * self.importance.get(name, torch.zeros_like(i)) + (1 - beta1) * i
            self.uncertainty[name] = (beta2 * self.uncertainty.get(name, torch.zeros_like(i))
                                      + (1 - beta2) * (i - self.importance[name]).abs())
        self.sensitivity = {}

    @torch.no_grad()
    def triplet_scores(self) -> torch.Tensor:
        """``S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)``, with ``s = Ī Ū`` (zero before any record)."""
        def s(name):
            return self.importance.get(name, 0) * self.uncertainty.get(name, torch.zeros_like(getattr(self, name)))
        return (s("adalora_Lambda") + s("adalora_P").mean(0) + s("adalora_Q").mean(1)).float()

    @torch.no_grad()
    def set_mask(self, keep: torch.Tensor) -> None:
        self.adalora_Lambda[keep & ~self.adalora_mask] = 0      # a re-admitted triplet restarts at zero
        self.adalora_mask.copy_(keep)


def make_delta(base: nn.Module, kind: str, cfg: AdaLoraConfig, name: str, loading: bool = False) -> AdaLoraDelta:
    out, fan_in = out_in(base, kind)
    if cfg.init_r > min(out, fan_in):
        raise DeltatuneError(f"init_r={cfg.init_r} does not fit {name} (weight shape {tuple(base.weight.shape)}): "
                             f"it must be at most min(out, fan_in) = {min(out, fan_in)}; lower init_r")
    return AdaLoraDelta(base, kind, cfg, loading)


def expected_parameters(base: nn.Module, kind: str, cfg: AdaLoraConfig, name: str) -> int:
    """``init_r (out + fan_in + 1)`` per layer: P, Q and Λ."""
    out, fan_in = out_in(base, kind)
    return cfg.init_r * (out + fan_in + 1)


def layer_deltas(model: nn.Module, name: str) -> dict[str, AdaLoraDelta]:
    if getattr(adapters(model).get(name), "method", None) != "adalora":
        raise DeltatuneError(f"no adalora adapter named {name!r}; attached: {', '.join(adapters(model)) or 'none'}")
    return {mod: w.deltas[name] for mod, w in wrappers(model) if name in w.deltas}


def ranks(model: nn.Module, name: str = "default") -> dict[str, int]:
    """``{layer: rank}``: the triplets adapter ``name`` keeps in each layer (its mask)."""
    return {mod: int(d.adalora_mask.sum()) for mod, d in layer_deltas(model, name).items()}


def check_budget(model: nn.Module, name: str = "default") -> dict[str, int]:
    """The per-layer ranks, after checking that they fit the budget ``target_r x layers``; raises
    when they do not (the schedule never ran, or stopped before ``total_step - tfinal``)."""
    kept, cfg, deltas = ranks(model, name), adapters(model)[name], layer_deltas(model, name)
    budget, last = cfg.target_r * len(kept), max(d.last_step for d in deltas.values())
    if sum(kept.values()) > budget:
        ran = (f"it last ran at step {last}, and reaches the budget at step {cfg.total_step - cfg.tfinal}" if last
               else "dt.step_hook(model, step) was never called after optimizer.step()")
        raise DeltatuneError(f"adalora adapter {name!r} keeps {sum(kept.values())} ranks in {len(kept)} layers, over "
                             f"its budget target_r x layers = {budget}: {ran}. Call dt.step_hook after every optimizer "
                             f"step up to total_step (deltatune train and with_deltatune(Trainer) do)")
    return kept


def on_step(model: nn.Module, name: str, step: int) -> None:
    """The schedule after optimizer step ``step``: importance, reallocation, masked Λ back to zero."""
    cfg, deltas = adapters(model)[name], list(layer_deltas(model, name).values())
    if not deltas[0].adalora_Lambda.requires_grad:
        return                      # a frozen (loaded) adapter keeps the ranks it was saved with
    if cfg.total_step is None:
        raise DeltatuneError(f"adalora adapter {name!r}: the rank schedule needs total_step, the number of optimizer "
                             f"steps of the run; pass dt.config('adalora', total_step=N, ...)")
    last = max(d.last_step for d in deltas)
    if step <= last or step > cfg.total_step:
        raise DeltatuneError(f"adalora adapter {name!r}: dt.step_hook got step {step} after step {last}; pass "
                             f"optimizer steps counted from 1, each once, up to total_step={cfg.total_step}")
    final = cfg.total_step - cfg.tfinal
    if step <= final:
        for d in deltas:
            d.update_importance(cfg.beta1, cfg.beta2)
    if step == final or (cfg.tinit < step < final and (step - cfg.tinit) % cfg.deltaT == 0):
        scores = torch.cat([d.triplet_scores().cpu() for d in deltas])
        keep = torch.zeros(scores.numel(), dtype=torch.bool)
        keep[torch.topk(scores, min(cfg.budget(step, len(deltas)), scores.numel())).indices] = True
        for d, part in zip(deltas, keep.split([d.adalora_mask.numel() for d in deltas])):
            d.set_mask(part.to(d.adalora_mask.device))
    with torch.no_grad():
        for d in deltas:
            d.adalora_Lambda.masked_fill_(~d.adalora_mask, 0)
            d.last_step = step


def auxiliary_loss(model: nn.Module, name: str) -> torch.Tensor | None:
    """``orth_reg_weight Σ R(P, Q)`` over the adapter's layers (None when the weight is 0)."""
    weight = adapters(model)[name].orth_reg_weight
    deltas = list(layer_deltas(model, name).values())
    if weight == 0 or not deltas[0].adalora_P.requires_grad:
        return None             # nothing to regularise, or a frozen adapter (a constant term)
    return weight * sum(d.orthogonality() for d in deltas)


ADALORA = register(Method(
    name="adalora", config_cls=AdaLoraConfig, paper="Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
    hook="weight", kinds=("linear", "conv1d_gpt2"), make_delta=make_delta, expected_parameters=expected_parameters,
    default_targets=DEFAULT_TARGETS, auxiliary_loss=auxiliary_loss, on_step=on_step,
    # swept on bbc at 1e-3 / 3e-3 / 1e-2 / 3e-2 (docs/results/README.md); the paper's GLUE rates are lower
    default_lr=1e-2))
