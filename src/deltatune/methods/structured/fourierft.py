"""FourierFT, from "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform" (Gao et al., 2024).

The update of a weight matrix is learned in its frequency domain: ``n`` spectral coefficients ``c``
at fixed random entries ``E`` of an ``(out, fan_in)`` spectrum ``F`` (zero elsewhere), brought
back by the inverse 2-D discrete Fourier transform::

    F[E_k] = c_k,        ΔW = α · Re(IDFT2(F))

on the 2-D view ``(out, fan_in)`` (IDFT2 with its ``1 / (out · fan_in)`` normalisation, as
``torch.fft.ifft2``); ``α`` is ``scale`` (150, PEFT's default, which it documents as the value for
RoBERTa, 300 for LLaMA and ViT). Only ``c`` (``fourierft_spectrum``, ``n_frequency`` values, 1000
as PEFT) is trained; the entries ``E`` are frozen and drawn from ``seed`` (a random permutation of
the ``out · fan_in`` positions, its first ``n``; the same seed for every layer, as PEFT, so layers
of one shape share their entries). They are regenerated at attach and kept as a non-persistent
buffer: the adapter file holds only the coefficients.

Initialisation: ``init="zeros"`` (the default) starts ``c`` at zero, so the model is unchanged
at init, and every coefficient has a gradient from the first step (each is one Fourier basis
matrix of ΔW); ``init="gaussian"`` draws ``c`` from a standard normal, PEFT's default, which
changes the model at init. Parameter count per layer: ``n_frequency``.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.config import BaseConfig, check_choice, check_number, method_config
from ...core.errors import DeltatuneError
from ...core.layers import out_in
from ...core.registry import Method, register
from ...core.weights import WeightDelta, weight_dtype
from ..lowrank.lora import DEFAULT_TARGETS

INITS = ("zeros", "gaussian")


@method_config
class FourierftConfig(BaseConfig):
    """FourierFT. ``n_frequency`` coefficients per layer, ``scale`` the factor α on ΔW, ``seed`` the
    seed of the spectral entries, ``init`` of the coefficients ("zeros" or "gaussian")."""

    n_frequency: int = 1000
    scale: float = 150.0
    seed: int = 777
    init: str = "zeros"

    def validate(self) -> None:
        check_number("n_frequency", self.n_frequency, kind=int, low=1)
        check_number("scale", self.scale, low=0, low_open=True)
        check_number("seed", self.seed, kind=int, low=0, high=2 ** 63 - 1)
        check_choice("init", self.init, INITS)


def spectral_entries(out: int, fan_in: int, n: int, seed: int) -> torch.Tensor:
    """``(2, n)`` row and column indices of the trained entries: the first ``n`` of a permutation of
    the ``out · fan_in`` positions drawn from ``seed``."""
    flat = torch.randperm(out * fan_in, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // fan_in, flat % fan_in])


class FourierftDelta(WeightDelta):
    def __init__(self, base: nn.Module, kind: str, cfg: FourierftConfig, name: str, loading: bool = False):
        super().__init__()
        out, fan_in = out_in(base, kind)
        if cfg.n_frequency > out * fan_in:
            raise DeltatuneError(f"fourierft cannot wrap {name!r}: its {out}x{fan_in} weight has {out * fan_in} "
                                 f"spectral entries, fewer than n_frequency={cfg.n_frequency}; lower n_frequency "
                                 f"or exclude the layer")
        self.kind, self.scale, self.shape = kind, cfg.scale, (out, fan_in)
        self.bind(base)
        like = weight_dtype(base)
        self.register_buffer("entries", spectral_entries(out, fan_in, cfg.n_frequency, cfg.seed).to(like["device"]),
                             persistent=False)
        self.fourierft_spectrum = nn.Parameter(torch.zeros(cfg.n_frequency, **like))
        if not loading and cfg.init == "gaussian":
            with torch.no_grad():
                self.fourierft_spectrum.normal_()

    def delta_2d(self, w2: torch.Tensor) -> torch.Tensor:
        # the FFT has no half-precision kernels: a half weight gets its ΔW through float32
        dtype = w2.dtype if w2.dtype in (torch.float32, torch.float64) else torch.float32
        rows, cols = self.entries
        spectrum = torch.zeros(self.shape, dtype=dtype, device=w2.device).index_put(
            (rows, cols), self.fourierft_spectrum.to(dtype))
        return (self.scale * torch.fft.ifft2(spectrum).real).to(w2.dtype)


def make_delta(base: nn.Module, kind: str, cfg: FourierftConfig, name: str, loading: bool = False,
               shared=None) -> FourierftDelta:
    return FourierftDelta(base, kind, cfg, name, loading)


def expected_parameters(base: nn.Module, kind: str, cfg: FourierftConfig, name: str) -> int:
    """``n_frequency``: the coefficients; the entries are regenerated from the seed."""
    return cfg.n_frequency


FOURIERFT = register(Method(
    name="fourierft", config_cls=FourierftConfig,
    paper="Parameter-Efficient Fine-Tuning with Discrete Fourier Transform",
    hook="weight", kinds=("linear", "conv1d_gpt2"), make_delta=make_delta,
    expected_parameters=expected_parameters,
    # the paper adapts query and value; the convnet entry of LoRA's table names convolutions
    default_targets={k: v for k, v in DEFAULT_TARGETS.items() if k != "efficientnet_lite"},
    default_lr=1e-2))   # from the paper's recipe; not yet swept here
