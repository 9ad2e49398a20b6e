"""What the weight- and data-driven LoRA initialisations (``corda``, ``olora``, ``lora_sb``) share.

- ``FrozenStartLora``: a LoRA delta whose factors start at non-zero values ``B0, A0`` taken from the
  frozen weight or from data. Their papers train on the residual ``W - s B0 A0``; the base is kept
  untouched here instead, with ``B0, A0`` as frozen buffers: ``W + s (B A - B0 A0)`` is the same
  function with the same gradients (as LoRA's PiSSA, ``lora_init.py``). It is LoRA's delta, so
  every LoRA path (fused, grouped, mixed batches, convolutions, embeddings) serves it.
- deterministic decompositions: an SVD and a QR whose signs are fixed, so that factors rebuilt from
  the same matrix (a non-persistent buffer recomputed at load, a calibration rerun on resume) are
  the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.errors import DeltatuneError
from ...core.layers import check_groups
from .lora import LoraDelta
from .lora_init import check_rank


def check_layer(base: nn.Module, kind: str, r: int, method: str, layer: str) -> None:
    """Refuse at attach, by name, a layer the factors cannot be built for."""
    check_groups(base, kind, method)
    if kind == "conv" and base.padding_mode != "zeros":
        raise DeltatuneError(f"{method} supports zero-padded convolutions only; {layer} has padding_mode="
                             f"{base.padding_mode!r}: exclude it from targets")
    check_rank(base, kind, r, "default", layer)


class FrozenStartLora(LoraDelta):
    """LoRA trained from ``B0, A0``, held as frozen buffers (``persistent``: saved in the file, for
    factors that come from data; else recomputed from the frozen weight at attach and at load).
    ``needs_data``: the factors come from ``dt.calibrate``; until then (or a loaded file) the layer
    is its frozen layer, and a training forward raises ``hint``."""

    def __init__(self, base: nn.Module, kind: str, r: int, scale: float, dropout: float, method: str,
                 persistent: bool, hint: str | None = None):
        # loading=True: no initialiser runs; the method sets the factors (``start``)
        super().__init__(base, kind, r, scale, dropout, method, bias=False, loading=True)
        self.residual = True
        self.register_buffer("A0", torch.zeros_like(self.lora_A), persistent=persistent)
        self.register_buffer("B0", torch.zeros_like(self.lora_B), persistent=persistent)
        self.hint = hint
        self.needs_data = hint is not None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.needs_data and self.training and torch.is_grad_enabled():
            # all four factors zero: no gradient could reach A or B, and training would do nothing
            self.needs_data = not (self.A0.any() or self.lora_A.any() or self.lora_B.any())
            if self.needs_data:
                raise DeltatuneError(self.hint)
        return super().factors()

    @torch.no_grad()
    def start(self, B: torch.Tensor, A: torch.Tensor) -> None:
        """Set ``B0, A0`` and the trained ``B, A`` to the same values: the model is unchanged."""
        for factor, value in ((self.lora_B, B), (self.B0, B), (self.lora_A, A), (self.A0, A)):
            factor.copy_(value)
        self.needs_data = False

    @torch.no_grad()
    def clear(self) -> None:
        """Back to the frozen layer (before a calibration restarts the adapter)."""
        for factor in (self.lora_B, self.B0, self.lora_A, self.A0):
            factor.zero_()


def _column_signs(M: torch.Tensor) -> torch.Tensor:
    """+1 or -1 per column of ``M``: the sign that makes the column's largest-magnitude entry positive."""
    pick = M.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(M.gather(0, pick)).squeeze(0)
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def normalised_svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``M = U diag(S) Vh`` in float64, each pair ``(u_i, v_i)`` signed so that the
    largest-magnitude entry of ``u_i`` is positive (an SVD fixes each pair only up to a sign)."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    signs = _column_signs(U)
    return U * signs, S, Vh * signs[:, None]


def normalised_qr(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR ``M = Q R`` in float64 with ``diag(R) >= 0``: unique where M's leading columns are
    independent (Householder QR leaves each diagonal sign to the implementation)."""
    Q, R = torch.linalg.qr(M.double())
    d = torch.sign(torch.diagonal(R))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return Q * d, R * d[:, None]
