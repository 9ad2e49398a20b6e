"""LaMDA, from "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional Adaptation"
(Azizi, Kundu and Pedram, 2024).

The update of the frozen weight's 2-D view ``W (out, fan_in)`` runs through a low-dimensional path::

    ΔW = B S A,     A (r, fan_in) "PMA",  S (r, r) the low-dimensional adapter,  B (out, r) "PMB"

``A`` is frozen, ``S`` trained throughout, and ``B`` trained at first, then frozen gradually during
the early steps, one rank component at a time, starting from the largest singular value: ``B``'s
columns ``0 .. n-1`` are frozen after optimizer step ``t``, ``n = min(r, ⌊t r / freeze_steps⌋)``,
so ``B`` is wholly frozen (``requires_grad`` off) after ``freeze_steps`` steps and only ``S`` trains
on. The schedule runs in the ``on_step`` hook (``dt.step_hook``), which also puts frozen columns back
to the values they froze at: a parameter whose gradient is zero still moves under Adam's moments
and weight decay. Without ``dt.step_hook`` nothing freezes; the count of frozen columns only grows,
and a loaded adapter (``trainable=True``) starts its schedule again at the next run's step 1.

Initialisation, our reading of the abstract ("spectrally decomposed"; "initializes projection
matrices with singular vectors from pre-trained weights") and of the PiSSA-style residual it builds
on: with the SVD ``W = U Σ Vᵀ``, ``A = V_rᵀ``, ``B₀ = U_r`` and ``S₀ = diag(Σ_r)``, and the frozen
weight becomes the residual ``W - B₀ S₀ A``, so the model is unchanged at init. (The released code
starts from LoRA's init instead: ``A`` Kaiming, ``B = 0``, ``S`` a default ``nn.Linear`` init, with a
LoRA scale ``alpha / r``; also unchanged at init.) Here ``W`` is never modified: the delta adds
``ΔW = (B S - B₀ S₀) A``, zero at init, the same function with the same gradients.

Parameter count per layer at attach: ``r² + out r`` (``S`` and ``B``), ``r²`` once ``B`` is frozen.
``r`` defaults to 8, LoRA's rank here (the released code's default is 64 on Llama 2 7B); the paper
freezes ``B`` "during the early fine-tuning stages" (its code freezes a column each 30 % of the run,
so few of them): ``freeze_steps`` 500, early in a run of thousands of steps.

Stored: ``S`` and ``B`` (its frozen columns included: they are trained values). ``A``, ``B₀`` and
``S₀`` are the SVD of the frozen weight (``_svd.spectrum``), recomputed at attach and load into
non-persistent buffers. On Linear and GPT-2 ``Conv1D`` layers the forward is ``x Aᵀ (B S - B₀ S₀)ᵀ``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import BaseConfig, check_number, method_config
from ...core.engine import adapters, wrappers
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import WeightDelta
from ..lowrank.lora import DEFAULT_TARGETS
from ._svd import MATMUL_KINDS, frozen, rank_of, spectrum, trained


@method_config
class LamdaConfig(BaseConfig):
    """LaMDA. ``r`` the low dimension; ``freeze_steps`` the optimizer steps after which ``B`` is
    wholly frozen (its columns freeze one by one before)."""

    r: int = 8
    freeze_steps: int = 500

    def validate(self) -> None:
        check_number("r", self.r, kind=int, low=1)
        check_number("freeze_steps", self.freeze_steps, kind=int, low=1)


class LamdaDelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, r: int):
        super().__init__()
        self.bind(base)
        self.kind = kind
        top = spectrum(base, kind).top(r)
        frozen(self, "lamda_A", top.Vh, base)
        frozen(self, "lamda_B0", top.U, base)
        frozen(self, "lamda_S0", torch.diag(top.S), base)
        self.lamda_B = trained(self.lamda_B0, base)
        self.lamda_S = trained(self.lamda_S0, base)
        self.frozen_columns = 0
        # B's frozen columns as they froze: not saved (B holds them), but moved with the model
        self.register_buffer("lamda_B_kept", None, persistent=False)

    def core(self, dtype: torch.dtype) -> torch.Tensor:
        """``B S - B₀ S₀`` (``out, r``), with no gradient into ``B``'s frozen columns."""
        B, n = self.lamda_B, self.frozen_columns
        if 0 < n < B.shape[1]:
            B = torch.cat([B[:, :n].detach(), B[:, n:]], dim=1)
        return B.to(dtype) @ self.lamda_S.to(dtype) - self.lamda_B0.to(dtype) @ self.lamda_S0.to(dtype)

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        """``(B S - B₀ S₀) A``."""
        return self.core(w2.dtype) @ self.lamda_A.to(w2.dtype)

    def forward(self, x, y, base):
        if self.kind not in MATMUL_KINDS:
            return super().forward(x, y, base)
        return y + F.linear(F.linear(x, self.lamda_A.to(x.dtype)), self.core(x.dtype))

    @torch.no_grad()
    def freeze(self, n: int) -> None:
        """Freeze ``B``'s first ``n`` columns (never fewer than already frozen); all of them: ``B``
        stops requiring a gradient and the optimizer skips it."""
        B = self.lamda_B
        if self.lamda_B_kept is not None:
            B[:, :self.lamda_B_kept.shape[1]] = self.lamda_B_kept
        n = max(n, self.frozen_columns)
        if n > self.frozen_columns:
            self.lamda_B_kept = B[:, :n].clone()
        self.frozen_columns = n
        if n == B.shape[1] and B.requires_grad:
            B.requires_grad_(False)
            B.grad = None
            self.lamda_B_kept = None


def make_delta(base: nn.Module, kind: str, cfg: LamdaConfig, name: str, loading: bool = False,
               shared: None = None) -> LamdaDelta:
    return LamdaDelta(base, kind, rank_of(base, kind, cfg.r, name, "lamda"))


def expected_parameters(base: nn.Module, kind: str, cfg: LamdaConfig, name: str) -> int:
    """``r² + out r`` per layer at attach: ``S`` and ``B`` (``A`` is frozen)."""
    out, _ = out_in(base, kind)
    return cfg.r * cfg.r + out * cfg.r


def on_step(model: nn.Module, name: str, step: int) -> None:
    """After optimizer step ``step``: freeze ``B``'s first ``⌊step r / freeze_steps⌋`` columns."""
    cfg = adapters(model)[name]
    deltas = [w.deltas[name] for _, w in wrappers(model) if name in w.deltas]
    if not deltas or not deltas[0].lamda_S.requires_grad:
        return              # a frozen (loaded) adapter has nothing to schedule
    for d in deltas:
        d.freeze(min(cfg.r, step * cfg.r // cfg.freeze_steps))


LAMDA = register(Method(
    name="lamda", config_cls=LamdaConfig,
    paper="LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional Adaptation",
    hook="weight", kinds=("linear", "conv", "conv1d_gpt2"), make_delta=make_delta,
    expected_parameters=expected_parameters, default_targets=DEFAULT_TARGETS, on_step=on_step,
    # freezing half of B's columns within the suite's six steps
    variants=[{"freeze_steps": 12}],
    # the released script trains at 3e-4 on Llama 2 7B, LoRA's rate there; LoRA here runs at 3e-3,
    # lowered to 1e-3 because B and S start at W's principal part, as PiSSA's factors, not at zero
    default_lr=1e-3))   # from the paper's recipe; not yet swept here
