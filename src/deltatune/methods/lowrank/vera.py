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
adapter file holds only the vectors. They live once per adapter in its adapter-level module
(``VeraBases``, see core.lifecycle): layers with the same ``fan_in`` read the very same ``A``, and
those with the same ``out`` the same ``B`` (one random pair per layer shape, rather than slices of
one pair sized to the largest layer: the same role, and no pass over every target is needed to
size it). They are buffers that are not saved, and move with the model.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from ...core.config import BaseConfig, check_number, method_config
from ...core.layers import out_in, to_2d
from ...core.registry import Method, register
from ...core.wrapper import Delta
from .lora import DEFAULT_TARGETS

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
    seeded by ``(seed, which, shape)``, so it is the same numbers in every process."""
    digest = hashlib.sha256(f"deltatune-vera:{seed}:{which}:{rows}x{cols}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    bound = 1.0 / math.sqrt(cols)
    return ((torch.rand(rows, cols, generator=g, dtype=torch.float64) * 2 - 1) * bound).to(dtype=dtype, device=device)


class VeraBases(nn.Module):
    """The adapter-level module: one regenerated (non-persistent) buffer per matrix shape."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def matrix(self, which: str, rows: int, cols: int, like: torch.Tensor) -> str:
        key = f"{which}_{rows}x{cols}"
        if key not in self._buffers:
            self.register_buffer(key, shared_matrix(self.seed, which, rows, cols, like.dtype, like.device),
                                 persistent=False)
        return key


class VeraDelta(Delta):
    def __init__(self, base: nn.Module, kind: str, cfg: VeraConfig, bases: VeraBases):
        super().__init__()
        out, fan_in = out_in(base, kind)
        w = base.weight
        self.kind = kind
        # a plain reference, not a submodule: the matrices belong to the adapter, listed once
        self.__dict__["bases"] = bases
        self.key_A = bases.matrix("A", cfg.r, fan_in, w)
        self.key_B = bases.matrix("B", out, cfg.r, w)
        self.vera_d = nn.Parameter(torch.full((cfg.r,), float(cfg.d_initial), dtype=w.dtype, device=w.device))
        self.vera_b = nn.Parameter(torch.zeros(out, dtype=w.dtype, device=w.device))

    @property
    def vera_A(self) -> torch.Tensor:
        return self.bases.get_buffer(self.key_A)

    @property
    def vera_B(self) -> torch.Tensor:
        return self.bases.get_buffer(self.key_B)

    def forward(self, x, y, base):
        return y + ((x @ self.vera_A.t()) * self.vera_d) @ self.vera_B.t() * self.vera_b

    def delta_2d(self) -> torch.Tensor:
        """``ΔW = diag(b) B diag(d) A`` on the 2-D ``(out, fan_in)`` view, in float64."""
        return (self.vera_b.double()[:, None] * self.vera_B.double()) @ (self.vera_d.double()[:, None]
                                                                          * self.vera_A.double())

    def merge(self, w2, b):
        return w2 + self.delta_2d(), b


def make_delta(base: nn.Module, kind: str, cfg: VeraConfig, name: str, loading: bool = False,
               shared: VeraBases | None = None) -> VeraDelta:
    to_2d(base.weight, kind)        # a layer kind without a 2-D view fails here, by name
    return VeraDelta(base, kind, cfg, shared)


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
    shared_state=lambda model, cfg: VeraBases(cfg.seed),
    default_lr=1e-2,    # the paper's rates for RoBERTa are 4e-3..1e-2 on the vectors; not yet swept here
))
