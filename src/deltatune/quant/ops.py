"""Element-wise operations as modules, so that a model written with them can be quantised op by
op (``dt.qfx`` replaces each by its fixed-point form) and exported as a graph of ops."""

from __future__ import annotations

import torch
from torch import nn


class Add(nn.Module):
    """``a + b`` (a residual sum)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class GlobalAvgPool(nn.Module):
    """The mean over the spatial dimensions: ``(N, C, H, W) -> (N, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))
