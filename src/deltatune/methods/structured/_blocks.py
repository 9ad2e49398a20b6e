"""What the block-structured weight methods (miss, hira, gralora) check of a layer at attach."""

from __future__ import annotations

from torch import nn

from ...core.errors import DeltatuneError


def check_padding(base: nn.Module, kind: str, method: str, name: str) -> None:
    """A weight delta runs a convolution with the layer's zero padding (core.weights.apply_2d): any other
    padding mode is refused here, naming the layer, rather than at the first forward."""
    if kind == "conv" and base.padding_mode != "zeros":
        raise DeltatuneError(f"{method}: layer {name!r} has padding_mode={base.padding_mode!r}; only zero-padded "
                             f"convolutions are supported: exclude the layer from targets")
