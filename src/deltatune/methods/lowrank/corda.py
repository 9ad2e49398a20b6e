"""CorDA, from "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models" (Yang et
al., 2024).

LoRA's factors start from a decomposition of the frozen weight oriented by the context of a few
data samples. For each adapted layer, with ``X`` the layer's inputs on those samples (one row per
token; a convolution's receptive-field patches) and ``C = X^T X`` their covariance::

    W C = U S V^T          (SVD, on the 2-D view W (out, fan_in))
    W   = U S (V^T C^-1) = sum_i  s_i u_i v^_i^T,       v^_i^T = v_i^T C^-1

``C`` gets a small ridge for invertibility, ``C + ridge * mean(diag C) I`` (the decomposition of
W is then exact for that matrix; the ridge only bends the orientation). ``mode`` picks the r
components that initialise the adapter, the rest staying in the frozen weight:

- ``"ipm"`` (instruction-previewed: samples from the fine-tuning task, the r LARGEST ``s_i``: the
  components that carry the task's main characteristics are trained);
- ``"kpm"`` (knowledge-preserved: samples of the knowledge to keep, e.g. question answering; the r
  SMALLEST ``s_i`` are trained and the components that matter on those samples stay frozen).

With ``s = alpha / r`` the factors are ``B0 = U_r S_r^(1/2) / sqrt(s)`` and
``A0 = S_r^(1/2) V^_r^T / sqrt(s)``, so ``s B0 A0`` is exactly the chosen components. The paper
trains ``B, A`` from these values on the residual ``W - s B0 A0``; here W is never modified: the
frozen ``B0, A0`` are kept and the layer computes ``W + s (B A - B0 A0)``, the same function, so
the model is unchanged at init. Trained: ``A, B``, ``r (fan_in + out)`` parameters per layer, as
LoRA; frozen: ``W``, ``B0``, ``A0``.

Data: ``dt.calibrate(model, batches)`` runs the model on the batches (no labels are needed; a
``loss_fn`` given to it is what runs the model, its value unused) and gathers ``C`` (the mean of
``x x^T`` over every input row, in float64) by a forward pre-hook on each adapted layer. ``B0, A0``
come from data, so they cannot be regenerated: they are persistent buffers, saved in the adapter
file, which therefore holds ``2 r (fan_in + out)`` numbers per layer, and a saved adapter reloads
without the calibration data. Until calibrated (or loaded) a layer is its frozen layer and a
training forward raises. ``deltatune train`` calibrates on a few training batches by itself, which
fits the default ``"ipm"``; for ``"kpm"`` calibrate on the knowledge samples before training.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import BaseConfig, check_choice, check_number, method_config
from ...core.engine import adapters, wrappers
from ...core.errors import DeltatuneError
from ...core.hooks import output_loss
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import frozen_2d
from ._factor_inits import FrozenStartLora, check_layer, normalised_svd
from .lora import DEFAULT_TARGETS

MODES = ("ipm", "kpm")
HINT = ("corda builds each layer's adapter from the covariance of its inputs on a few batches: call "
        "dt.calibrate(model, batches) before training (deltatune train does)")


@method_config
class CordaConfig(BaseConfig):
    """CorDA. ``r`` the rank, ``alpha`` the scale numerator (``s = alpha / r``), ``dropout`` on the
    adapter's input, ``mode`` "ipm" (train the r largest components) or "kpm" (the r smallest),
    ``ridge`` the covariance's regulariser, relative to its mean diagonal."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    mode: str = "ipm"
    ridge: float = 0.01     # the damping CorDA's reference implementation starts from

    def validate(self) -> None:
        check_number("r", self.r, kind=int, low=1, high=1 << 16)
        check_number("alpha", self.alpha, low=0, low_open=True)
        check_number("dropout", self.dropout, low=0, high=1, high_open=True)
        check_choice("mode", self.mode, MODES)
        check_number("ridge", self.ridge, low=0, low_open=True, high=1e6)


def make_delta(base: nn.Module, kind: str, cfg: CordaConfig, name: str, loading: bool = False,
               shared=None) -> FrozenStartLora:
    check_layer(base, kind, cfg.r, "corda", name)
    if kind == "conv" and base.weight.dim() == 5:
        raise DeltatuneError(f"corda gathers the input patches of Conv1d and Conv2d layers; {name} is a Conv3d: "
                             f"exclude it from targets")
    return FrozenStartLora(base, kind, cfg.r, cfg.alpha / cfg.r, cfg.dropout, "corda", persistent=True, hint=HINT)


def input_rows(x: torch.Tensor, base: nn.Module, kind: str) -> torch.Tensor:
    """The layer's input as rows of its 2-D weight view's fan_in: ``(n, fan_in)``."""
    if kind != "conv":
        return x.reshape(-1, x.shape[-1])
    if x.dim() == base.weight.dim() - 1:        # an unbatched input
        x = x.unsqueeze(0)
    k, d, s, pad = base.kernel_size, base.dilation, base.stride, base.padding
    if base.weight.dim() == 3:                  # Conv1d: a Conv2d of height 1
        x, k, d, s = x.unsqueeze(2), (1, *k), (1, *d), (1, *s)
        pad = pad if isinstance(pad, str) else (0, *pad)
    if pad == "same":                           # as torch pads it: the extra one on the right
        total = [di * (ki - 1) for di, ki in zip(d, k)]
        x = F.pad(x, [p for t in reversed(total) for p in (t // 2, t - t // 2)])
    cols = F.unfold(x, k, dilation=d, padding=0 if isinstance(pad, str) else pad, stride=s)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@torch.no_grad()
def components(w2: torch.Tensor, cov: torch.Tensor, r: int, mode: str, ridge: float, layer: str):
    """``(U_r S_r^(1/2), S_r^(1/2) V^_r^T)`` of the chosen r components of ``W = U S V^T C^-1``, float64."""
    scale = torch.diagonal(cov).mean()
    if not scale > 0:
        raise DeltatuneError(f"{layer} saw only zero inputs in the calibration batches: corda cannot orient its "
                             f"decomposition; calibrate on other data or exclude the layer")
    cov = cov + ridge * scale * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    U, S, Vh = normalised_svd(w2.double() @ cov)
    V_hat_t = torch.linalg.solve(cov, Vh.t()).t()        # V^T C^-1 (C symmetric)
    idx = slice(0, r) if mode == "ipm" else slice(S.shape[0] - r, S.shape[0])
    root = S[idx].sqrt()
    return U[:, idx] * root, root[:, None] * V_hat_t[idx]


def calibrate(model: nn.Module, name: str, batches: list[Any],
              loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> bool:
    """``dt.calibrate``'s hook: each layer's input covariance over ``batches`` (one forward each,
    in eval mode, without gradients), then its factors. Calibrating again restarts the adapter."""
    cfg = adapters(model)[name]
    layers = [(n, w) for n, w in wrappers(model) if name in w.deltas]
    merged = [n for n, w in layers if name in w.merged]
    if merged:
        raise DeltatuneError(f"adapter {name!r} is merged into {merged[0]}; dt.unmerge(model) before dt.calibrate")
    for _, w in layers:     # the frozen function while the inputs are gathered
        w.deltas[name].clear()
    sums = {n: torch.zeros(out_in(w.base, w.kind)[1], out_in(w.base, w.kind)[1], dtype=torch.float64,
                           device=w.base.weight.device) for n, w in layers}
    rows = dict.fromkeys(sums, 0)

    def gather(n: str, w: nn.Module):
        def hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                raise DeltatuneError(f"{n} was called without its input as the first positional argument")
            x = input_rows(args[0].detach(), w.base, w.kind).double()
            sums[n].add_(x.t() @ x)
            rows[n] += x.shape[0]
        return hook

    run = (lambda m, b: m(**b) if isinstance(b, dict) else m(b)) if loss_fn is output_loss else loss_fn
    handles = [w.register_forward_pre_hook(gather(n, w)) for n, w in layers]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                run(model, batch)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    for n, w in layers:
        if rows[n] == 0:
            raise DeltatuneError(f"{n} was not called by the model on the calibration batches: exclude it from "
                                 f"targets")
        B, A = components(frozen_2d(w.base, w.kind), sums[n] / rows[n], cfg.r, cfg.mode, cfg.ridge, n)
        delta = w.deltas[name]
        root = math.sqrt(delta.scale)
        delta.start(B / root, A / root)
    return True


def expected_parameters(base: nn.Module, kind: str, cfg: CordaConfig, name: str) -> int:
    """``r (fan_in + out)`` per layer: A and B."""
    out, fan_in = out_in(base, kind)
    return cfg.r * (fan_in + out)


CORDA = register(Method(
    name="corda", config_cls=CordaConfig,
    paper="CorDA: Context-Oriented Decomposition Adaptation of Large Language Models",
    hook="weight", kinds=("linear", "conv", "conv1d_gpt2"), make_delta=make_delta,
    expected_parameters=expected_parameters, default_targets=DEFAULT_TARGETS,
    default_lr=1e-3,    # swept on BBC: 96.40 % at 1e-3 vs 96.17 % at LoRA's 3e-3, 92.79 % at 1e-2
    variants=[{"mode": "kpm"}], calibrate=calibrate,
))
