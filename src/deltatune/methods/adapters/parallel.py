"""Parallel adapter, from "Towards a Unified View of Parameter-Efficient Transfer Learning" (He et
al., 2022): a bottleneck beside a whole sub-layer, reading the sub-layer's input ``x`` and
added, scaled, to its output::

    h = F(x) + s * W_up f(W_down x + b_down) + b_up      (F: the feed-forward, or the attention)

with ``W_down`` ``(m, d)``, ``W_up`` ``(d, m)``, ``m = max(1, d // reduction_factor)``. ``W_up`` and
``b_up`` start at zero, so the model is unchanged at initialisation. The paper's best placement
is beside the feed-forward with scale ``s = 4`` (its "scaled PA"); ``sublayers`` also takes
"attention". Parameter count per adapted sub-layer: ``2 d m + m + d``.

The engine's block hook wraps the sub-layer module itself (``core.blocks.SUBLAYER_BLOCKS``): an
MLP, or an attention module returning a tuple (the delta changes its first element). In BERT's
post-norm layout the feed-forward is not one module: the module that ends it computes
``LayerNorm(dense(h) + input_tensor)``, where ``input_tensor`` is the sub-layer's input ``x``. There
the adapter adds ``s * adapter(x)`` to that argument, which places it exactly beside the
feed-forward, before the residual add and the LayerNorm. Not foldable (``f`` is nonlinear);
safe per sample.
"""

from __future__ import annotations

import inspect

from torch import nn

from ...core.blocks import sublayer_targets
from ...core.config import check, check_number, method_config
from ...core.errors import DeltatuneError
from ...core.layers import layer_kind, out_in
from ...core.registry import Method, register
from ...core.wrapper import Delta
from .bottleneck import ACTIVATIONS, BottleneckConfig, bottleneck_size

SUBLAYERS = ("attention", "feedforward")


@method_config
class ParallelAdapterConfig(BottleneckConfig):
    """A parallel adapter: ``reduction_factor`` d/m, ``scaling`` s, ``activation``, and
    ``sublayers`` beside which it runs ("feedforward", "attention")."""

    scaling: float = 4.0
    sublayers: list[str] | None = None

    def validate(self) -> None:
        super().validate()
        check_number("scaling", self.scaling)
        self.sublayers = list(self.sublayers or ["feedforward"])
        check(bool(self.sublayers) and all(s in SUBLAYERS for s in self.sublayers)
              and len(set(self.sublayers)) == len(self.sublayers),
              f"sublayers must be distinct entries of {list(SUBLAYERS)}, got {self.sublayers!r}")


def output_projection(block: nn.Module) -> nn.Module:
    """The sub-layer's last linear layer: its output width is ``d``, its weight's dtype and device
    the adapter's (the weight of a quantised base reads as its float compute weight)."""
    last = None
    for m in block.modules():
        if layer_kind(m) in ("linear", "conv1d_gpt2"):
            last = m
    if last is None:
        raise DeltatuneError(f"parallel_adapter: {type(block).__name__} holds no Linear layer, so its width is "
                             f"unknown; target the sub-layer module (an MLP or attention block)")
    return last


def hidden_size(block: nn.Module) -> int:
    last = output_projection(block)
    return out_in(last, layer_kind(last))[0]


def reads_residual(block: nn.Module) -> bool:
    """Whether the block adds the residual itself (BERT's ``...Output(hidden_states, input_tensor)``)."""
    return "input_tensor" in inspect.signature(block.forward).parameters


class ParallelAdapterDelta(Delta):
    def __init__(self, block: nn.Module, cfg: ParallelAdapterConfig):
        super().__init__()
        d = hidden_size(block)
        m = bottleneck_size(d, cfg)
        p = output_projection(block).weight
        self.scaling = float(cfg.scaling)
        self.down = nn.Linear(d, m, dtype=p.dtype, device=p.device)
        self.act = ACTIVATIONS[cfg.activation]()
        self.up = nn.Linear(m, d, dtype=p.dtype, device=p.device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.transforms_input = reads_residual(block)

    def adapter(self, x):
        return self.scaling * self.up(self.act(self.down(x)))

    def forward(self, x, y, base):
        return y + self.adapter(x)

    def transform_arguments(self, x, args, kwargs):
        if len(args) > 1:
            return (args[0], args[1] + self.adapter(args[1]), *args[2:]), kwargs
        residual = kwargs["input_tensor"]
        return args, {**kwargs, "input_tensor": residual + self.adapter(residual)}


def make_delta(base: nn.Module, kind: str, cfg: ParallelAdapterConfig, name: str,
               loading: bool = False) -> ParallelAdapterDelta:
    return ParallelAdapterDelta(base, cfg)


def expected_parameters(base: nn.Module, kind: str, cfg: ParallelAdapterConfig, name: str) -> int:
    d = hidden_size(base)
    m = bottleneck_size(d, cfg)
    return 2 * d * m + m + d


def default_targets(model: nn.Module, cfg: ParallelAdapterConfig | None = None) -> list[str]:
    which = tuple(cfg.sublayers) if cfg is not None else ("feedforward",)
    return sublayer_targets(model, which, "parallel_adapter", blocks=True)


PARALLEL_ADAPTER = register(Method(
    name="parallel_adapter",
    config_cls=ParallelAdapterConfig,
    paper="Towards a Unified View of Parameter-Efficient Transfer Learning",
    hook="activation",
    kinds=("block",),
    make_delta=make_delta,
    expected_parameters=expected_parameters,
    default_targets=default_targets,
    default_lr=1e-3,    # the bottleneck adapters' rate; not yet swept here
    foldable=False,
))
