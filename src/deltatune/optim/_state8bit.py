"""Block-wise 8-bit optimiser states, in plain torch (runs on CPU and GPU).

After "8-bit Optimizers via Block-wise Quantization" (Dettmers et al.): a moment tensor is cut
into blocks of ``block`` consecutive elements (flattened, row-major); each block keeps one float32
scale (its largest magnitude) and one byte per element.

API::

    q = quantize_state(x, signed=True)     # QuantizedState; x keeps its shape in q.shape
    x_hat = q.dequantize()                 # float32 tensor of x's shape
    q.requantize_(new_x)                   # overwrite codes and scales in place (same shape)
    q.nbytes                               # bytes of codes + scales

    QuantizedState(codes, scales, shape, signed, block)   # a view over stored tensors

``QuantizedState`` only holds tensors, so an optimizer can keep ``q.codes`` and ``q.scales`` in
its ``state`` (where ``state_dict`` saves them) and rebuild the view each step for free.

Codes
-----
``signed=True`` (first moments, any sign): linear absmax code. ``code = round(127 * x / s)`` in
int8, ``s`` the block's absmax. The error of every element is at most ``s / 254``.

``signed=False`` (second moments, non-negative): logarithmic code in uint8. A linear code would
send values below ``s / 510`` to zero, and Adam divides by ``sqrt(v)``: a second moment rounded to
zero turns a tiny first moment into a huge step. So code ``k`` in 1..255 stands for
``s * 2 ** ((k - 255) / 8)`` (adjacent levels differ by ``2 ** (1/8)``), and code 0 for exact zero.
Rounding happens in the log domain, so every non-zero element has relative error at most
``2 ** (1/16) - 1`` (under 4.5 %; ``sqrt(v)``, what Adam uses, under 2.2 %). The levels span
``2 ** -31.75`` (about 3e-10) of the block's maximum; smaller non-zero values round *up* to the
smallest level, never to zero, which can only shrink a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.errors import DeltatuneError

_SIGNED_MAX = 127
# levels per octave of the unsigned log code: 8 gives 255 levels over 31.75 octaves
_LOG_LEVELS_PER_OCTAVE = 8
_UNSIGNED_TOP = 255


@dataclass
class QuantizedState:
    """A tensor stored as one byte per element plus one float32 scale per block.

    ``codes``: int8 (signed) or uint8 (unsigned), flat, ``numel`` long. ``scales``: float32, one per
    block (the block's absmax). ``shape``: the original shape.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    shape: torch.Size
    signed: bool
    block: int = 256

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    def dequantize(self) -> torch.Tensor:
        """The stored tensor, float32, in its original shape."""
        n = self.codes.numel()
        pad = self.scales.numel() * self.block - n
        if self.signed:
            values = self.codes.to(torch.float32) / _SIGNED_MAX
        else:
            k = self.codes.to(torch.float32)
            values = torch.where(
                k > 0, torch.exp2((k - _UNSIGNED_TOP) / _LOG_LEVELS_PER_OCTAVE), torch.zeros_like(k)
            )
        if pad:
            values = torch.nn.functional.pad(values, (0, pad))
        values = values.view(-1, self.block) * self.scales.unsqueeze(1)
        return values.view(-1)[:n].view(self.shape)

    def requantize_(self, x: torch.Tensor) -> "QuantizedState":
        """Store ``x`` (same shape) in place of the current contents; returns ``self``."""
        if tuple(x.shape) != tuple(self.shape):
            raise DeltatuneError(f"requantize_ got shape {tuple(x.shape)}, the state holds {tuple(self.shape)}")
        codes, scales = _encode(x, self.signed, self.block)
        self.codes.copy_(codes)
        self.scales.copy_(scales)
        return self


def _encode(x: torch.Tensor, signed: bool, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    pad = (-n) % block
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    blocks = flat.view(-1, block)
    scales = blocks.abs().amax(dim=1)
    # an all-zero block keeps scale 0 and codes 0; dividing by 1 there avoids 0/0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(1)
    if signed:
        codes = torch.round(blocks / safe * _SIGNED_MAX).clamp_(-_SIGNED_MAX, _SIGNED_MAX).to(torch.int8)
    else:
        if bool((blocks < 0).any()):
            raise DeltatuneError("an unsigned 8-bit state got negative values; quantise it with signed=True")
        ratio = blocks / safe
        # log2 of 0 is -inf; those elements are set to code 0 below
        k = torch.round(torch.log2(ratio.clamp_min(torch.finfo(torch.float32).tiny)) * _LOG_LEVELS_PER_OCTAVE)
        k = (k + _UNSIGNED_TOP).clamp_(1, _UNSIGNED_TOP)
        codes = torch.where(ratio > 0, k, torch.zeros_like(k)).to(torch.uint8)
    return codes.view(-1)[:n].contiguous(), scales.contiguous()


def quantize_state(x: torch.Tensor, signed: bool, block: int = 256) -> QuantizedState:
    """``x`` as a :class:`QuantizedState` (see the module docstring for the two codes)."""
    if not isinstance(block, int) or block <= 0:
        raise DeltatuneError(f"block must be a positive int, got {block!r}")
    codes, scales = _encode(x, signed, block)
    return QuantizedState(codes=codes, scales=scales, shape=torch.Size(x.shape), signed=signed, block=block)


def quantized_nbytes(numel: int, block: int = 256) -> int:
    """Bytes of a quantised state of ``numel`` elements: one byte each plus 4 per block."""
    return numel + 4 * math.ceil(numel / block)


__all__ = ["QuantizedState", "quantize_state", "quantized_nbytes"]
