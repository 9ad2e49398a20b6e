"""LoRA-SB, from "Initialization using update approximation is a silver bullet for extreme efficiency
in low-rank fine-tuning" (Ponkshe et al., 2024), the adapter of "Fed-SB: A Silver Bullet for
Extreme Communication Efficiency and Performance in (Private) Federated LoRA Fine-Tuning".

LoRA-XS's architecture, ``ΔW = B R A`` on the 2-D view ``W (out, fan_in)``, with ``B (out, r)``
and ``A (r, fan_in)`` frozen and only the small square ``R (r, r)`` trained: ``r^2`` parameters
per layer (in federated training, averaging R over clients is exactly averaging their updates).
Training R by its gradient ``g^R = B^T g A^T`` moves W along ``B g^R A = B B^T g A^T A``.

The initialisation approximates full fine-tuning's first step (``init="gradient"``, the paper's).
With ``G`` the loss gradient of the layer's weight averaged over a few batches (``dt.calibrate``),
that step under Adam is ``ΔW_1 = -η sign(G)`` (Adam's first update is ``-η m/sqrt(v) = -η
sign(g)``; the paper's code computes this, ``η = update_lr``). With ``ΔW_1 = U S V^T``::

    B = U_r,   A = V_r^T,   R_0 = S_r,         so  B R_0 A  is the best rank-r approximation of ΔW_1

and B, A orthonormal make ``B B^T g A^T A`` the best approximation of every later full gradient in
those subspaces. The base is not offset: the model starts *at* that first step, not unchanged.
``G`` is the gradient of the layer's effective weight, taken through a zero probe ``P`` added to
the layer (``W + P``, ``dL/dP = dL/dW``), so a quantised base (no float weight) gets one too.
``update_lr`` defaults to the rate R trains at (``default_lr``; the paper's code passes its
training rate, in its federated scripts divided by the warm-up steps). Until calibrated (or loaded) a layer is its frozen layer and a training forward
raises; ``deltatune train`` calibrates on a few training batches by itself.

What the file holds: B and A come from data and cannot be regenerated, so with ``init="gradient"``
they are persistent buffers, saved with R: ``r^2 + r (out + fan_in)`` numbers per layer, not R's
bytes alone (Fed-SB sends B and A once and then R each round; this file is the whole adapter).
``init="random"`` (not the paper's init: LoRA-XS's architecture on fixed random orthonormal B, A,
as FFA-LoRA fixes a random A) draws B and A from ``seed`` and the layer's name, regenerates them
at load (non-persistent buffers) and starts R at zero (the model unchanged): its file is R's bytes.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import BaseConfig, check, check_choice, check_number, method_config
from ...core.engine import adapters, wrappers
from ...core.errors import DeltatuneError
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import WeightDelta, apply_2d, weight_dtype
from ._factor_inits import check_layer, normalised_qr, normalised_svd
from .lora import DEFAULT_TARGETS
from .lora_init import mean_gradients

INITS = ("gradient", "random")
LR = 2e-3               # R's rate (Method.default_lr)
UPDATE_LR = LR          # the first step's rate: the rate R trains at, as the paper's code passes it
HINT = ("lora_sb starts from the gradient on a few batches: call dt.calibrate(model, batches) before training "
        "(deltatune train does), or use init='random'")


@method_config
class LoraSbConfig(BaseConfig):
    """LoRA-SB. ``r`` the rank (``r^2`` trained numbers per layer), ``init`` "gradient" (the paper's,
    via ``dt.calibrate``) or "random" (fixed random orthonormal B, A from ``seed``), ``update_lr``
    the rate of the approximated first full fine-tuning step (``init="gradient"``)."""

    r: int = 8
    init: str = "gradient"
    update_lr: float = UPDATE_LR
    seed: int = 0

    def validate(self) -> None:
        check_number("r", self.r, kind=int, low=1, high=1 << 16)
        check_choice("init", self.init, INITS)
        check_number("update_lr", self.update_lr, low=0, low_open=True, high=1.0)
        check_number("seed", self.seed, kind=int, low=0, high=2 ** 63 - 1)
        check(self.init == "gradient" or self.update_lr == UPDATE_LR,
              f"update_lr={self.update_lr} applies to init='gradient' only, and init={self.init!r}")
        check(self.init == "random" or self.seed == 0,
              f"seed={self.seed} applies to init='random' only, and init={self.init!r}")


def random_orthonormal(seed: int, layer: str, which: str, rows: int, cols: int) -> torch.Tensor:
    """A ``rows x cols`` matrix with orthonormal columns, the same numbers in every process: a
    Gaussian draw seeded by ``(seed, layer, which, shape)``, then its sign-fixed QR."""
    digest = hashlib.sha256(f"deltatune-lora_sb:{seed}:{layer}:{which}:{rows}x{cols}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return normalised_qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))[0]


class LoraSbDelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, cfg: LoraSbConfig, layer: str):
        super().__init__()
        self.bind(base)
        self.kind, self.init = kind, cfg.init
        out, fan_in = out_in(base, kind)
        like = weight_dtype(base)
        self.lora_R = nn.Parameter(torch.zeros(cfg.r, cfg.r, **like))
        saved = cfg.init == "gradient"     # from data: saved; random: regenerated from the seed
        self.register_buffer("lora_B", torch.zeros(out, cfg.r, **like), persistent=saved)
        self.register_buffer("lora_A", torch.zeros(cfg.r, fan_in, **like), persistent=saved)
        self.needs_data = saved
        self.probe: torch.Tensor | None = None      # set during calibration only
        if cfg.init == "random":
            with torch.no_grad():
                self.lora_B.copy_(random_orthonormal(cfg.seed, layer, "B", out, cfg.r))
                self.lora_A.copy_(random_orthonormal(cfg.seed, layer, "A", fan_in, cfg.r).t())

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        """``ΔW = B R A``."""
        return self.lora_B.to(w2.dtype) @ self.lora_R.to(w2.dtype) @ self.lora_A.to(w2.dtype)

    def forward(self, x, y, base):
        if self.needs_data and self.training and torch.is_grad_enabled():
            self.needs_data = not bool(self.lora_A.any())
            if self.needs_data:
                raise DeltatuneError(HINT)
        if self.probe is not None:
            y = y + apply_2d(x, self.probe.to(x.dtype) if x.is_floating_point() else self.probe, base, self.kind)
        if self.kind in ("linear", "conv1d_gpt2"):    # x A^T R^T B^T: never the (out, fan_in) product
            return y + F.linear(F.linear(F.linear(x, self.lora_A), self.lora_R), self.lora_B)
        return super().forward(x, y, base)

    @torch.no_grad()
    def start_from_update(self, update: torch.Tensor) -> None:
        """B, A, R from the rank-r SVD of the approximated first update (2-D view, float64)."""
        U, S, Vh = normalised_svd(update)
        r = self.lora_R.shape[0]
        self.lora_B.copy_(U[:, :r])
        self.lora_A.copy_(Vh[:r])
        self.lora_R.copy_(torch.diag(S[:r]))
        self.needs_data = False


def make_delta(base: nn.Module, kind: str, cfg: LoraSbConfig, name: str, loading: bool = False,
               shared=None) -> LoraSbDelta:
    check_layer(base, kind, cfg.r, "lora_sb", name)
    return LoraSbDelta(base, kind, cfg, name)


def calibrate(model: nn.Module, name: str, batches: list[Any],
              loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> bool:
    """``dt.calibrate``'s hook (init="gradient"): every layer's mean weight gradient in one backward
    per batch, then its factors. Calibrating again restarts the adapter from the new estimate."""
    cfg = adapters(model)[name]
    if cfg.init != "gradient":
        return False
    layers = [(n, w) for n, w in wrappers(model) if name in w.deltas]
    merged = [n for n, w in layers if name in w.merged]
    if merged:
        raise DeltatuneError(f"adapter {name!r} is merged into {merged[0]}; dt.unmerge(model) before dt.calibrate")
    deltas = [w.deltas[name] for _, w in layers]
    try:
        with torch.no_grad():
            for d in deltas:    # the frozen function while the gradient is taken
                for t in (d.lora_B, d.lora_R, d.lora_A):
                    t.zero_()
                d.probe = torch.zeros(d.lora_B.shape[0], d.lora_A.shape[1], dtype=d.lora_R.dtype,
                                      device=d.lora_R.device, requires_grad=True)
        gradients = mean_gradients(model, [d.probe for d in deltas], [n for n, _ in layers], batches, loss_fn)
    finally:
        for d in deltas:
            d.probe = None
    for d, g in zip(deltas, gradients):
        d.start_from_update(-cfg.update_lr * torch.sign(g.double()))
    return True


def expected_parameters(base: nn.Module, kind: str, cfg: LoraSbConfig, name: str) -> int:
    """``r^2`` per layer: R."""
    return cfg.r * cfg.r


LORA_SB = register(Method(
    name="lora_sb", config_cls=LoraSbConfig,
    paper="Fed-SB: A Silver Bullet for Extreme Communication Efficiency and Performance in (Private) Federated "
          "LoRA Fine-Tuning",
    hook="weight", kinds=("linear", "conv", "embedding", "conv1d_gpt2"), make_delta=make_delta,
    expected_parameters=expected_parameters, default_targets=DEFAULT_TARGETS,
    default_lr=LR,      # from the paper's recipe; not yet swept here
    identity_at_init=False, calibrate=calibrate,
))
