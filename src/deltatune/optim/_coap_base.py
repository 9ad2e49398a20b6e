"""Plumbing shared by the COAP optimizers (``coap.py``): which parameters are projected and how
(``ParamLayout``), construction-time validation, the projection schedule, 8-bit moment storage,
state accounting, and a ``load_state_dict`` that keeps state dtypes.

Layouts: a 2-D parameter (embeddings included) is a ``"matrix"`` projected on its smaller side
with rank ``rank`` (an int, or a fraction of the smaller dimension, rounded up); a 4-D one (a
Conv2d kernel) is ``"tucker"``, projected on its output and input channel modes with
``conv_rank`` (int, or fraction of each channel count); any other (1-D, 3-D, >= 5-D) is
``"dense"`` and gets the unprojected optimizer: a documented fallback, not an error. So is a
matrix whose smaller side is under ``MIN_PROJECTED_SIDE`` (a classifier head ``classes x
hidden``, a token-type embedding): its states are a negligible share, and a rank-1 update of a
freshly initialised head would hold fine-tuning back.

Schedule, with ``s`` the steps already taken by a parameter: at ``s = 0`` the projection comes
from the gradient (randomised SVD / HOSVD); when ``s`` is a positive multiple of
``update_interval`` (``T``) it takes one correlation-aware step, except when ``s`` is a multiple
of ``T * reproject_factor`` where it is re-projected; the moments are carried into the new basis
either way (``_coap_projector``). All randomness is seeded by the parameter's position and the
step, so a resumed run repeats an uninterrupted one exactly.

8-bit states (``state_bits=8``): moments of at least ``MIN_8BIT_NUMEL`` elements are stored by
``_state8bit`` (block 256); smaller ones and the projections stay float32 (a quantised basis
would no longer be orthonormal, and it is a small share of the bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..core.errors import DeltatuneError
from . import _coap_projector as cp
from ._projection import check_positive_int, optimizer_state_bytes, project, project_back, projection_side, resolve_rank
from ._state8bit import QuantizedState, quantize_state, quantized_nbytes

MIN_8BIT_NUMEL = 4096
MIN_PROJECTED_SIDE = 16
BLOCK = 256

# a transform of a low-rank state into the current basis: (tensor, is_second_moment) -> tensor
Carry = Callable[[torch.Tensor, bool], torch.Tensor]


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter is optimised: ``kind`` ``"matrix" | "tucker" | "dense"``, the matrix
    ``side`` (``"left" | "right"``, else ``""``), its ``ranks`` and the shape of its states."""

    kind: str
    side: str
    ranks: tuple[int, ...]
    low_shape: tuple[int, ...]


def conv_ranks(name: str, spec: int | float, shape: tuple[int, ...]) -> tuple[int, int]:
    """The Tucker ranks of the output and input channel modes of a ``shape`` kernel."""
    out, inp = int(shape[0]), int(shape[1])
    if isinstance(spec, float) and not isinstance(spec, bool):
        if not 0.0 < spec <= 1.0:
            raise DeltatuneError(f"a fractional conv_rank must be in (0, 1], got {spec!r}")
        return max(1, math.ceil(spec * out)), max(1, math.ceil(spec * inp))
    if isinstance(spec, bool) or not isinstance(spec, int) or spec < 1:
        raise DeltatuneError(f"conv_rank must be an int >= 1 or a fraction in (0, 1], got {spec!r}")
    if spec > min(out, inp):
        raise DeltatuneError(f"conv_rank {spec} is too large for parameter {name!r} of shape {tuple(shape)} "
                             f"({out} output and {inp} input channels); the largest valid rank is {min(out, inp)}")
    return spec, spec


def param_layout(name: str, shape: tuple[int, ...], group: dict[str, Any]) -> ParamLayout:
    if len(shape) == 2 and min(shape) >= MIN_PROJECTED_SIDE:
        r = resolve_rank(name, group["rank"], shape)
        side = projection_side(shape)
        low = (r, shape[1]) if side == "left" else (shape[0], r)
        return ParamLayout("matrix", side, (r,), low)
    if len(shape) == 4 and min(shape) > 0:
        ranks = conv_ranks(name, group["conv_rank"], shape)
        return ParamLayout("tucker", "", ranks, (ranks[0], ranks[1], shape[2], shape[3]))
    return ParamLayout("dense", "", (), tuple(shape))


class CoapOptimizer(torch.optim.Optimizer):
    """Base of ``CoapAdamW`` and ``CoapAdafactor``; subclasses write ``step`` with the helpers
    here and say which moments they keep (``_moment_numels``, ``_first_moment``, ``_carry``)."""

    def __init__(self, params, defaults: dict[str, Any], state_bits: int):
        if state_bits not in (8, 32):
            raise DeltatuneError(f"state_bits must be 8 or 32, got {state_bits!r}")
        self.state_bits = state_bits
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- validation

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        for key in ("lr", "weight_decay"):
            if not isinstance(group[key], (int, float)) or group[key] < 0:
                raise DeltatuneError(f"{key} must be a number >= 0, got {group[key]!r} (parameter group {gi})")
        check_positive_int("update_interval", group["update_interval"])
        check_positive_int("reproject_factor", group["reproject_factor"])
        if not isinstance(group["proj_lr"], (int, float)) or group["proj_lr"] < 0:
            raise DeltatuneError(f"proj_lr must be a number >= 0, got {group['proj_lr']!r}")
        self._check_group(group)
        for name, p in self._named(group, gi):
            if not p.is_floating_point() or p.is_complex():
                raise DeltatuneError(f"parameter {name!r} has dtype {p.dtype}; COAP optimises real floating-point "
                                     "parameters only")
            param_layout(name, tuple(p.shape), group)  # raises on a rank the parameter cannot take

    def _check_group(self, group: dict[str, Any]) -> None:
        """Subclass checks of its own hyperparameters."""

    @staticmethod
    def _named(group: dict[str, Any], gi: int):
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            yield (names[i] if names else f"#{i} of group {gi}, shape {tuple(p.shape)}"), p

    def _layouts(self, group: dict[str, Any], gi: int) -> list[tuple[torch.Tensor, ParamLayout]]:
        return [(p, param_layout(n, tuple(p.shape), group)) for n, p in self._named(group, gi)]

    # ---------------------------------------------------------------- projections

    @staticmethod
    def _generator(seed: int, step: int) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + step)

    def _new_projection(self, a: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
        """The first projection of a canonical gradient ``a`` (an override point for tests)."""
        return cp.initial_projection(a, rank, generator)

    def _projected_grad(self, p: torch.Tensor, group: dict[str, Any], layout: ParamLayout, seed: int) -> torch.Tensor:
        """``p``'s gradient in its state space (float32), after advancing the projection."""
        grad = p.grad
        if grad.is_sparse:
            raise DeltatuneError("COAP does not take sparse gradients (nn.Embedding(sparse=True)); use dense ones")
        g = grad if grad.dtype == torch.float32 else grad.float()
        state = self.state[p]
        if layout.kind == "dense":
            state.setdefault("step", 0)
            return g
        s = state.get("step")
        if s is None:
            state["step"] = 0
            gen = self._generator(seed, 0)
            if layout.kind == "matrix":
                state["proj"] = self._new_projection(cp.canonical(g, layout.side), layout.ranks[0], gen)
            else:
                state["proj_out"], state["proj_in"] = cp.tucker_init(g, layout.ranks, gen)
        elif s % group["update_interval"] == 0:
            reproject = s % (group["update_interval"] * group["reproject_factor"]) == 0
            gen = self._generator(seed, s)
            if layout.kind == "matrix":
                old, a = state["proj"], cp.canonical(g, layout.side)
                if reproject:
                    new = cp.reproject(old, a, gen)
                else:
                    m = cp.canonical(self._first_moment(state, layout), layout.side)
                    new = cp.correlation_step(old, m, a, group["proj_lr"])
                c = old.T @ new
                self._carry(state, layout, lambda x, second: cp.carry_matrix(c, layout.side, x, second))
                state["proj"].copy_(new)
            else:
                old = cp.TuckerFactors(state["proj_out"], state["proj_in"])
                if reproject:
                    new = cp.tucker_reproject(g, old, gen)
                else:
                    new = cp.tucker_correlation_step(old, self._first_moment(state, layout), g, group["proj_lr"])
                self._carry(state, layout, lambda x, second: cp.carry_tucker(old, new, x, second))
                state["proj_out"], state["proj_in"] = new
        if layout.kind == "matrix":
            return project(g, state["proj"], layout.side)
        return cp.tucker_project(g, cp.TuckerFactors(state["proj_out"], state["proj_in"]))

    def _back(self, state: dict[str, Any], layout: ParamLayout, low: torch.Tensor) -> torch.Tensor:
        if layout.kind == "matrix":
            return project_back(low, state["proj"], layout.side)
        if layout.kind == "tucker":
            return cp.tucker_project_back(low, cp.TuckerFactors(state["proj_out"], state["proj_in"]))
        return low

    # ---------------------------------------------------------------- moments

    def _quantized(self, numel: int) -> bool:
        return self.state_bits == 8 and numel >= MIN_8BIT_NUMEL

    def _zeros(self, state: dict[str, Any], key: str, shape: tuple[int, ...], signed: bool, device) -> None:
        zeros = torch.zeros(shape, dtype=torch.float32, device=device)
        if self._quantized(zeros.numel()):
            q = quantize_state(zeros, signed=signed, block=BLOCK)
            state[key + "_codes"], state[key + "_scales"] = q.codes, q.scales
        else:
            state[key] = zeros

    @staticmethod
    def _read(state: dict[str, Any], key: str, shape: tuple[int, ...], signed: bool) -> torch.Tensor:
        """The moment ``key`` as float32: the stored tensor itself, or a dequantised copy."""
        if key in state:
            return state[key]
        return QuantizedState(state[key + "_codes"], state[key + "_scales"], torch.Size(shape), signed, BLOCK).dequantize()

    @staticmethod
    def _write(state: dict[str, Any], key: str, value: torch.Tensor, signed: bool) -> None:
        if key in state:
            if value is not state[key]:
                state[key].copy_(value)
            return
        QuantizedState(state[key + "_codes"], state[key + "_scales"], value.shape, signed, BLOCK).requantize_(value)

    def _moment_numels(self, layout: ParamLayout) -> list[tuple[int, bool]]:
        """``(numel, may be 8-bit)`` of each state tensor besides the projections."""
        raise NotImplementedError

    def _first_moment(self, state: dict[str, Any], layout: ParamLayout) -> torch.Tensor:
        raise NotImplementedError

    def _carry(self, state: dict[str, Any], layout: ParamLayout, carry: Carry) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------- accounting

    def state_bytes(self) -> int:
        """Bytes of every state tensor (moments, quantisation scales, projections)."""
        return optimizer_state_bytes(self)

    def planned_state_bytes(self) -> int:
        """What ``state_bytes`` will be once every trainable parameter has taken a step,
        computed from shapes alone (works on ``meta`` tensors)."""
        total = 0
        for gi, group in enumerate(self.param_groups):
            for p, layout in self._layouts(group, gi):
                if not p.requires_grad:
                    continue
                if layout.kind == "matrix":
                    total += 4 * min(p.shape) * layout.ranks[0]
                elif layout.kind == "tucker":
                    total += 4 * (p.shape[0] * layout.ranks[0] + p.shape[1] * layout.ranks[1])
                for numel, may8 in self._moment_numels(layout):
                    total += quantized_nbytes(numel, BLOCK) if may8 and self._quantized(numel) else 4 * numel
        return total

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts every loaded state tensor to its parameter's dtype; int8/uint8 codes and the
        # float32 projections of a bf16 parameter must keep theirs
        dtypes = {pid: {k: v.dtype for k, v in st.items() if isinstance(v, torch.Tensor)}
                  for pid, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(saved["params"], group["params"]):
                st = self.state.get(p)
                for k, dtype in dtypes.get(pid, {}).items():
                    if st is not None and st[k].dtype != dtype:
                        st[k] = st[k].to(dtype)
