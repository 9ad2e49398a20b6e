"""VeRA, from "VeRA: Vector-based Random Matrix Adaptation" (Kopiczko, Blankevoort and Asano, 2024).

One pair of frozen random matrices is shared by every adapted layer, and each layer trains only
two scaling vectors::

    h = W x + Λ_b B Λ_d A x,        ΔW = diag(b) B diag(d) A

with ``A`` ``(r, fan_in)`` and ``B`` ``(out, r)`` drawn once (Kaiming-uniform, as the paper) from
``seed`` and never trained, ``d`` ``(r,)`` starting at ``d_initial`` (0.1, the paper's value) and
``b`` ``(out,)`` at zero, so the model is unchanged at initialisation. Parameter count per
layer: ``r + out``. Because ``b`` scales the output and ``d`` the rank, ``r`` can be far larger
than LoRA's (256 in the paper) at a fraction of LoRA's parameters.

Adapter-level state: the matrices are regenerated from ``seed`` (stored in the config), so the
adapter file holds only the vectors. Layers of one adapter with the same ``fan_in`` share the
very same ``A`` tensor, and those with the same ``out`` the same ``B`` (one random pair per
layer shape, rather than slices of one pair sized to the largest layer: the same role, and no
pass over every target is needed to size it); they are buffers that are not saved.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from ...core.config import BaseConfig, check_number, method_config
from ...core.layers import out_in, to_2d
from ...core.registry import Method, register
from ...core.wrapper import Delta
from .lora import DEFAULT_TARGETS

# (seed, which, shape, dtype, device) -> the shared random matrix; weak, so a deleted adapter
# frees its matrices with its last layer
_SHARED: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()


@method_config
class VeraConfig(BaseConfig):
    """VeRA. ``r`` the rank of the shared random matrices, ``d_initial`` the start value of the
    rank-wise scale ``d``, ``seed`` the seed the matrices are regenerated from."""

    r: int = 256
    d_initial: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        check_number("r", self.r, kind=int, low=1, high=1 << 16)
        check_number("d_initial", self.d_initial)
        check_number("seed", self.seed, kind=int, low=0, high=2 ** 63 - 1)


def shared_matrix(seed: int, which: str, rows: int, cols: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """The frozen random ``A`` (``which="A"``, ``(r, fan_in)``) or ``B`` (``(out, r)``) of an
    adapter: Kaiming-uniform with a = sqrt(5) (bound ``1 / sqrt(cols)``), drawn from a generator
    seeded by ``(seed, which, shape)``, so it is the same tensor for every layer of that shape and
    the same numbers in every process."""
    key = (seed, which, rows, cols, dtype, str(device))
    cached = _SHARED.get(key)
    if cached is not None:
        return cached
    g = torch.Generator().manual_seed(hash_seed(seed, which, rows, cols))
    bound = 1.0 / math.sqrt(cols)
    matrix = ((torch.rand(rows, cols, generator=g, dtype=torch.float64) * 2 - 1) * bound).to(dtype=dtype,
                                                                                              device=device)
    _SHARED[key] = matrix
    return matrix


def hash_seed(seed: int, which: str, rows: int, cols: int) -> int:
    import hashlib
    digest = hashlib.sha256(f"deltatune-vera:{seed}:{which}:{rows}x{cols}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class VeraDelta(Delta):
    def __init__(self, base: nn.Module, kind: str, cfg: VeraConfig):
        super().__init__()
        out, fan_in = out_in(base, kind)
        w = base.weight
        self.kind = kind
        self.register_buffer("vera_A", shared_matrix(cfg.seed, "A", cfg.r, fan_in, w.dtype, w.device),
                             persistent=False)
        self.register_buffer("vera_B", shared_matrix(cfg.seed, "B", out, cfg.r, w.dtype, w.device),
                             persistent=False)
        self.vera_d = nn.Parameter(torch.full((cfg.r,), float(cfg.d_initial), dtype=w.dtype, device=w.device))
        self.vera_b = nn.Parameter(torch.zeros(out, dtype=w.dtype, device=w.device))

    def forward(self, x, y, base):
        return y + ((x @ self.vera_A.t()) * self.vera_d) @ self.vera_B.t() * self.vera_b

    def delta_2d(self) -> torch.Tensor:
        """``ΔW = diag(b) B diag(d) A`` on the 2-D ``(out, fan_in)`` view, in float64."""
        return (self.vera_b.double()[:, None] * self.vera_B.double()) @ (self.vera_d.double()[:, None]
                                                                          * self.vera_A.double())

    def merge(self, w2, b):
        return w2 + self.delta_2d(), b


def make_delta(base: nn.Module, kind: str, cfg: VeraConfig, name: str, loading: bool = False) -> VeraDelta:
    to_2d(base.weight, kind)        # a layer kind without a 2-D view fails here, by name
    return VeraDelta(base, kind, cfg)


def expected_parameters(base: nn.Module, kind: str, cfg: VeraConfig, name: str) -> int:
    """``r + out`` per layer: the two scaling vectors."""
    out, _ = out_in(base, kind)
    return cfg.r + out


VERA = register(Method(
    name="vera",
    config_cls=VeraConfig,
    paper="VeRA: Vector-based Random Matrix Adaptation",
    hook="weight",
    kinds=("linear", "conv1d_gpt2"),
    make_delta=make_delta,
    expected_parameters=expected_parameters,
    default_targets=DEFAULT_TARGETS,
    default_lr=1e-2,    # the paper's rates for RoBERTa are 4e-3..1e-2 on the vectors; not yet swept here
))
