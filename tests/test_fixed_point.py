"""``deltatune.quant.fixed_point.cast`` against an integer reference of HLS ``ap_fixed``
semantics written here from the HLS user guide's definitions (exact rationals and Python ints,
nothing shared with the implementation), over random values, widths, integer bits and every
mode; and the formats of products and sums."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltatune.core.errors import DeltatuneError
from deltatune.quant.fixed_point import OVERFLOW_MODES, QUANT_MODES, FixedFormat, add, cast, mul


def reference(x: float, width: int, int_bits: int, signed: bool, quant: str, overflow: str) -> Fraction:
    """The value of ``ap_[u]fixed<width, int_bits, quant, overflow> y = x;`` in exact arithmetic."""
    frac = width - int_bits
    v = Fraction(x) * (Fraction(2) ** frac)
    below = math.floor(v)
    rest = v - below                     # in [0, 1): the part below the new LSB, of v itself
    half = Fraction(1, 2)
    if quant == "AP_TRN":
        k = below
    elif quant == "AP_TRN_ZERO":
        k = below if v >= 0 else math.ceil(v)
    elif quant == "AP_RND":                                  # ties toward +inf
        k = below + (rest >= half)
    elif quant == "AP_RND_ZERO":                             # ties toward 0
        k = below + (rest > half or (rest == half and v < 0))
    elif quant == "AP_RND_INF":                              # ties away from 0
        k = below + (rest > half or (rest == half and v > 0))
    elif quant == "AP_RND_MIN_INF":                          # ties toward -inf
        k = below + (rest > half)
    elif quant == "AP_RND_CONV":                             # ties to even
        k = below + (rest > half or (rest == half and below % 2 == 1))
    else:
        raise AssertionError(quant)
    lo, hi = (-(2 ** (width - 1)), 2 ** (width - 1) - 1) if signed else (0, 2 ** width - 1)
    if overflow == "AP_WRAP":
        k %= 2 ** width                                      # the low W bits, as unsigned
        if signed and k >= 2 ** (width - 1):
            k -= 2 ** width                                  # read back in two's complement
    elif lo <= k <= hi:
        if overflow == "AP_SAT_SYM" and signed and k == lo:
            k = -hi                                          # the symmetric range has no -2^(W-1)
    elif overflow == "AP_SAT_ZERO":
        k = 0
    elif overflow == "AP_SAT_SYM" and signed:
        k = hi if k > hi else -hi
    else:                                                    # AP_SAT, and AP_SAT_SYM unsigned
        k = hi if k > hi else lo
    return Fraction(k) / (Fraction(2) ** frac)


@st.composite
def cases(draw):
    width = draw(st.integers(2, 32))
    int_bits = draw(st.integers(-4, width + 4))
    signed = draw(st.booleans())
    frac = width - int_bits
    # values on and between the grid: exact ties (odd multiples of half an LSB), far outside the
    # range (overflow), and arbitrary float64s
    on_grid = st.builds(lambda k, extra: math.ldexp(k, -frac - extra), st.integers(-2 ** 40, 2 ** 40),
                        st.integers(0, 3))
    values = st.lists(st.one_of(on_grid, st.floats(-1e12, 1e12, allow_nan=False, allow_infinity=False),
                                st.floats(-2.0 ** (int_bits + 2), 2.0 ** (int_bits + 2))), min_size=1, max_size=24)
    return width, int_bits, signed, draw(values)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), quant=st.sampled_from(QUANT_MODES), overflow=st.sampled_from(OVERFLOW_MODES))
def test_cast_matches_the_hls_reference_bit_for_bit(case, quant, overflow):
    width, int_bits, signed, values = case
    out = cast(torch.tensor(values, dtype=torch.float64), width, int_bits, signed, quant, overflow)
    assert out.dtype == torch.float64 and out.shape == (len(values),)
    for x, y in zip(values, out.tolist()):
        assert Fraction(y) == reference(x, width, int_bits, signed, quant, overflow), (x, width, int_bits, signed)


def test_every_mode_on_known_values():
    """Hand-checked rows of the HLS guide's tables: ap_fixed<4, 2> (LSB 0.25, range [-2, 1.75])."""
    def q(values, quant="AP_TRN", overflow="AP_WRAP", width=4, int_bits=2, signed=True):
        return cast(torch.tensor(values, dtype=torch.float64), width, int_bits, signed, quant, overflow).tolist()

    ties = [0.375, -0.375, 0.125, -0.125]
    assert q(ties, "AP_TRN") == [0.25, -0.5, 0.0, -0.25]
    assert q(ties, "AP_TRN_ZERO") == [0.25, -0.25, 0.0, 0.0]
    assert q(ties, "AP_RND") == [0.5, -0.25, 0.25, 0.0]
    assert q(ties, "AP_RND_ZERO") == [0.25, -0.25, 0.0, 0.0]
    assert q(ties, "AP_RND_INF") == [0.5, -0.5, 0.25, -0.25]
    assert q(ties, "AP_RND_MIN_INF") == [0.25, -0.5, 0.0, -0.25]
    assert q(ties, "AP_RND_CONV") == [0.5, -0.5, 0.0, 0.0]
    big = [2.0, -2.25, 1.75, -2.0]
    assert q(big, overflow="AP_WRAP") == [-2.0, 1.75, 1.75, -2.0]
    assert q(big, overflow="AP_SAT") == [1.75, -2.0, 1.75, -2.0]
    assert q(big, overflow="AP_SAT_ZERO") == [0.0, 0.0, 1.75, -2.0]
    assert q(big, overflow="AP_SAT_SYM") == [1.75, -1.75, 1.75, -1.75]
    assert q([-0.5, 3.0, 4.0], overflow="AP_SAT", signed=False) == [0.0, 3.0, 3.75]
    assert q([-0.5, 4.25], overflow="AP_WRAP", signed=False) == [3.5, 0.25]
    assert q([7.6], "AP_RND", "AP_SAT", width=4, int_bits=4) == [7.0]     # the rounding carry saturates
    assert q([100.0, 21.0], width=4, int_bits=6) == [-28.0, 20.0]        # I > W: LSB 4, F = -2
    assert q([0.04], width=4, int_bits=-2) == [0.03125]                  # I < 0: LSB 2^-6


def test_dtype_shape_nan_inf_and_float32():
    x = torch.tensor([[0.3, -0.7], [float("inf"), float("-inf")]], dtype=torch.float32)
    y = cast(x, 8, 3, quant="AP_RND", overflow="AP_SAT")
    assert y.dtype == torch.float32 and y.shape == (2, 2)
    assert y.tolist() == [[0.3125, -0.6875], [3.96875, -4.0]]
    assert cast(x, 8, 3)[1].tolist() == [0.0, 0.0]                       # wrap keeps the low bits: 0
    assert torch.isnan(cast(torch.tensor([float("nan")]), 8, 3)).all()


def test_straight_through_gradient():
    x = torch.tensor([0.3, 5.0, -9.0], dtype=torch.float64, requires_grad=True)
    cast(x, 8, 3, overflow="AP_SAT").sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 0.0]                           # saturated values pass no gradient
    x.grad = None
    cast(x, 8, 3).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]


def test_product_and_sum_formats_and_exact_results():
    a_fmt, b_fmt = FixedFormat(8, 3), FixedFormat(6, 1, signed=False)
    assert a_fmt.product(b_fmt) == FixedFormat(14, 4, True)
    assert a_fmt.sum(b_fmt) == FixedFormat(3 + 1 + 5, 4, True)            # max(I1, I2 + 1) + 1, max(F1, F2)
    assert FixedFormat(8, 3).sum(FixedFormat(8, 3)) == FixedFormat(9, 4)
    a = cast(torch.tensor([3.96875, -4.0], dtype=torch.float64), 8, 3)
    b = cast(torch.tensor([0.984375, 0.5], dtype=torch.float64), 6, 1, signed=False)
    product, fmt = mul(a, a_fmt, b, b_fmt)
    assert torch.equal(fmt.cast(product), product)                      # the product fits its format exactly
    total, fmt = add(a, a_fmt, b, b_fmt)
    assert torch.equal(fmt.cast(total), total)
    with pytest.raises(DeltatuneError, match="53 bits"):
        mul(a, FixedFormat(32, 4), a, FixedFormat(32, 4))
    assert FixedFormat(8, 3, quant="AP_RND", overflow="AP_SAT").hls() == "ap_fixed<8, 3, AP_RND, AP_SAT>"


@pytest.mark.parametrize("kwargs, message", [
    (dict(width=0, int_bits=0), "width=0 must be at least 1"),
    (dict(width=8, int_bits=2.5), "int_bits=2.5 must be an int"),
    (dict(width=8, int_bits=2, quant="AP_ROUND"), "'AP_ROUND' is not an HLS mode"),
    (dict(width=8, int_bits=2, overflow="SAT"), "'SAT' is not an HLS mode"),
    (dict(width=8, int_bits=-5000), "5008 fraction bits"),
])
def test_bad_formats_are_refused(kwargs, message):
    with pytest.raises(DeltatuneError, match=message):
        cast(torch.zeros(2), **kwargs)
    with pytest.raises(DeltatuneError, match="float tensor"):
        cast(torch.zeros(2, dtype=torch.int32), 8, 2)
