"""LoRA's initialisations (``LoraConfig.init``): from nothing, from the frozen weight, or from data.

Each sets the factors of one layer's update ``s B A`` on its 2-D weight view ``W (out, fan_in)``,
``A (r, fan_in)``, ``B (out, r)``:

- ``default`` (LoRA: Low-Rank Adaptation of Large Language Models): A Kaiming-uniform, B zero,
  so the model is unchanged; an Embedding gets A zero and B normal, so its lookups train B.
- ``gaussian``: A normal with std 1/r, B zero.
- ``pissa`` (PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language
  Models): with ``W = U S V^T``, ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T`` over the top r
  singular triplets, each divided by ``sqrt(s)`` so that ``s B A`` is W's principal part.
- ``milora`` (MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM
  Finetuning): the same over the r smallest triplets.
- ``lora_ga`` (LoRA-GA: Low-Rank Adaptation with Gradient Approximation): from data. ``G`` is
  ``dL/dW`` averaged over a few batches (``dt.calibrate``), ``G = U S V^T``;
  ``A = c V_{1..r}^T``, ``B = c U_{r+1..2r}`` with the paper's stable scale
  ``c = out^(1/4) / sqrt(gamma)`` (``lora_ga_gamma``, 16). A first SGD step at rate ``lr`` then
  changes the weight by ``-lr s^2 (B B^T G + G A^T A) = -lr s^2 c^2 G_2r`` (to first order in
  ``lr``): the best rank-2r approximation of full fine-tuning's step ``-lr G``, where default
  LoRA's ``-lr s^2 G A^T A`` sees G only through A's random r-dimensional row space. The layer
  needs ``2r <= min(out, fan_in)``.

The last three start with ``B A != 0``; their papers train on the residual ``W - s B0 A0``. We
keep W untouched and hold the initial factors ``B0, A0`` as frozen buffers instead:
``W + s (B A - B0 A0)`` is the same function with the same gradients, the base model is never
modified, and the buffers are saved in the adapter file (LoRA-GA's come from data and could not
be regenerated), so a saved adapter reloads without calibration data.

Until ``dt.calibrate`` has run, a ``lora_ga`` layer is its frozen layer (all four factors zero),
and a forward in training mode with gradients raises: its factors would get no gradient, and
training would silently do nothing. ``deltatune train`` calibrates on a few training batches
by itself; a loop of one's own calls ``dt.calibrate(model, batches)`` before its first step.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from ...core.engine import adapters, wrappers
from ...core.errors import DeltatuneError
from ...core.layers import out_in, to_2d

INITS = ("default", "gaussian", "pissa", "milora", "lora_ga")
RESIDUAL_INITS = ("pissa", "milora", "lora_ga")     # B A != 0 at init: frozen B0, A0 buffers
LORA_GA_GAMMA = 16.0


def check_rank(base: nn.Module, kind: str, r: int, init: str, layer: str | None = None) -> None:
    """Refuse, before anything is allocated, a rank the layer cannot use: ``B A`` has rank at most
    ``min(out, fan_in)``, so a larger ``r`` only adds parameters (and a huge one, e.g. a typo'd
    ``r=1000000000``, would try to allocate terabytes); LoRA-GA takes 2r singular vectors."""
    if init == "lora_ga" and not isinstance(base.weight, nn.Parameter):
        raise DeltatuneError(f"init='lora_ga' starts from the gradient of the layer's float weight, and "
                             f"{layer or type(base).__name__} is stored quantised (dt.quantize), so it has none; "
                             f"use another init (default, gaussian, pissa) on a quantised base")
    out, fan_in = out_in(base, kind)
    if (2 * r if init == "lora_ga" else r) > min(out, fan_in):
        what = f"layer {layer} ({type(base).__name__}" if layer else f"this layer ({type(base).__name__}"
        limit = f"min(out, fan_in) = {min(out, fan_in)}" + (" halved (init='lora_ga' takes 2r singular vectors)"
                                                            if init == "lora_ga" else "")
        raise DeltatuneError(f"r={r} does not fit {what}, weight shape {tuple(base.weight.shape)}): r must be at "
                             f"most {limit}; lower r, or set rank_pattern for this layer")


def check_calibrated(delta: nn.Module) -> None:
    """Called by a ``lora_ga`` layer's training forward until its ``A0`` is set (by calibration
    or by a loaded file): untrained factors that are all zero would get no gradient at all."""
    delta.needs_data = not bool(delta.A0.any())
    if delta.needs_data:
        raise DeltatuneError("init='lora_ga' starts from the gradient on a few batches: call "
                             "dt.calibrate(model, batches) before training (deltatune train does)")


@torch.no_grad()
def initialise(delta: nn.Module, base: nn.Module, init: str) -> None:
    """Set ``delta``'s factors for the data-free inits; ``lora_ga`` stays zero until calibrated."""
    if init == "default":
        if delta.kind == "embedding":
            nn.init.normal_(delta.lora_B)
        else:
            nn.init.kaiming_uniform_(delta.lora_A, a=math.sqrt(5))
    elif init == "gaussian":
        nn.init.normal_(delta.lora_A, std=1.0 / delta.r)
    elif init in ("pissa", "milora"):
        U, S, Vh = torch.linalg.svd(to_2d(base.weight, delta.kind).double(), full_matrices=False)
        idx = slice(0, delta.r) if init == "pissa" else slice(S.shape[0] - delta.r, S.shape[0])
        root = S[idx].sqrt() / math.sqrt(delta.scale)
        set_residual(delta, U[:, idx] * root, root[:, None] * Vh[idx])


@torch.no_grad()
def set_residual(delta: nn.Module, B: torch.Tensor, A: torch.Tensor) -> None:
    """Start training at ``B, A`` on the residual: the frozen ``B0, A0`` are the same values."""
    for factor, value in ((delta.lora_B, B), (delta.B0, B), (delta.lora_A, A), (delta.A0, A)):
        factor.copy_(value)


@torch.no_grad()
def init_from_gradient(delta: nn.Module, gradient_2d: torch.Tensor, gamma: float) -> None:
    """LoRA-GA on one layer from its averaged weight gradient (2-D view ``(out, fan_in)``)."""
    U, _, Vh = torch.linalg.svd(gradient_2d.double(), full_matrices=False)
    r = delta.r
    c = gradient_2d.shape[0] ** 0.25 / math.sqrt(gamma)
    set_residual(delta, c * U[:, r:2 * r], c * Vh[:r])
    delta.needs_data = False


def mean_weight_gradients(model: nn.Module, bases: list[nn.Module], names: list[str], batches: list[Any],
                          loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> list[torch.Tensor]:
    """``dL/dW`` of each base layer's weight, averaged over ``batches`` (``mean_gradients``); the
    weights require gradients only meanwhile."""
    weights = [b.weight for b in bases]
    for n, w in zip(names, weights):
        if not w.is_floating_point():
            raise DeltatuneError(f"init='lora_ga' needs the gradient of {n}'s weight, stored as {w.dtype}; "
                                 f"use another init for a quantised layer")
    was_required = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        return mean_gradients(model, weights, names, batches, loss_fn)
    finally:
        for w, required in zip(weights, was_required):
            w.requires_grad_(required)


def mean_gradients(model: nn.Module, tensors: list[torch.Tensor], names: list[str], batches: list[Any],
                   loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> list[torch.Tensor]:
    """``dL/dt`` of each tensor (requiring gradients) averaged over ``batches``: one backward per
    batch for all at once. ``torch.autograd.grad`` returns the gradients without writing any
    ``.grad``; every module runs in eval mode (no dropout noise, BatchNorm statistics untouched)
    and gets its own mode back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    sums = [torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors]
    try:
        model.eval()
        for i, batch in enumerate(batches):
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad):
                    raise DeltatuneError(f"calibration batch {i}: the loss must be a scalar tensor that depends on "
                                         f"the model's weights, got {type(loss).__name__} {getattr(loss, 'shape', '')}")
                if not torch.isfinite(loss):
                    raise DeltatuneError(f"calibration batch {i}: the loss is {float(loss.detach())}; check its labels")
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for n, total, g in zip(names, sums, grads):
                if g is None:
                    raise DeltatuneError(f"{n} got no gradient from the calibration loss (it does not take part in "
                                         f"computing it): exclude it from targets")
                total += g
    finally:
        for m, training in modes:
            m.training = training
    return [total / len(batches) for total in sums]


def calibrate(model: nn.Module, name: str, batches: list[Any],
              loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> bool:
    """``dt.calibrate``'s hook: LoRA-GA's gradient estimate and initialisation for every layer of
    adapter ``name``; False (no data used) for the other inits. Calibrating again restarts the
    adapter from the new estimate (its layers back to the frozen function)."""
    cfg = adapters(model)[name]
    if cfg.init != "lora_ga":
        return False
    layers = [(n, w) for n, w in wrappers(model)
              if name in w.deltas and getattr(w.deltas[name], "init", None) == "lora_ga"]
    merged = [n for n, w in layers if name in w.merged]
    if merged:
        raise DeltatuneError(f"adapter {name!r} is merged into {merged[0]}; dt.unmerge(model) before dt.calibrate")
    gradients = mean_weight_gradients(model, [w.base for _, w in layers], [n for n, _ in layers], batches, loss_fn)
    for (_, w), g in zip(layers, gradients):
        init_from_gradient(w.deltas[name], to_2d(g, w.kind), cfg.lora_ga_gamma)
    return True
