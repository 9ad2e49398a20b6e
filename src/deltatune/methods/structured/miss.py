"""MiSS, from "MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing" (Kang and Yin;
later versions: "MiSS: Revisiting the Trade-off in LoRA with an Efficient Shard-Sharing Structure"), the
successor of Bone, "Bone: Block Affine Transformation as Parameter Efficient Fine-Tuning Methods for
Large Language Models".

The frozen weight's 2-D view ``W (out, fan_in)`` is cut into shards of ``r`` input columns,
``W = [W_1 ... W_m]`` (``m = ceil(fan_in / r)``; the last shard is narrower when ``r`` does not divide
``fan_in``), and one trainable matrix ``D (out, r)``, zero at init, updates every shard alike::

    W' = W + ΔW,    ΔW = [D D ... D]  (the last copy cut to the last shard's width)

so ``ΔW x = D Σ_j x_j`` with ``x_j`` the input's shards (zero-padded): the forward sums the shards of the
input and multiplies by ``D`` once (the paper's efficient form, MiSS^e), never building ``ΔW``.
``r`` ``out`` parameters per layer.

``mode`` picks the variant (PEFT's ``init_weights``):

- ``"miss"``: the shard sharing above;
- ``"mini"``: ``D`` itself is ``mini_r`` rows repeated down the output: ``D (mini_r, r)``,
  ``ΔW[o, c] = D[o mod mini_r, c mod r]``; ``r mini_r`` parameters (``out`` divisible by ``mini_r``);
- ``"bat"``: Bone's block affine: ``W`` cut into ``r x r`` blocks ``W_ij``, one trainable ``D_i (r, r)``
  per block row, zero at init: ``ΔW_ij = W_ij D_i + D_i``, so the update reads the frozen weight (the
  "weight guide"); ``(out / r) r^2 = r out`` parameters (``out`` and ``fan_in`` divisible by ``r``).

Only ``D`` is trained, and the model is unchanged at initialisation in every mode. The paper's ``r``
(64) is sized for 4096-wide LLaMA layers; the default 16 gives LoRA's budget at our LoRA default
(``r out = 8 (fan_in + out)`` on a square layer), the paper's comparison, and fits every layer here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import BaseConfig, check, check_choice, check_number, method_config
from ...core.errors import DeltatuneError
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import WeightDelta, weight_dtype
from ..lowrank.lora import DEFAULT_TARGETS
from ._blocks import check_padding

MODES = ("miss", "mini", "bat")


@method_config
class MissConfig(BaseConfig):
    """MiSS. ``r`` the shard width (input columns per shard; Bone's block size), ``mode`` the variant
    (``"miss"``, ``"mini"``, ``"bat"``), ``mini_r`` the rows of ``D`` repeated down the output in ``"mini"``."""

    r: int = 16
    mode: str = "miss"
    mini_r: int = 1

    def validate(self) -> None:
        check_number("r", self.r, kind=int, low=1)
        check_choice("mode", self.mode, MODES)
        check_number("mini_r", self.mini_r, kind=int, low=1)
        check(self.mode == "mini" or self.mini_r == 1,
              f"mini_r={self.mini_r} applies to mode='mini' only, and mode={self.mode!r}: set mode='mini' or drop mini_r")


def shard_shape(out: int, fan_in: int, cfg: MissConfig, name: str) -> tuple[int, ...]:
    """The shape of ``D`` for a layer, or a DeltatuneError naming the layer when the mode cannot cut it."""
    r = cfg.r
    if r > fan_in:
        raise DeltatuneError(f"miss: layer {name!r} has {fan_in} input features, fewer than r={r}: "
                             f"lower r to at most {fan_in} or exclude the layer")
    if cfg.mode == "bat" and (out % r or fan_in % r):
        raise DeltatuneError(f"miss mode='bat': layer {name!r} ({out} x {fan_in}) does not cut into {r} x {r} "
                             f"blocks: pick an r dividing both, or exclude the layer")
    if cfg.mode == "mini" and out % cfg.mini_r:
        raise DeltatuneError(f"miss mode='mini': layer {name!r} has {out} outputs, not divisible by "
                             f"mini_r={cfg.mini_r}: pick a mini_r dividing {out}, or exclude the layer")
    return {"miss": (out, r), "mini": (cfg.mini_r, r), "bat": (out // r, r, r)}[cfg.mode]


class MissDelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, cfg: MissConfig, name: str):
        super().__init__()
        check_padding(base, kind, "miss", name)
        self.bind(base)
        self.kind, self.r, self.mode = kind, cfg.r, cfg.mode
        self.out, self.fan_in = out_in(base, kind)
        self.miss_D = nn.Parameter(torch.zeros(shard_shape(self.out, self.fan_in, cfg, name), **weight_dtype(base)))

    def shard(self) -> torch.Tensor:
        """The shared shard ``(out, r)`` (``"mini"``: ``D`` repeated down the output)."""
        D = self.miss_D
        return D.repeat(self.out // D.shape[0], 1) if self.mode == "mini" else D

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        r, out, fan_in = self.r, self.out, self.fan_in
        if self.mode == "bat":
            D = self.miss_D.to(w2.dtype)
            blocks = w2.reshape(out // r, r, fan_in // r, r)        # [i, a, j, b]: block W_ij
            return (torch.einsum("iajb,ibc->iajc", blocks, D) + D[:, :, None, :]).reshape(out, fan_in)
        return self.shard().to(w2.dtype).repeat(1, math.ceil(fan_in / r))[:, :fan_in]

    def fused_forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """MiSS^e: ``y + D Σ_j x_j``, summing the input's shards instead of building ``ΔW``
        (``"bat"`` reads the frozen weight, so it has no such form)."""
        if self.mode == "bat" or self.kind not in ("linear", "conv1d_gpt2") or not (
                x.dtype == self.miss_D.dtype or torch.is_autocast_enabled(x.device.type)):
            return None
        r = self.r
        padded = F.pad(x, (0, (-x.shape[-1]) % r))
        summed = padded.reshape(*x.shape[:-1], -1, r).sum(-2)
        return base(x) + F.linear(summed, self.shard())


def make_delta(base: nn.Module, kind: str, cfg: MissConfig, name: str, loading: bool = False,
               shared: None = None) -> MissDelta:
    return MissDelta(base, kind, cfg, name)


def expected_parameters(base: nn.Module, kind: str, cfg: MissConfig, name: str) -> int:
    """``r out`` per layer (``"mini"``: ``r mini_r``)."""
    out, _ = out_in(base, kind)
    return cfg.r * (cfg.mini_r if cfg.mode == "mini" else out)


MISS = register(Method(
    name="miss", config_cls=MissConfig,
    paper="MiSS: Balancing LoRA Performance and Efficiency with Simple Shard Sharing",
    hook="weight", kinds=("linear", "conv", "conv1d_gpt2"), make_delta=make_delta,
    expected_parameters=expected_parameters, default_targets=DEFAULT_TARGETS,
    default_lr=1e-3,    # BBC sweep (docs/results/README.md): 1e-3 best of 1e-3 / 3e-3 / 1e-2, tying the probe
    variants=[{"mode": "bat", "r": 8}, {"mode": "mini", "mini_r": 4}]))
