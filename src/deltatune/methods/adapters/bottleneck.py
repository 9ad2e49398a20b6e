"""Sequential bottleneck adapters: ``houlsby``, from "Parameter-Efficient Transfer Learning for
NLP" (Houlsby et al., 2019), and ``pfeiffer``, from "AdapterFusion: Non-Destructive Task
Composition for Transfer Learning" (Pfeiffer et al., 2021).

An adapter is a small residual bottleneck applied to a sub-layer's output ``h`` before that
sub-layer's residual add::

    h' = h + W_up f(W_down h + b_down) + b_up

with ``W_down`` ``(m, d)``, ``W_up`` ``(d, m)``, ``m = max(1, d // reduction_factor)`` and ``f`` a
nonlinearity. ``W_up`` and ``b_up`` start at zero, so the adapter starts as the identity (the
papers' near-identity initialisation, exact here). Houlsby places one after the attention
sub-layer and one after the feed-forward sub-layer of every block; Pfeiffer only the one after
the feed-forward, at half the parameters for about the same accuracy. Where each sub-layer ends
is the engine's per-architecture map (``core.blocks``). Parameter count per adapted layer:
``2 d m + m + d``. Not foldable into the weights (``f`` is nonlinear); safe per sample.
"""

from __future__ import annotations

from torch import nn

from ...core.blocks import sublayer_targets
from ...core.config import BaseConfig, check_choice, check_number, method_config
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.wrapper import Delta

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@method_config
class BottleneckConfig(BaseConfig):
    """A bottleneck adapter: ``reduction_factor`` d/m, ``activation`` one of relu, gelu, silu, tanh."""

    reduction_factor: int = 16
    activation: str = "relu"

    def validate(self) -> None:
        check_number("reduction_factor", self.reduction_factor, kind=int, low=1)
        check_choice("activation", self.activation, tuple(ACTIVATIONS))


@method_config
class HoulsbyConfig(BottleneckConfig):
    """Houlsby: adapters after the attention and the feed-forward sub-layers (16x reduction)."""


@method_config
class PfeifferConfig(BottleneckConfig):
    """Pfeiffer: one adapter after the feed-forward sub-layer (16x reduction)."""


def bottleneck_size(out: int, cfg: BottleneckConfig) -> int:
    return max(1, out // cfg.reduction_factor)


class BottleneckDelta(Delta):
    def __init__(self, base: nn.Module, kind: str, cfg: BottleneckConfig):
        super().__init__()
        out, _ = out_in(base, kind)
        m = bottleneck_size(out, cfg)
        w = base.weight
        self.down = nn.Linear(out, m, dtype=w.dtype, device=w.device)
        self.act = ACTIVATIONS[cfg.activation]()
        self.up = nn.Linear(m, out, dtype=w.dtype, device=w.device)
        # near-identity init (Houlsby et al.): small Gaussian weights, zero biases, W_up zero. A
        # default (uniform) bias could exceed the small sub-layer outputs and leave every ReLU dead
        nn.init.trunc_normal_(self.down.weight, std=1e-2, a=-2e-2, b=2e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x, y, base):
        return y + self.up(self.act(self.down(y)))


def make_delta(base: nn.Module, kind: str, cfg: BottleneckConfig, name: str, loading: bool = False) -> BottleneckDelta:
    return BottleneckDelta(base, kind, cfg)


def expected_parameters(base: nn.Module, kind: str, cfg: BottleneckConfig, name: str) -> int:
    out, _ = out_in(base, kind)
    m = bottleneck_size(out, cfg)
    return 2 * out * m + m + out


def _method(name: str, config_cls: type, paper: str, which: tuple[str, ...]) -> Method:
    return register(Method(
        name=name, config_cls=config_cls, paper=paper, hook="activation", kinds=("linear", "conv1d_gpt2"),
        make_delta=make_delta, expected_parameters=expected_parameters,
        default_targets=lambda model: sublayer_targets(model, which, name),
        default_lr=1e-3,    # Houlsby et al. sweep 1e-4..1e-3 for BERT; not yet swept here
        foldable=False))


HOULSBY = _method("houlsby", HoulsbyConfig, "Parameter-Efficient Transfer Learning for NLP",
                  ("attention", "feedforward"))
PFEIFFER = _method("pfeiffer", PfeifferConfig,
                   "AdapterFusion: Non-Destructive Task Composition for Transfer Learning", ("feedforward",))
