"""COAP optimizers (deltatune.optim.coap) and the block-wise 8-bit states (deltatune.optim._state8bit)."""

from __future__ import annotations

import math

import pytest
import torch

from deltatune.core.errors import DeltatuneError
from deltatune.optim._state8bit import quantize_state


# ---------------------------------------------------------------- 8-bit states


def test_signed_8bit_error_bounded_and_smaller():
    torch.manual_seed(0)
    x = torch.randn(300, 17) * torch.linspace(0.01, 3.0, 17)
    q = quantize_state(x, signed=True, block=64)
    x_hat = q.dequantize()
    assert x_hat.shape == x.shape and x_hat.dtype == torch.float32
    # each element is within its block's absmax / 254 (written from the definition of the code)
    flat = torch.nn.functional.pad(x.reshape(-1), (0, (-x.numel()) % 64)).view(-1, 64)
    bound = (flat.abs().amax(1, keepdim=True) / 254).expand(-1, 64).reshape(-1)[: x.numel()].view(x.shape)
    assert bool(((x_hat - x).abs() <= bound + 1e-7).all())
    # 1 byte per element + 4 bytes per block of 64
    assert q.nbytes == x.numel() + 4 * math.ceil(x.numel() / 64)
    assert q.nbytes < x.numel() * 4


def test_unsigned_8bit_relative_error_and_no_zeroing():
    torch.manual_seed(0)
    v = torch.randn(500, 9).pow(2) * torch.logspace(-4, 0, 9)
    v[3, 4] = 0.0
    q = quantize_state(v, signed=False)
    assert q.codes.dtype == torch.uint8
    d = q.dequantize()
    assert d[3, 4] == 0.0
    nz = v > 0
    rel = ((d - v).abs() / v.clamp_min(1e-38))[nz]
    in_range = (v / q.scales.repeat_interleave(256)[: v.numel()].view(v.shape))[nz] > 2.0**-31.75
    assert float(rel[in_range].max()) <= 2 ** (1 / 16) - 1 + 1e-5
    # values below the code's range round up (never to zero): a step can only shrink
    assert bool((d[nz][~in_range] >= v[nz][~in_range]).all())
    assert bool((d[nz] > 0).all())


def test_requantize_in_place_and_shape_check():
    x = torch.randn(40, 40)
    q = quantize_state(x, signed=True)
    codes_ptr = q.codes.data_ptr()
    q.requantize_(x * -2)
    assert q.codes.data_ptr() == codes_ptr
    assert torch.allclose(q.dequantize(), -2 * x, atol=float(x.abs().max()) * 2 / 254 + 1e-6)
    with pytest.raises(DeltatuneError):
        q.requantize_(torch.zeros(3))
    with pytest.raises(DeltatuneError):
        quantize_state(-x.abs() - 1, signed=False)
