"""GraLoRA, from "GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient Fine-Tuning"
(Jung et al., 2025).

The 2-D weight view ``W (out, fan_in)`` is split into ``k x k`` blocks, and each block gets its own
low-rank pair of rank ``r / k``::

    ΔW = s [ B_ij A_ij ]_{i,j=1..k},    A_ij (r/k, fan_in_j),  B_ij (out_i, r/k),  s = alpha / (r + hybrid_r)

so ``ΔW`` has rank up to ``k r`` from ``r (fan_in + out)`` parameters per layer, LoRA's count at rank
``r``. The pairs are held as two tensors of LoRA's shapes, ``A (r, fan_in)`` and ``B (out, r)``: ``A_ij``
is the ``i``-th chunk of ``r / k`` rows of ``A`` restricted to input block ``j``, ``B_ij`` the ``j``-th
chunk of ``r / k`` columns of ``B`` restricted to output block ``i`` (so every entry belongs to exactly
one pair). With ``hybrid_r > 0`` a plain LoRA pair ``B_h A_h`` of rank ``hybrid_r`` is added over the whole
matrix (the paper's Hybrid GraLoRA, under the same ``s``): ``(r + hybrid_r)(fan_in + out)`` parameters.

Blocks are as even as the sizes allow: where ``k`` does not divide ``out`` or ``fan_in`` the first blocks
take one row or column more (the paper assumes divisibility; the count is unchanged either way). Each
``A_ij`` starts Kaiming-uniform over its block's width (bound ``1 / sqrt(fan_in_j)``) and every ``B`` at
zero, so the model is unchanged at initialisation. The forward on Linear and GPT-2 ``Conv1D`` layers
runs block by block on the input (``fused_forward``) and never builds ``ΔW``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import BaseConfig, check, check_number, method_config
from ...core.errors import DeltatuneError
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import WeightDelta, weight_dtype
from ..lowrank.lora import DEFAULT_TARGETS
from ._blocks import check_padding


@method_config
class GraloraConfig(BaseConfig):
    """GraLoRA. ``r`` the total rank (``r / k`` per block), ``alpha`` the scale numerator, ``k`` the
    blocks per side, ``hybrid_r`` the rank of the optional plain LoRA part."""

    r: int = 32
    alpha: float = 64.0
    k: int = 2
    hybrid_r: int = 0

    def validate(self) -> None:
        check_number("r", self.r, kind=int, low=1)
        check_number("alpha", self.alpha, low=0, low_open=True)
        check_number("k", self.k, kind=int, low=1)
        check_number("hybrid_r", self.hybrid_r, kind=int, low=0)
        check(self.r % self.k == 0, f"r={self.r} must be divisible by k={self.k}: each of the k x k blocks has "
                                    f"rank r / k; pick r as a multiple of k")


def block_sizes(n: int, k: int) -> list[int]:
    """``n`` split into ``k`` parts as even as possible, the first ones larger."""
    return [n // k + (i < n % k) for i in range(k)]


class GraloraDelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, cfg: GraloraConfig, name: str):
        super().__init__()
        check_padding(base, kind, "gralora", name)
        self.bind(base)
        self.kind, self.k = kind, cfg.k
        out, fan_in = out_in(base, kind)
        if min(out, fan_in) < cfg.k:
            raise DeltatuneError(f"gralora: layer {name!r} ({out} x {fan_in}) cannot be split into k={cfg.k} "
                                 f"blocks per side: lower k, or exclude the layer")
        self.rows, self.cols = block_sizes(out, cfg.k), block_sizes(fan_in, cfg.k)
        self.scale = cfg.alpha / (cfg.r + cfg.hybrid_r)
        like = weight_dtype(base)
        self.gralora_A = nn.Parameter(torch.zeros(cfg.r, fan_in, **like))
        self.gralora_B = nn.Parameter(torch.zeros(out, cfg.r, **like))
        with torch.no_grad():
            for block in self.gralora_A.split(self.cols, dim=1):
                block.uniform_(-1 / math.sqrt(block.shape[1]), 1 / math.sqrt(block.shape[1]))
        self.hybrid_A = self.hybrid_B = None
        if cfg.hybrid_r:
            self.hybrid_A = nn.Parameter(torch.zeros(cfg.hybrid_r, fan_in, **like))
            self.hybrid_B = nn.Parameter(torch.zeros(out, cfg.hybrid_r, **like))
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.hybrid_A, a=math.sqrt(5))

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        """``s [B_ij A_ij]`` (plus ``s B_h A_h``), block by block: the paper's definition."""
        k = self.k
        A_rows = self.gralora_A.to(w2.dtype).chunk(k, dim=0)            # A_i. : (r/k, fan_in)
        B_rows = self.gralora_B.to(w2.dtype).split(self.rows, dim=0)    # B_i. : (out_i, r)
        delta = torch.cat([torch.cat([B_i.chunk(k, dim=1)[j] @ A_rows[i].split(self.cols, dim=1)[j]
                                      for j in range(k)], dim=1) for i, B_i in enumerate(B_rows)], dim=0)
        if self.hybrid_A is not None:
            delta = delta + self.hybrid_B.to(w2.dtype) @ self.hybrid_A.to(w2.dtype)
        return self.scale * delta

    def fused_forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """``y + s ΔW x`` on the input's blocks: ``z_j = A_.j x_j`` (all ``k`` rank chunks at once), then
        output block ``i`` is ``B_i. [z_1i; ...; z_ki]`` with ``z_ji`` the ``i``-th chunk of ``z_j``."""
        if self.kind not in ("linear", "conv1d_gpt2") or not (
                x.dtype == self.gralora_A.dtype or torch.is_autocast_enabled(x.device.type)):
            return None
        k = self.k
        z = torch.stack([F.linear(x_j, A_j) for x_j, A_j in zip(x.split(self.cols, dim=-1),
                                                                self.gralora_A.split(self.cols, dim=1))], dim=-2)
        u = z.unflatten(-1, (k, -1)).transpose(-3, -2).flatten(-2)       # [..., i, (j, r/k)]
        out = torch.cat([F.linear(u[..., i, :], B_i) for i, B_i in enumerate(self.gralora_B.split(self.rows))], -1)
        if self.hybrid_A is not None:
            out = out + F.linear(F.linear(x, self.hybrid_A), self.hybrid_B)
        return base(x) + self.scale * out


def make_delta(base: nn.Module, kind: str, cfg: GraloraConfig, name: str, loading: bool = False,
               shared: None = None) -> GraloraDelta:
    return GraloraDelta(base, kind, cfg, name)


def expected_parameters(base: nn.Module, kind: str, cfg: GraloraConfig, name: str) -> int:
    """``(r + hybrid_r)(fan_in + out)`` per layer: LoRA's count at rank ``r`` (plus the hybrid pair)."""
    out, fan_in = out_in(base, kind)
    return (cfg.r + cfg.hybrid_r) * (fan_in + out)


GRALORA = register(Method(
    name="gralora", config_cls=GraloraConfig,
    paper="GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient Fine-Tuning",
    hook="weight", kinds=("linear", "conv", "conv1d_gpt2"), make_delta=make_delta,
    expected_parameters=expected_parameters, default_targets=DEFAULT_TARGETS,
    default_lr=1e-3,    # BBC sweep (docs/results/README.md): only 1e-3 of 1e-3 / 3e-3 / 1e-2 beats the probe
    variants=[{"k": 4}, {"hybrid_r": 8}]))
