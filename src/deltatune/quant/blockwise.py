"""Block-wise quantised frozen Linear weights: NF4 and int8 (the QLoRA base).

From "QLoRA: Efficient Finetuning of Quantized LLMs" (Dettmers et al., 2023):

- **Block-wise absmax.** The weight, flattened row-major, is cut into blocks of ``B = 64``
  elements; each block keeps one float32 scale ``c = max |w|`` and stores ``w / c`` in ``[-1, 1]``
  as a code. Dequantised: ``w~ = c * level[code]``.
- **NF4 (4-bit NormalFloat).** The 16 levels are quantiles of the standard normal, normalised to
  ``[-1, 1]``, so that each level is equally likely for normally distributed weights (the paper's
  Eq. 4, ``q_i = (Q_X(i / (2^k + 1)) + Q_X((i + 1) / (2^k + 1))) / 2``, made asymmetric to hold an
  exact zero): 8 positive levels at the probabilities ``linspace(d, 1/2, 9)`` (without 1/2), 7
  negative ones mirrored from ``linspace(d, 1/2, 8)``, and 0, each divided by the largest. The
  quantile function is infinite at 1, so the extreme probability is ``d = 1 - (1/30 + 1/32) / 2``,
  the mean of the half-bin trims of a 15- and a 16-bin grid (the reference implementation's
  value; the levels then equal the table in the paper's appendix). A weight takes its nearest
  level; two 4-bit codes are packed per byte. Storage: ``n/2 + 4 n/B`` bytes for ``n`` weights,
  0.14 of float32 at ``B = 64``.
- **int8.** Symmetric absmax, ``code = round(127 w / c)`` in ``[-127, 127]``: ``n + 4 n/B`` bytes
  (0.27 of float32). Double quantisation of the scales is not implemented: both schemes are
  within the 0.30 storage target without it.

Why a quantised Linear is one more *kind* ``"linear"`` (``core.layers.register_kind``) and not a
new kind name: every weight method is written on the 2-D view of ``base.weight``, and a quantised
layer computes exactly ``x W~^T + b`` with ``W~`` the dequantised weight. ``QuantLinear.weight`` is
a read-only property returning ``W~`` (a fresh float tensor, built on each read), so LoRA, DoRA,
VeRA, IA3, PiSSA's SVD attach on top unchanged; the stored state is the packed codes and scales,
*buffers*, so nothing quantised is trainable and ``state_dict`` holds the compact form. The
forward dequantises inside an autograd function that keeps the codes, not ``W~``, for the input
gradient (the frozen base costs no float copy in backward), and the tensor the property returns
carries ``rebuild`` so the fused LoRA kernels (``deltatune.kernels``) do the same. The kind object
differs from a float Linear only where a weight is *written*: merging (``store``) either
re-quantises and reports the error, or replaces the layer by a float ``nn.Linear``, as the caller
of ``dt.merge(quantized=...)`` chose; the backup is the original module, so unmerge is exact.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import DeltatuneError
from ..core.layers import LayerKind, register_kind

SCHEMES = ("nf4", "int8")
BLOCK_SIZE = 64
INT8_MAX = 127


@functools.lru_cache(maxsize=None)
def _nf4_level_values() -> tuple[float, ...]:
    # cached as Python floats, not a tensor: a tensor cached when first asked for under the memory
    # planner's FakeTensorMode would be a fake one, without data, for every later call
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    with unset_fake_temporarily():
        f64 = dict(dtype=torch.float64, device="cpu")
        d = 1 - (1 / 30 + 1 / 32) / 2
        normal = torch.distributions.Normal(torch.tensor(0.0, **f64), torch.tensor(1.0, **f64))
        positive = normal.icdf(torch.linspace(d, 0.5, 9, **f64)[:-1])
        negative = -normal.icdf(torch.linspace(d, 0.5, 8, **f64)[:-1])
        levels = torch.cat([negative, torch.zeros(1, **f64), positive]).sort().values
        return tuple((levels / levels.max()).tolist())


def _nf4_levels_f64() -> torch.Tensor:
    return torch.tensor(_nf4_level_values(), dtype=torch.float64)


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels, ascending, from -1 to 1 with an exact 0 (float32)."""
    return _nf4_levels_f64().float()


@dataclasses.dataclass(frozen=True)
class Quantized:
    """A weight in block-wise form: ``codes`` (uint8, two NF4 codes per byte; or int8), one
    float32 ``scales`` entry per block, and what dequantising needs."""
    codes: torch.Tensor
    scales: torch.Tensor
    scheme: str
    shape: torch.Size


def quantize_tensor(weight: torch.Tensor, scheme: str, block_size: int = BLOCK_SIZE) -> Quantized:
    """Block-wise absmax quantisation of ``weight`` (any shape; blocks over the flattened
    tensor, the last one zero-padded)."""
    if scheme not in SCHEMES:
        raise DeltatuneError(f"quantisation scheme {scheme!r} is not known: use one of {', '.join(SCHEMES)}")
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    blocks = F.pad(flat, (0, -n % block_size)).view(-1, block_size)
    scales = blocks.abs().amax(dim=1)
    unit = blocks / torch.where(scales > 0, scales, 1.0)[:, None]     # an all-zero block stays zero
    if scheme == "int8":
        codes = torch.round(unit * INT8_MAX).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        levels = nf4_levels().to(unit.device)
        nearest = torch.bucketize(unit, (levels[1:] + levels[:-1]) / 2).to(torch.uint8).view(-1)
        codes = nearest[0::2] | (nearest[1::2] << 4)
    return Quantized(codes.reshape(-1), scales, scheme, weight.shape)


def dequantize_tensor(q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``c * level[code]`` per block, reshaped to the weight's shape, in ``dtype``."""
    if q.scheme == "int8":
        unit = q.codes.float() / INT8_MAX
    else:
        levels = nf4_levels().to(q.codes.device)
        unit = levels[torch.stack([q.codes & 15, q.codes >> 4], dim=1).view(-1).long()]
    n = q.shape.numel()
    return (unit.view(q.scales.shape[0], -1) * q.scales[:, None]).view(-1)[:n].view(q.shape).to(dtype)


class _QuantLinearFunction(torch.autograd.Function):
    """``x W~^T + b`` that keeps the codes (not the dequantised ``W~``) for the input gradient."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantized(x.dtype), bias)

    @staticmethod
    def backward(ctx, g):
        dx = g @ ctx.layer.dequantized(g.dtype) if ctx.needs_input_grad[0] else None
        db = g.reshape(-1, g.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return dx, db, None


class QuantLinear(nn.Module):
    """A frozen Linear stored block-wise quantised (``scheme`` "nf4" or "int8"). ``weight`` is the
    dequantised float weight (read-only, in ``compute_dtype``); ``codes`` and ``scales`` are the
    stored buffers; ``bias`` stays a frozen float parameter."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scheme: str, block_size: int = BLOCK_SIZE):
        super().__init__()
        if weight.dim() != 2 or not weight.is_floating_point():
            raise DeltatuneError(f"QuantLinear quantises a 2-D float weight, got {tuple(weight.shape)} {weight.dtype}")
        q = quantize_tensor(weight, scheme, block_size)
        self.out_features, self.in_features = weight.shape
        self.scheme, self.block_size, self.compute_dtype = scheme, block_size, weight.dtype
        self.register_buffer("codes", q.codes)
        self.register_buffer("scales", q.scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # set by a merge that re-quantised this layer: how far that moved the merged weight
        self.requantization_error: RequantizationError | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, block_size: int = BLOCK_SIZE) -> "QuantLinear":
        q = cls(linear.weight, linear.bias, scheme, block_size)
        return q.train(linear.training)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        q = Quantized(self.codes, self.scales, self.scheme, torch.Size((self.out_features, self.in_features)))
        return dequantize_tensor(q, self.compute_dtype if dtype is None else dtype)

    @property
    def weight(self) -> torch.Tensor:
        w = self.dequantized()
        w.rebuild = self.dequantized      # the fused kernels rebuild it in backward instead of keeping it
        return w

    def _apply(self, fn, recurse=True):
        # model.to(dtype) changes the compute dtype; the scales stay float32 (they are the stored weight)
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        super()._apply(fn, recurse)
        self.scales = self.scales.float()
        return self

    def storage_bytes(self) -> int:
        """Bytes of the stored weight (codes and scales; the bias is not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantLinearFunction.apply(x, self.bias, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme}, block_size={self.block_size}")


@dataclasses.dataclass(frozen=True)
class RequantizationError:
    """How far re-quantising a merged weight ``W`` moved it: ``max |W~ - W|`` and
    ``||W~ - W||_F / ||W||_F``."""
    max_abs: float
    relative_frobenius: float

    def __str__(self) -> str:
        return f"max abs error {self.max_abs:.3g}, relative Frobenius error {self.relative_frobenius:.3g}"


@dataclasses.dataclass(frozen=True)
class ModuleBackup:
    """The original quantised layer itself: a merge replaces it, unmerge puts it back (exact)."""
    module: nn.Module

    def restore(self, module: nn.Module) -> nn.Module:
        return self.module.train(module.training)


class QuantLinearKind(LayerKind):
    """A ``QuantLinear`` is kind "linear" to methods; only merging differs (see the module docstring)."""

    def shape(self, module):
        return torch.Size((module.out_features, module.in_features))

    def backup(self, module):
        return ModuleBackup(module)

    def check_store(self, module, quantized):
        super().check_store(module, quantized)
        if quantized is None:
            raise DeltatuneError(
                f"merging into a {module.scheme}-quantised layer needs a choice: dt.merge(model, quantized="
                f"'requantize') re-quantises the merged weight (it stays {module.scheme}; the re-quantisation error "
                f"is reported), quantized='dequantize' keeps it in {str(module.compute_dtype).replace('torch.', '')} "
                f"(the layer becomes a float nn.Linear). dt.unmerge restores the quantised layer exactly either way; "
                f"dt.unload(model, quantized=...) takes the same choice")

    def store(self, module, weight, bias, quantized):
        self.check_store(module, quantized)
        dtype = module.compute_dtype
        if quantized == "dequantize":
            linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None,
                               device=weight.device, dtype=dtype)
            linear.weight.copy_(weight.to(dtype))
            if bias is not None:
                linear.bias.copy_(bias.to(dtype))
            return linear.requires_grad_(False).train(module.training), None
        merged = weight.to(dtype)
        stored = QuantLinear(merged, None if bias is None else bias.to(dtype), module.scheme, module.block_size)
        diff = stored.dequantized(torch.float64) - merged.double()
        error = RequantizationError(float(diff.abs().max()), float(diff.norm() / merged.double().norm().clamp_min(1e-30)))
        stored.requantization_error = error
        return stored.train(module.training), error


QUANT_LINEAR = register_kind(QuantLinearKind("linear", lambda m: isinstance(m, QuantLinear)))
