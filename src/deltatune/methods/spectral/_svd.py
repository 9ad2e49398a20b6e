"""What the spectral methods share: a reproducible decomposition of the frozen weight, and its rank.

Every method of this family starts from a decomposition of the frozen layer's 2-D weight view
``W (out, fan_in)`` (``core.weights.frozen_2d``: dequantised for a quantised layer). It is recomputed
at attach and again at load, never saved, so it must be the same numbers each time: it is computed
in float64 from ``W`` alone, and the SVD's one freedom, the sign of each singular pair ``(u_i, v_i)``,
is fixed by making the entry of largest magnitude of ``u_i`` positive (``v_i`` flips with it; the
first such entry on a tie). A subspace of exactly repeated singular values would leave its basis
free; pretrained weights do not have them, and a method that depends only on ``U_r S_r V_rᵀ`` is
unaffected anyway.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...core.errors import DeltatuneError
from ...core.layers import out_in
from ...core.weights import frozen_2d, weight_dtype

# the layer kinds whose operation is ``x Wᵀ``: a factored update ``B A`` can run as ``(x Aᵀ) Bᵀ``
MATMUL_KINDS = ("linear", "conv1d_gpt2")


@dataclasses.dataclass(frozen=True)
class Spectrum:
    """``W = U diag(S) Vh`` (thin SVD, float64, signs fixed): ``U (out, k)``, ``S (k,)`` descending,
    ``Vh (k, fan_in)``, with ``k = min(out, fan_in)``."""
    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def top(self, r: int) -> "Spectrum":
        return Spectrum(self.U[:, :r], self.S[:r], self.Vh[:r])


def spectrum(base: nn.Module, kind: str) -> Spectrum:
    """The frozen weight's SVD, the same numbers at every attach and load (see the module docstring)."""
    w = frozen_2d(base, kind).detach().double()
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    lead = U.abs().argmax(dim=0)
    signs = torch.where(U[lead, torch.arange(U.shape[1], device=U.device)] < 0, -1.0, 1.0).to(U)
    return Spectrum(U * signs, S, Vh * signs[:, None])


def rank_of(base: nn.Module, kind: str, r: int | None, name: str, method: str) -> int:
    """``r``, or every component (``k = min(out, fan_in)``) for ``r=None``; a rank the layer does
    not have raises, naming the layer and the fix (a larger ``r`` would only repeat components)."""
    out, fan_in = out_in(base, kind)
    k = min(out, fan_in)
    if r is None:
        return k
    if r > k:
        raise DeltatuneError(f"{method}: r={r} does not fit layer {name} (weight view {out} x {fan_in} has "
                             f"{k} components): lower r to at most {k}, set r=None for all of them, or "
                             f"exclude this layer")
    return r


def frozen(module: nn.Module, name: str, value: torch.Tensor, base: nn.Module) -> None:
    """A regenerated tensor as a non-persistent buffer in the layer's float dtype: not saved, it
    follows the model across ``.to(...)``."""
    module.register_buffer(name, value.to(**weight_dtype(base)), persistent=False)


def trained(value: torch.Tensor, base: nn.Module) -> nn.Parameter:
    """A trained tensor starting at ``value``, in the layer's float dtype."""
    return nn.Parameter(value.detach().to(**weight_dtype(base)).clone())
