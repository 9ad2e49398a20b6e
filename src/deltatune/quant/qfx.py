"""Trainable fixed point: ``dt.qfx(model, weight_bits=8, act_bits=8)``.

From "Trainable Fixed-Point Quantization for Deep Learning Acceleration on FPGAs" (QFX). Every
weight, activation and element-wise result of the model is held in an HLS fixed-point type
``ap_[u]fixed<W, I>`` (``fixed_point``), and the *binary-point position* of each (its integer-bit
count ``I``, so the split of the fixed budget ``W`` between integer and fraction bits) is a
trainable parameter:

- a quantiser's value is ``q(x) = 2^(I-W) * clamp(round(x * 2^(W-I)), lo, hi)`` with
  ``I = round(i)`` for its float parameter ``i``; the gradient to ``x`` is straight-through
  (zero where the value saturated), and to ``i`` it is ``ln 2 * (q - x * [inside])`` (the
  derivative of ``q`` in the step ``s = 2^(I-W)`` times ``ds/di``, the rounding of ``i`` passed
  straight through), scaled by ``1 / sqrt(numel * hi)`` as in LSQ so that one step moves ``i``
  the same for large and small tensors;
- ``i`` starts from calibration: ``I = ceil(log2 max|x|) + signed`` over the calibration
  batches, and the type is unsigned when no calibration value was negative (a ReLU's output),
  which buys one more fraction bit.

Widths: weights ``weight_bits`` with one binary point per output channel (``weight_per_channel``:
depthwise filters differ by orders of magnitude, and one point per layer loses most of them);
values stored between layers ``act_bits``; inside a fused layer (a convolution read only by its
BatchNorm, a BatchNorm read only by its activation) the value stays ``acc_bits`` wide, as an HLS
layer keeps its accumulator until the activation; BatchNorm scales ``bn_bits``, biases and shifts
``bias_bits``.

Quantised operations (the modules replaced, by type): ``Conv2d`` and ``Linear`` (weight, bias,
and the input where it does not come from a quantised op), ``BatchNorm2d`` as the per-channel
affine ``x * a + b`` of its running statistics (``a = gamma / sqrt(var + eps)`` and ``b = beta -
a * mean``, each quantised; the statistics stay frozen, as in QFX's fine-tuning), ``ReLU`` /
``ReLU6``, ``quant.ops.Add`` (residual sums) and ``quant.ops.GlobalAvgPool`` (the sum times a
quantised ``1 / (H W)``, as hardware computes a mean). Each result is cast to its own learned
type. Run in float64 (``model.double()``) every sum of products is exact while it needs at most
53 bits, and the model then computes exactly what ``integer_infer`` computes in int64.

Multiplier-free weights (``weight_khot=K``): each weight is the greedy sum of at most ``K``
signed powers of two representable in its type, so a product is ``K`` shifts and adds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import DeltatuneError
from .fixed_point import OVERFLOW_MODES, QUANT_MODES, FixedFormat, quantize_integer
from .ops import Add, GlobalAvgPool

MAX_BITS = 32


@dataclasses.dataclass
class QfxConfig:
    """Widths of each kind of value and the HLS modes of every cast (validated at construction)."""
    weight_bits: int = 8
    act_bits: int = 8
    bias_bits: int = 16         # biases and BatchNorm shifts: added to wide accumulators
    bn_bits: int = 16           # BatchNorm scales: one type per layer over channels whose scales differ widely
    acc_bits: int = 16          # a conv / linear result read only by a BatchNorm: the sum stays wide until
                                # it is normalised, as in an HLS layer; what is stored between layers is act_bits
    pool_bits: int = 16         # the reciprocal 1 / (H W) of an average pooling
    quant: str = "AP_RND"
    overflow: str = "AP_SAT"
    weight_khot: int | None = None
    weight_per_channel: bool = True     # a binary point per output channel (depthwise filters differ widely)
    learn_int_bits: bool = True

    def __post_init__(self) -> None:
        for name in ("weight_bits", "act_bits", "bias_bits", "bn_bits", "acc_bits", "pool_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BITS:
                raise DeltatuneError(f"qfx: {name}={value!r} must be an int from 1 to {MAX_BITS} (the total width W "
                                     f"of ap_fixed<W, I>)")
        if self.quant not in QUANT_MODES:
            raise DeltatuneError(f"qfx: quant={self.quant!r} is not an HLS mode; use one of {', '.join(QUANT_MODES)}")
        if self.overflow not in OVERFLOW_MODES:
            raise DeltatuneError(f"qfx: overflow={self.overflow!r} is not an HLS mode; use one of "
                                 f"{', '.join(OVERFLOW_MODES)}")
        k = self.weight_khot
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.weight_bits):
            raise DeltatuneError(f"qfx: weight_khot={k!r} must be None or an int from 1 to weight_bits "
                                 f"({self.weight_bits}): the number of powers of two per weight")


def _channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel tensor (C,) shaped to broadcast along ``x``'s first dimension."""
    return t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() else t


class _LearnedCast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, int_bits, width, signed, quant, overflow):
        fmt = FixedFormat(width, 0, signed, quant, overflow)        # width and modes; F per element below
        frac = _channel_view(width - torch.round(int_bits.detach()).to(torch.float64), x)
        lsb = torch.ldexp(torch.ones_like(frac), -frac)
        q = (quantize_integer(x, fmt, frac) * lsb).to(x.dtype)
        inside = (x >= fmt.int_min * lsb) & (x <= fmt.int_max * lsb)
        ctx.save_for_backward(x, q, inside)
        per_group = x.numel() // max(int_bits.numel(), 1)
        ctx.wrap, ctx.scale = overflow == "AP_WRAP", 1.0 / math.sqrt(per_group * max(fmt.int_max, 1))
        ctx.param_shape, ctx.param_dtype = int_bits.shape, int_bits.dtype
        return q

    @staticmethod
    def backward(ctx, grad):
        x, q, inside = ctx.saved_tensors
        mask = torch.ones_like(inside) if ctx.wrap else inside
        grad_x = grad * mask.to(grad.dtype)
        contribution = grad * (q - x * mask.to(x.dtype))
        dims = tuple(range(1, x.dim())) if len(ctx.param_shape) else tuple(range(x.dim()))
        grad_i = contribution.sum(dim=dims) * (math.log(2.0) * ctx.scale)
        return grad_x, grad_i.reshape(ctx.param_shape).to(ctx.param_dtype), None, None, None, None


class FixedQuantizer(nn.Module):
    """One learned fixed-point type: width ``W`` fixed, integer bits ``I = round(int_bits)``
    trained; ``per_channel``: one ``I`` per slice of the first dimension (a convolution's output
    channels), set at calibration. Until calibrated (``observe`` on) it passes values through and
    records ``max |x|`` and whether any is negative."""

    def __init__(self, width: int, quant: str, overflow: str, learn: bool = True, per_channel: bool = False):
        super().__init__()
        self.width, self.quant, self.overflow, self.per_channel = width, quant, overflow, per_channel
        self.int_bits = nn.Parameter(torch.zeros(()), requires_grad=learn)
        self.register_buffer("signed", torch.tensor(True))
        self.register_buffer("calibrated", torch.tensor(False))
        self.observe = False
        self._max: torch.Tensor | float = 0.0
        self._negative = False

    def _formats(self) -> list[FixedFormat]:
        return [FixedFormat(self.width, int(i), bool(self.signed), self.quant, self.overflow)
                for i in torch.round(self.int_bits.detach()).flatten().tolist()]

    def format(self) -> FixedFormat:
        """The type (of a per-tensor quantiser)."""
        if self.per_channel:
            raise DeltatuneError("qfx: this quantiser has one type per channel; read channel_formats()")
        return self._formats()[0]

    def channel_formats(self) -> list[FixedFormat]:
        """One type per channel (per-tensor: a list of one)."""
        return self._formats()

    def start_calibration(self) -> None:
        self.observe, self._max, self._negative = True, 0.0, False

    def finish_calibration(self) -> None:
        top = torch.as_tensor(self._max, dtype=torch.float64).clamp_min(2.0 ** -30)
        start = torch.ceil(torch.log2(top)) + int(self._negative)
        with torch.no_grad():
            self.int_bits = nn.Parameter(start.to(self.int_bits.device, torch.float32),
                                         requires_grad=self.int_bits.requires_grad)
            self.signed.fill_(self._negative)
            self.calibrated.fill_(True)
        self.observe = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observe:
            top = x.detach().abs().flatten(1).amax(1) if self.per_channel else x.detach().abs().max()
            self._max = torch.maximum(torch.as_tensor(self._max, dtype=top.dtype), top)
            self._negative = self._negative or bool((x.detach() < 0).any())
            return x
        if not bool(self.calibrated):
            raise DeltatuneError("qfx: a quantiser was used before calibration; call dt.qfx(model, ..., "
                                 "calibration=batches) with a few batches of real inputs")
        return _LearnedCast.apply(x, self.int_bits, self.width, bool(self.signed), self.quant, self.overflow)

    def extra_repr(self) -> str:
        if not bool(self.calibrated):
            return f"width={self.width}, not calibrated"
        formats = self.channel_formats()
        if not self.per_channel:
            return formats[0].hls()
        bits = [f.int_bits for f in formats]
        return f"{formats[0].hls().split('<')[0]}<{self.width}, {min(bits)}..{max(bits)}> per channel ({len(bits)})"


def khot(w: torch.Tensor, k: int, int_bits: torch.Tensor, width: int, signed: bool) -> torch.Tensor:
    """``w`` (already on its fixed-point grid; ``int_bits`` per tensor or per first-dimension
    channel) as the greedy sum of at most ``k`` signed powers of two from the LSB up to half the
    type's range, each the power nearest to what is left, kept inside the type; straight-through
    gradient."""
    ints = _channel_view(torch.round(int_bits.detach()).to(torch.float64), w)
    lowest = ints - width
    highest = torch.maximum(ints - (2 if signed else 1), lowest)
    rest, total = w.detach().to(torch.float64), torch.zeros_like(w, dtype=torch.float64)
    for _ in range(k):
        magnitude = rest.abs()
        e = torch.minimum(torch.maximum(torch.floor(torch.log2(torch.maximum(magnitude, torch.ldexp(
            torch.ones_like(magnitude), lowest.expand_as(magnitude))))), lowest), highest)
        low = torch.ldexp(torch.ones_like(e), e)
        high = torch.ldexp(torch.ones_like(e), torch.minimum(e + 1, highest.expand_as(e)))
        power = torch.where(high - magnitude < magnitude - low, high, low)
        power = torch.where(magnitude < torch.ldexp(torch.ones_like(e), lowest - 1), torch.zeros_like(power), power)
        step = torch.sign(rest) * power
        total, rest = total + step, rest - step
    lsb = torch.ldexp(torch.ones_like(lowest), lowest)
    lo, hi = (-(2 ** (width - 1)), 2 ** (width - 1) - 1) if signed else (0, 2 ** width - 1)
    total = torch.minimum(torch.maximum(total, lo * lsb), hi * lsb).to(w.dtype)
    return w + (total - w).detach()


class _QfxOp(nn.Module):
    """A quantised operation: the original module ``base``, its result cast by ``output``."""
    kind = "op"

    def __init__(self, base: nn.Module, cfg: QfxConfig):
        super().__init__()
        self.base = base
        self.output = FixedQuantizer(cfg.act_bits, cfg.quant, cfg.overflow, cfg.learn_int_bits)
        self.acc_bits = cfg.acc_bits

    def quantizers(self) -> Iterable[FixedQuantizer]:
        return [m for m in self.modules() if isinstance(m, FixedQuantizer)]

    def _emit(self, inputs: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        out = self.output(y)
        if _RECORDER is not None:
            _RECORDER.record(self, inputs, out)
        return out


class QfxWeighted(_QfxOp):
    """``Conv2d`` or ``Linear`` with fixed-point weight, bias and (when its input is not already
    fixed point) input."""

    def __init__(self, base: nn.Module, cfg: QfxConfig):
        super().__init__(base, cfg)
        self.kind = "conv2d" if isinstance(base, nn.Conv2d) else "linear"
        self.input = FixedQuantizer(cfg.act_bits, cfg.quant, cfg.overflow, cfg.learn_int_bits)
        self.weight = FixedQuantizer(cfg.weight_bits, cfg.quant, cfg.overflow, cfg.learn_int_bits,
                                     per_channel=cfg.weight_per_channel)
        self.bias = (FixedQuantizer(cfg.bias_bits, cfg.quant, cfg.overflow, cfg.learn_int_bits)
                     if base.bias is not None else None)
        self.khot = cfg.weight_khot
        self.register_buffer("quantize_input", torch.tensor(True))

    def quantized_weight(self) -> torch.Tensor:
        w = self.weight(self.base.weight)
        if not self.khot or self.weight.observe:
            return w
        return khot(w, self.khot, self.weight.int_bits, self.weight.width, bool(self.weight.signed))

    def padding(self, shape: torch.Size) -> list[int]:
        explicit = getattr(self.base, "explicit_padding", None)
        if explicit is not None:
            return list(explicit(shape))
        if self.base.padding_mode != "zeros" or isinstance(self.base.padding, str):
            raise DeltatuneError(f"qfx: {type(self.base).__name__} with padding={self.base.padding!r}, "
                                 f"padding_mode={self.base.padding_mode!r}: only explicit zero padding is supported")
        ph, pw = self.base.padding
        return [pw, pw, ph, ph]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(self.quantize_input):
            x = self.input(x)
        w = self.quantized_weight()
        b = self.bias(self.base.bias) if self.bias is not None else None
        if self.kind == "linear":
            y = F.linear(x, w, b)
        else:
            y = F.conv2d(F.pad(x, self.padding(x.shape)), w, b, self.base.stride, 0, self.base.dilation,
                         self.base.groups)
        return self._emit([x], y)


class QfxBatchNorm(_QfxOp):
    """``BatchNorm2d`` with frozen statistics as ``x * a + b``, ``a`` and ``b`` fixed point."""
    kind = "affine"

    def __init__(self, base: nn.BatchNorm2d, cfg: QfxConfig):
        super().__init__(base, cfg)
        self.scale = FixedQuantizer(cfg.bn_bits, cfg.quant, cfg.overflow, cfg.learn_int_bits)
        self.shift = FixedQuantizer(cfg.bias_bits, cfg.quant, cfg.overflow, cfg.learn_int_bits)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.base
        a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return self.scale(a), self.shift(bn.bias - a * bn.running_mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.affine()
        return self._emit([x], x * a[None, :, None, None] + b[None, :, None, None])


class QfxActivation(_QfxOp):
    """``ReLU`` (``kind`` relu) or ``ReLU6`` (relu6): exact on fixed-point inputs."""

    def __init__(self, base: nn.Module, cfg: QfxConfig):
        super().__init__(base, cfg)
        self.kind = "relu6" if isinstance(base, nn.ReLU6) else "relu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._emit([x], self.base(x))


class QfxAdd(_QfxOp):
    kind = "add"

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._emit([a, b], a + b)


class QfxAvgPool(_QfxOp):
    """The spatial sum times ``1 / (H W)`` held in ``pool_bits`` bits."""
    kind = "avgpool"

    def __init__(self, base: nn.Module, cfg: QfxConfig):
        super().__init__(base, cfg)
        self.reciprocal = FixedQuantizer(cfg.pool_bits, cfg.quant, cfg.overflow, learn=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.reciprocal(torch.full((), 1.0 / (x.shape[-1] * x.shape[-2]), dtype=x.dtype, device=x.device))
        return self._emit([x], x.sum(dim=(2, 3)) * r)


# module type -> its fixed-point form; Dropout and Identity pass values through unchanged
QFX_OPS: dict[type, type] = {nn.Conv2d: QfxWeighted, nn.Linear: QfxWeighted, nn.BatchNorm2d: QfxBatchNorm,
                             nn.ReLU: QfxActivation, nn.ReLU6: QfxActivation, Add: QfxAdd,
                             GlobalAvgPool: QfxAvgPool}
PASS_THROUGH = (nn.Dropout, nn.Identity)


def _qfx_type(module: nn.Module) -> type | None:
    return next((q for t, q in QFX_OPS.items() if isinstance(module, t)), None)


class _Recorder:
    """Which quantised op consumed which tensor: the graph ``qfx_export`` writes."""

    def __init__(self) -> None:
        self.ops: list[tuple[_QfxOp, list[int], int]] = []
        self.shapes: dict[int, list[int]] = {}
        self.alias: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []         # alive, so that no id() is reused during the trace

    def record(self, op: _QfxOp, inputs: list[torch.Tensor], out: torch.Tensor) -> None:
        self.keep += [*inputs, out]
        ids = [self.alias.get(id(t), id(t)) for t in inputs]
        self.shapes[id(op)] = list(inputs[0].shape)
        self.ops.append((op, ids, id(out)))

    def pass_through(self, module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        self.keep += [inputs[0], out]
        self.alias[id(out)] = self.alias.get(id(inputs[0]), id(inputs[0]))

    def graph(self, model: nn.Module, model_inputs: set[int], output) -> dict:
        """The ops in execution order, each with its sources (the names of the ops whose results
        it reads, ``"input"`` for the model's input, ``"float"`` for a value computed outside
        any quantised op) and the shape of its first input; ``complete`` when the model's output
        is the last op's result."""
        names = {id(m): n for n, m in model.named_modules()}
        producer = {out: names[id(op)] for op, _, out in self.ops}

        def source(i: int) -> str:
            return producer.get(i) or ("input" if i in model_inputs else "float")

        last = self.ops[-1][2] if self.ops else None
        complete = isinstance(output, torch.Tensor) and self.alias.get(id(output), id(output)) == last
        return {"ops": [{"op": names[id(op)], "sources": [source(i) for i in inputs],
                         "input_shape": self.shapes[id(op)]} for op, inputs, _ in self.ops],
                "complete": complete}


_RECORDER: _Recorder | None = None


def qfx_modules(model: nn.Module) -> dict[str, _QfxOp]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _QfxOp)}


def qfx(model: nn.Module, weight_bits: int = 8, act_bits: int = 8, *, calibration: Iterable, targets=None,
        **options) -> nn.Module:
    """Replace the model's quantisable modules by their fixed-point forms, in place, and initialise
    every type from ``calibration`` (an iterable of input batches: tensors, or dicts of keyword
    arguments). ``targets``: module names to quantise (default: every module of a type in
    ``QFX_OPS``); naming a module of another type is an error. ``options``: ``QfxConfig``
    fields. Returns the model."""
    cfg = QfxConfig(weight_bits=weight_bits, act_bits=act_bits, **options)
    if qfx_modules(model):
        raise DeltatuneError("qfx: this model is already quantised (it holds Qfx modules); apply dt.qfx once")
    named = dict(model.named_modules())
    if targets is None:
        chosen = [n for n, m in named.items() if n and _qfx_type(m) is not None]
    else:
        chosen = list(targets)
        for name in chosen:
            if name not in named:
                raise DeltatuneError(f"qfx: targets names {name!r}, which is not a module of this model")
            if _qfx_type(named[name]) is None:
                raise DeltatuneError(f"qfx: cannot quantise {name!r} ({type(named[name]).__name__}); quantisable "
                                     f"types: {', '.join(t.__name__ for t in QFX_OPS)}; leave it out of targets")
    if not chosen:
        raise DeltatuneError("qfx: the model has no module qfx can quantise (Conv2d, Linear, BatchNorm2d, ReLU, "
                             "ReLU6, quant.ops.Add, quant.ops.GlobalAvgPool)")
    for name in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = named[parent_name] if parent_name else model
        module = named[name]
        if isinstance(module, nn.BatchNorm2d) and not module.track_running_stats:
            raise DeltatuneError(f"qfx: {name} (BatchNorm2d) has no running statistics to fold into x * a + b")
        setattr(parent, attr, _qfx_type(module)(module, cfg))
    calibrate_qfx(model, calibration)
    return model


def _run(model: nn.Module, batch) -> torch.Tensor:
    return model(**batch) if isinstance(batch, dict) else model(batch)


@torch.no_grad()
def calibrate_qfx(model: nn.Module, batches: Iterable) -> None:
    """Set every type from the values it sees on ``batches``, in dataflow order (each op's types
    from the already-quantised values of the ops before it), and switch off the input quantiser
    of each op whose input is produced by a quantised op."""
    ops = qfx_modules(model)
    batches = list(batches)
    if not batches:
        raise DeltatuneError("qfx: calibration is empty; give a few batches of real inputs")
    was_training = model.training
    model.eval()
    try:
        for op in ops.values():
            for q in op.quantizers():
                q.start_calibration()
        # one pass records the graph, to find each op's producers; then every type is set from
        # the float values it sees on all batches
        recorder, output = _trace(model, batches[0])
        inputs = batches[0].values() if isinstance(batches[0], dict) else [batches[0]]
        model.qfx_graph = recorder.graph(model, {id(t) for t in inputs}, output)
        produced = {out for _, _, out in recorder.ops}
        for op, inputs, _ in recorder.ops:
            if isinstance(op, QfxWeighted):
                op.quantize_input.fill_(not all(i in produced for i in inputs))
        readers: dict[int, list[_QfxOp]] = {}
        for op, inputs, _ in recorder.ops:
            for i in inputs:
                readers.setdefault(i, []).append(op)
        for op, _, out in recorder.ops:     # inside a fused layer (conv -> BatchNorm -> activation) values stay wide
            fused = QfxBatchNorm if isinstance(op, QfxWeighted) else QfxActivation if isinstance(op, QfxBatchNorm) else None
            if fused is not None and readers.get(out) and all(isinstance(r, fused) for r in readers[out]):
                op.output.width = op.acc_bits
        for batch in batches[1:]:
            _run(model, batch)
        for op in dict.fromkeys(op for op, _, _ in recorder.ops):
            if isinstance(op, QfxWeighted) and not bool(op.quantize_input):
                op.input.calibrated.fill_(True)     # unused: its input is already fixed point
                op.input.observe = False
            for q in op.quantizers():
                if q.observe:
                    q.finish_calibration()
        for op in ops.values():       # ops the trace did not reach (unused branches)
            for q in op.quantizers():
                if q.observe:
                    raise DeltatuneError(f"qfx: {type(op.base).__name__} was never run on the calibration "
                                         f"batches; leave it out of targets")
    finally:
        model.train(was_training)


def _trace(model: nn.Module, batch) -> tuple[_Recorder, object]:
    global _RECORDER
    recorder = _RECORDER = _Recorder()
    handles = [m.register_forward_hook(recorder.pass_through) for m in model.modules() if isinstance(m, PASS_THROUGH)]
    try:
        output = _run(model, batch)
        return recorder, output
    finally:
        _RECORDER = None
        for h in handles:
            h.remove()
