"""Fixed-point numbers with the semantics of HLS ``ap_fixed<W, I, Q, O>`` and ``ap_ufixed``.

From "Trainable Fixed-Point Quantization for Deep Learning Acceleration on FPGAs" (QFX), which
emulates the arithmetic of FPGA high-level synthesis in PyTorch so that a model trained in
software gives the same numbers once synthesised.

A value of type ``ap_fixed<W, I>`` is an integer ``k`` of ``W`` bits (two's complement when
signed) read as ``k * 2^-F`` with ``F = W - I`` fraction bits; ``I`` counts the sign bit of a
signed type and may be negative or larger than ``W`` (then ``F`` is negative). Assigning a real
``x`` to that type is two steps on ``v = x * 2^F``:

1. **Quantisation** (the bits below the LSB), from ``n = floor(|v|)`` and ``f = |v| - n``:

   ========================  ===========================================================
   ``AP_TRN``                ``floor(v)`` (toward minus infinity; the HLS default)
   ``AP_TRN_ZERO``           toward zero
   ``AP_RND``                nearest, ties toward plus infinity
   ``AP_RND_ZERO``           nearest, ties toward zero
   ``AP_RND_INF``            nearest, ties away from zero
   ``AP_RND_MIN_INF``        nearest, ties toward minus infinity
   ``AP_RND_CONV``           nearest, ties to even
   ========================  ===========================================================

2. **Overflow** of the quantised integer ``k`` outside ``[lo, hi]`` (signed:
   ``[-2^(W-1), 2^(W-1) - 1]``, unsigned: ``[0, 2^W - 1]``): ``AP_WRAP`` keeps the low ``W`` bits
   (the HLS default), ``AP_SAT`` clamps, ``AP_SAT_ZERO`` gives 0, ``AP_SAT_SYM`` clamps to
   ``[-hi, hi]`` for a signed type, so ``lo`` itself becomes ``-hi`` as in HLS (unsigned: as
   ``AP_SAT``).

Everything is computed in float64, where each step above is exact for a float64 input (the
scaling is by a power of two, ``n`` and ``f`` split ``|v|`` without rounding, the wrap is an
exact ``fmod`` by a power of two), so a float64 result is the exact value of the type; a float32
input is widened exactly, and the result rounded back to float32 only when ``W`` exceeds its 24
significant bits. NaN stays NaN; infinities saturate (``AP_WRAP`` wraps them to 0, as HLS does).

Products and sums: HLS computes ``a * b`` of ``ap_fixed<W1, I1>`` and ``ap_fixed<W2, I2>`` at
``ap_fixed<W1 + W2, I1 + I2>`` and ``a + b`` at ``max(I1, I2) + 1`` integer and ``max(F1, F2)``
fraction bits, before the result is assigned to its declared type; ``FixedFormat.product`` and
``.sum`` give those formats, ``mul`` and ``add`` the exact results (float64 holds them while the
result format has at most 53 bits).

Gradient: straight-through, 1 where the value is representable; 0 where a saturating mode
clamped it (so training sees the saturation), 1 everywhere under ``AP_WRAP``.
"""

from __future__ import annotations

import dataclasses

import torch

from ..core.errors import DeltatuneError

QUANT_MODES = ("AP_TRN", "AP_TRN_ZERO", "AP_RND", "AP_RND_ZERO", "AP_RND_INF", "AP_RND_MIN_INF", "AP_RND_CONV")
OVERFLOW_MODES = ("AP_WRAP", "AP_SAT", "AP_SAT_ZERO", "AP_SAT_SYM")
EXACT_BITS = 53         # significand of float64: results of up to this many bits are exact
MAX_FRAC_BITS = 960     # |F| so that 2^-F and a W-bit integer times it stay finite float64 numbers
MAX_WIDTH = 64

__all__ = ["EXACT_BITS", "FixedFormat", "OVERFLOW_MODES", "QUANT_MODES", "add", "cast", "mul", "quantize_integer"]


@dataclasses.dataclass(frozen=True)
class FixedFormat:
    """One fixed-point type: ``ap_fixed<width, int_bits, quant, overflow>`` (``signed``) or
    ``ap_ufixed<...>``. Validated at construction."""
    width: int
    int_bits: int
    signed: bool = True
    quant: str = "AP_TRN"
    overflow: str = "AP_WRAP"

    def __post_init__(self) -> None:
        for name in ("width", "int_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise DeltatuneError(f"fixed point: {name}={value!r} must be an int (a {type(value).__name__} "
                                     f"was given)")
        if self.width < 1:
            raise DeltatuneError(f"fixed point: width={self.width} must be at least 1 bit (ap_fixed<W, I> needs W >= 1)")
        if abs(self.width - self.int_bits) > MAX_FRAC_BITS or self.width > MAX_WIDTH:
            raise DeltatuneError(f"fixed point: ap_fixed<{self.width}, {self.int_bits}> has {self.width - self.int_bits} "
                                 f"fraction bits; its step 2^-F must be a float64 (|W - I| <= {MAX_FRAC_BITS}, "
                                 f"W <= {MAX_WIDTH}): choose int_bits nearer the width")
        if not isinstance(self.signed, bool):
            raise DeltatuneError(f"fixed point: signed={self.signed!r} must be True (ap_fixed) or False (ap_ufixed)")
        if self.quant not in QUANT_MODES:
            raise DeltatuneError(f"fixed point: quantisation mode {self.quant!r} is not an HLS mode; use one of "
                                 f"{', '.join(QUANT_MODES)}")
        if self.overflow not in OVERFLOW_MODES:
            raise DeltatuneError(f"fixed point: overflow mode {self.overflow!r} is not an HLS mode; use one of "
                                 f"{', '.join(OVERFLOW_MODES)}")

    @property
    def frac_bits(self) -> int:
        return self.width - self.int_bits

    @property
    def lsb(self) -> float:
        """The value of one step, ``2^-F``."""
        return 2.0 ** -self.frac_bits

    @property
    def int_min(self) -> int:
        return -(1 << (self.width - 1)) if self.signed else 0

    @property
    def int_max(self) -> int:
        return (1 << (self.width - 1)) - 1 if self.signed else (1 << self.width) - 1

    @property
    def min(self) -> float:
        return self.int_min * self.lsb

    @property
    def max(self) -> float:
        return self.int_max * self.lsb

    def hls(self) -> str:
        """The C++ type, e.g. ``ap_fixed<8, 3, AP_RND, AP_SAT>``."""
        kind = "ap_fixed" if self.signed else "ap_ufixed"
        return f"{kind}<{self.width}, {self.int_bits}, {self.quant}, {self.overflow}>"

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        return cast(x, self.width, self.int_bits, self.signed, self.quant, self.overflow)

    def product(self, other: FixedFormat) -> FixedFormat:
        """The full-precision type HLS gives ``a * b``."""
        return FixedFormat(self.width + other.width, self.int_bits + other.int_bits, self.signed or other.signed)

    def sum(self, other: FixedFormat) -> FixedFormat:
        """The full-precision type HLS gives ``a + b`` (an unsigned operand added to a signed one
        takes one more integer bit, as it needs a sign)."""
        int_bits = max(self.int_bits + (other.signed and not self.signed),
                       other.int_bits + (self.signed and not other.signed)) + 1
        return FixedFormat(int_bits + max(self.frac_bits, other.frac_bits), int_bits, self.signed or other.signed)


def _format(width: int, int_bits: int, signed: bool, quant: str, overflow: str) -> FixedFormat:
    return FixedFormat(width, int_bits, signed, quant, overflow)


def _round_magnitude(n: torch.Tensor, f: torch.Tensor, negative: torch.Tensor, quant: str) -> torch.Tensor:
    """The quantised ``k`` from ``|v| = n + f`` (``n`` integer, ``0 <= f < 1``) and the sign."""
    if quant == "AP_TRN":
        up = torch.where(negative, f > 0, torch.zeros_like(negative))
    elif quant == "AP_TRN_ZERO":
        up = torch.zeros_like(negative)
    elif quant == "AP_RND":
        up = torch.where(negative, f > 0.5, f >= 0.5)
    elif quant == "AP_RND_ZERO":
        up = f > 0.5
    elif quant == "AP_RND_INF":
        up = f >= 0.5
    elif quant == "AP_RND_MIN_INF":
        up = torch.where(negative, f >= 0.5, f > 0.5)
    else:   # AP_RND_CONV
        up = (f > 0.5) | ((f == 0.5) & (torch.fmod(n, 2) == 1))
    magnitude = n + up.to(n.dtype)
    return torch.where(negative, -magnitude, magnitude)


def _overflow(k: torch.Tensor, fmt: FixedFormat) -> torch.Tensor:
    lo, hi = float(fmt.int_min), float(fmt.int_max)
    if fmt.overflow == "AP_WRAP":
        modulus = float(1 << fmt.width)
        wrapped = torch.fmod(torch.where(torch.isinf(k), torch.zeros_like(k), k), modulus)
        wrapped = torch.where(wrapped < 0, wrapped + modulus, wrapped)
        return torch.where(wrapped > hi, wrapped - modulus, wrapped) if fmt.signed else wrapped
    if fmt.overflow == "AP_SAT_ZERO":
        return torch.where((k < lo) | (k > hi), torch.zeros_like(k), k)
    if fmt.overflow == "AP_SAT_SYM" and fmt.signed:
        lo = -hi
    return k.clamp(lo, hi)


def quantize_integer(x: torch.Tensor, fmt: FixedFormat, frac_bits: torch.Tensor | None = None) -> torch.Tensor:
    """The integer ``k`` (as float64) whose value ``k * 2^-F`` is ``x`` assigned to ``fmt``;
    ``frac_bits`` (a tensor broadcasting against ``x``) gives each element its own ``F``, as
    types that differ per channel, with ``fmt``'s width and modes."""
    frac = torch.tensor(float(fmt.frac_bits), dtype=torch.float64) if frac_bits is None else frac_bits.to(torch.float64)
    v = torch.ldexp(x.detach().to(torch.float64), frac)
    magnitude = v.abs()
    n = torch.floor(magnitude)
    k = _round_magnitude(n, magnitude - n, v < 0, fmt.quant)
    return _overflow(k, fmt)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, fmt: FixedFormat) -> torch.Tensor:
        k = quantize_integer(x, fmt)
        out = torch.ldexp(k, torch.tensor(float(-fmt.frac_bits), dtype=torch.float64))
        if fmt.overflow != "AP_WRAP" and x.requires_grad:
            ctx.save_for_backward((x >= fmt.min) & (x <= fmt.max))
        else:
            ctx.save_for_backward(None)
        ctx.overflow = fmt.overflow
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        if inside is None:
            return grad, None
        return grad * inside.to(grad.dtype), None


def cast(x: torch.Tensor, width: int, int_bits: int, signed: bool = True, quant: str = "AP_TRN",
         overflow: str = "AP_WRAP") -> torch.Tensor:
    """``x`` assigned to ``ap_fixed<width, int_bits, quant, overflow>`` (``ap_ufixed`` when not
    ``signed``): same shape and dtype, exact in float64, with a straight-through gradient."""
    fmt = _format(width, int_bits, signed, quant, overflow)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise DeltatuneError(f"fixed point: cast takes a float tensor, not {type(x).__name__}"
                             f"{' of ' + str(x.dtype) if isinstance(x, torch.Tensor) else ''}; convert it with .double()")
    return _StraightThrough.apply(x, fmt)


def _exact(fmt: FixedFormat, op: str) -> FixedFormat:
    if fmt.width > EXACT_BITS:
        raise DeltatuneError(f"fixed point: the full-precision {op} is {fmt.hls()}, wider than the {EXACT_BITS} bits "
                             f"float64 holds exactly; use narrower operands or the integer path "
                             f"(deltatune.quant.integer_infer)")
    return fmt


def mul(a: torch.Tensor, a_fmt: FixedFormat, b: torch.Tensor, b_fmt: FixedFormat) -> tuple[torch.Tensor, FixedFormat]:
    """``a * b`` at the full precision HLS gives it: the exact product (float64) and its format."""
    fmt = _exact(a_fmt.product(b_fmt), "product")
    return a.to(torch.float64) * b.to(torch.float64), fmt


def add(a: torch.Tensor, a_fmt: FixedFormat, b: torch.Tensor, b_fmt: FixedFormat) -> tuple[torch.Tensor, FixedFormat]:
    """``a + b`` at the full precision HLS gives it: the exact sum (float64) and its format."""
    fmt = _exact(a_fmt.sum(b_fmt), "sum")
    return a.to(torch.float64) + b.to(torch.float64), fmt
