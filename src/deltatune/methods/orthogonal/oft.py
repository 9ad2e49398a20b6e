"""OFT, from "Controlling Text-to-Image Diffusion by Orthogonal Finetuning" (Qiu, Liu et al., 2023).

The paper rotates all neurons of a frozen layer by one orthogonal matrix, which keeps the angles
between them (their hyperspherical energy): ``W' = R W`` with the neurons as the columns of
``W (d, n)``. The 2-D view ``W2 (out, fan_in)`` holds the neurons as its rows, so the same rotation
acts on the input side::

    W2' = W2 R,        ΔW = W2 (R - I)

(the paper's ``R`` is this ``Rᵀ``; PEFT rotates the same side, feeding ``x Rᵀ`` to the frozen
layer, and the same ``Q`` gives the same ``R``, so adapters of the two compare value for value).
The output side is left alone because the paper's invariant is about neurons: each keeps its norm
and every pair its angle.

``R = diag(R_1, ..., R_r)`` is block-diagonal, each block the Cayley transform
``R_i = (I + Q_i)(I - Q_i)^-1`` of a skew-symmetric ``Q_i`` (``b x b``), orthogonal for any ``Q_i``.
Trained: the strict upper triangles of the ``Q_i`` (``oft_Q``), zero at initialisation, so ``R = I``
and the model is unchanged at init; frozen: the layer. ``R`` is recomputed from ``Q`` in every
forward (exactly: a solve, not PEFT's default Neumann-series approximation), so the file holds
only ``Q``.

Blocks: ``block_size`` ``b`` or ``r`` blocks per layer (``b = fan_in / r``, which must divide), one
of the two, as in PEFT's OFTConfig. A ``block_size`` that does not divide ``fan_in`` leaves one
last, smaller block of the remaining ``fan_in mod b`` features (a layer narrower than ``b`` is one
block), so the default serves every layer, a 3 x 3 convolution over 3 channels (27 features)
included, where PEFT would silently pick another block size; ``r`` and ``block_share`` need equal
blocks and refuse a layer they cannot split, naming it and valid values. ``block_share``: one
``Q`` for every block. COFT (``coft``, the paper's constrained variant, ``‖R - I‖`` kept small):
after each optimizer step every block's ``Q_i`` is projected into the ball ``‖Q_i‖_F <= eps /
sqrt(blocks)`` (the ``on_step`` hook). A convolution is rotated on its 2-D view,
``fan_in = in_channels / groups x kernel``.

Parameters per layer: ``⌊fan_in / b⌋ b(b-1)/2 + c(c-1)/2`` with ``c = fan_in mod b``; ``b(b-1)/2``
with block_share.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...core.config import BaseConfig, check, check_number, method_config
from ...core.engine import adapters, wrappers
from ...core.errors import DeltatuneError
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import WeightDelta, weight_dtype
from ..lowrank.lora import DEFAULT_TARGETS
from ._rotation import Blocks, cayley_minus_identity, check_conv, compute_dtype, divisors, n_skew, times_blocks


@method_config
class OFTConfig(BaseConfig):
    """OFT. ``r``: blocks per layer, or ``block_size``: features per block (give one, the other 0);
    ``block_share``: one rotation for all blocks; ``coft``/``eps``: the constrained variant and its
    radius."""

    r: int = 0
    block_size: int = 32
    block_share: bool = False
    coft: bool = False
    eps: float = 6e-5

    def validate(self) -> None:
        check_number("r", self.r, kind=int, low=0)
        check_number("block_size", self.block_size, kind=int, low=0)
        check((self.r == 0) != (self.block_size == 0),
              f"give either r (blocks per layer) or block_size (features per block), the other 0: got r={self.r}, "
              f"block_size={self.block_size}; e.g. dt.config('oft', r=4, block_size=0)")
        check_number("eps", self.eps, low=0, low_open=True)


def _nearest(values: list[int], target: int) -> str:
    return ", ".join(map(str, sorted(sorted(values, key=lambda v: abs(v - target))[:4])))


def layout(base: nn.Module, kind: str, cfg: OFTConfig, name: str) -> Blocks:
    """The layer's blocks; a request the layer cannot satisfy fails here, naming it and a fix."""
    _, fan_in = out_in(base, kind)
    if cfg.r:
        if fan_in % cfg.r:
            raise DeltatuneError(f"oft on {name}: r={cfg.r} blocks do not divide its {fan_in} input features; use "
                                 f"r among {_nearest(divisors(fan_in), cfg.r)}, or block_size=... with r=0")
        return Blocks(fan_in // cfg.r, cfg.r)
    blocks = Blocks.of(fan_in, cfg.block_size)
    if cfg.block_share and blocks.rest:
        raise DeltatuneError(f"oft on {name}: block_share needs block_size to divide its {fan_in} input features, "
                             f"and {cfg.block_size} does not; use block_size among "
                             f"{_nearest(divisors(fan_in), cfg.block_size)}")
    return blocks


class OFTDelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, cfg: OFTConfig, name: str):
        super().__init__()
        check_conv(base, kind, "oft", name)
        self.kind = kind
        self.bind(base)
        self.blocks = layout(base, kind, cfg, name)
        like = weight_dtype(base)
        count = 1 if cfg.block_share else self.blocks.count
        self.oft_Q = nn.Parameter(torch.zeros(count, n_skew(self.blocks.size), **like))
        rest = n_skew(self.blocks.rest)
        self.oft_Q_rest = nn.Parameter(torch.zeros(rest, **like)) if rest else None
        self.eps = cfg.eps if cfg.coft else None

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        dtype, b = compute_dtype(w2), self.blocks
        full = cayley_minus_identity(self.oft_Q.to(dtype), b.size).expand(b.count, b.size, b.size)
        rest = None if self.oft_Q_rest is None else cayley_minus_identity(self.oft_Q_rest.to(dtype), b.rest)
        return times_blocks(w2.to(dtype), b, full, rest).to(w2.dtype)

    @torch.no_grad()
    def project(self) -> None:
        """COFT: every block's ``‖Q_i‖_F`` at most ``eps / sqrt(blocks)`` (``‖skew(v)‖_F = √2 ‖v‖``)."""
        vectors = [self.oft_Q] + ([self.oft_Q_rest[None]] if self.oft_Q_rest is not None else [])
        radius = self.eps / math.sqrt(sum(v.shape[0] for v in vectors))
        for v in vectors:
            v.mul_((radius / (math.sqrt(2) * v.norm(dim=-1, keepdim=True))).clamp(max=1))


def make_delta(base: nn.Module, kind: str, cfg: OFTConfig, name: str, loading: bool = False) -> OFTDelta:
    return OFTDelta(base, kind, cfg, name)


def expected_parameters(base: nn.Module, kind: str, cfg: OFTConfig, name: str) -> int:
    """``blocks x b(b-1)/2`` (one block with block_share), plus ``c(c-1)/2`` for a last block of c."""
    b = layout(base, kind, cfg, name)
    return (1 if cfg.block_share else b.count) * n_skew(b.size) + n_skew(b.rest)


def on_step(model: nn.Module, name: str, step: int) -> None:
    """COFT's projection after each optimizer step (a frozen adapter is left as it is)."""
    if not adapters(model)[name].coft:
        return
    for _, layer in wrappers(model):
        delta = layer.deltas[name] if name in layer.deltas else None
        if delta is not None and delta.oft_Q.requires_grad:
            delta.project()


OFT = register(Method(
    name="oft", config_cls=OFTConfig, paper="Controlling Text-to-Image Diffusion by Orthogonal Finetuning",
    hook="weight", kinds=("linear", "conv", "conv1d_gpt2"), make_delta=make_delta,
    expected_parameters=expected_parameters, default_targets=DEFAULT_TARGETS, on_step=on_step,
    variants=[{"r": 2, "block_size": 0}, {"block_share": True, "block_size": 8}, {"coft": True, "eps": 0.05}],
    # the paper tunes diffusion models; HRA's GLUE recipe (9e-4..4e-3) trains the same kind of rotation
    default_lr=3e-3,    # not yet swept here
))
