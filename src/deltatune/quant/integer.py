"""Export of a ``dt.qfx`` model and its reference inference in integer arithmetic.

``qfx_export(model, folder)`` writes ``weights.safetensors`` (every weight, bias, BatchNorm scale
and shift and pooling reciprocal as its integer ``k``, int64), ``qfx.json`` (the graph: each op
with its sources, parameters and the fixed-point type of each value) and ``weights.h`` (the
integers declared with their HLS ``ap_fixed`` types, for a synthesis testbench).

``integer_infer(folder, inputs)`` runs that graph in numpy int64 only. The float input is
assigned once to its op's input type (the analogue-to-digital boundary, with ``cast``'s exact
semantics); from there every value is an integer ``k`` with a known number of fraction bits
``F``: products add their ``F``, sums align them by left shifts (exact), and each op's result is
re-cast to its type by an arithmetic right shift whose dropped bits decide the rounding mode,
then the overflow mode on the integer range. A ``float64`` run of the emulated model computes the
same values, each sum being exact in 53 bits (the export checks that bound, and int64's, per op).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..core.errors import DeltatuneError
from ..files import atomic_write_bytes
from .fixed_point import EXACT_BITS, FixedFormat, quantize_integer

FORMAT_NAME, FORMAT_VERSION = "deltatune-qfx", 1
INT64_BITS = 62         # headroom below int64's 63 magnitude bits for the alignment shifts


@dataclasses.dataclass
class IntegerResult:
    """The model's output as integers ``values`` with ``frac_bits`` fraction bits: the value is
    ``values * 2^-frac_bits``."""
    values: np.ndarray
    frac_bits: int

    def to_tensor(self) -> torch.Tensor:
        """The exact values as float64 (exact while they fit 53 bits)."""
        return torch.ldexp(torch.from_numpy(self.values).to(torch.float64),
                           torch.tensor(float(-self.frac_bits), dtype=torch.float64))


def _fmt_json(fmt: FixedFormat) -> dict:
    return dataclasses.asdict(fmt)


def _fmt(d: dict) -> FixedFormat:
    return FixedFormat(**d)


def _acc_bits(op, input_fmt: FixedFormat, fan_in: int, other: FixedFormat | None) -> int:
    bits = input_fmt.width + op.weight.width + math.ceil(math.log2(max(fan_in, 1)))
    return bits + (1 if other is not None else 0)


def _weight_json(q) -> dict:
    """A weight's type: ``int_bits`` is a list (one per output channel) for a per-channel type."""
    formats = q.channel_formats()
    doc = _fmt_json(formats[0])
    if q.per_channel:
        doc["int_bits"] = [f.int_bits for f in formats]
    return doc


def _frac(doc: dict, ndim: int) -> int | np.ndarray:
    """Fraction bits of a (possibly per-channel) type, shaped for values with channels on axis 1."""
    if isinstance(doc["int_bits"], list):
        return (doc["width"] - np.asarray(doc["int_bits"], dtype=np.int64)).reshape(1, -1, *([1] * (ndim - 2)))
    return doc["width"] - doc["int_bits"]


def qfx_export(model: torch.nn.Module, folder: str | Path, header: bool = True) -> Path:
    """Write the quantised ``model``'s integers, types and graph to ``folder`` (see the module
    docstring); returns the folder."""
    from safetensors.torch import save_file

    from .qfx import QfxActivation, QfxAdd, QfxAvgPool, QfxBatchNorm, QfxWeighted, qfx_modules
    spec = getattr(model, "qfx_graph", None)
    if not spec or not spec["ops"]:
        raise DeltatuneError("qfx_export: this model has no qfx graph; quantise it with dt.qfx(model, ..., "
                             "calibration=...) first")
    graph = spec["ops"]
    ops = qfx_modules(model)
    names = [g["op"] for g in graph]
    if len(set(names)) != len(names):
        raise DeltatuneError("qfx_export: an op runs more than once per forward (shared module); export needs "
                             "each op once")
    formats: dict[str, FixedFormat] = {}
    tensors: dict[str, torch.Tensor] = {}
    records = []
    with torch.no_grad():
        for g in graph:
            name, op = g["op"], ops[g["op"]]
            rec = {"name": name, "kind": op.kind, "sources": g["sources"], "output_format": _fmt_json(op.output.format())}
            in_fmts = []
            for s in g["sources"]:
                if s == "float":
                    raise DeltatuneError(f"qfx_export: {name} reads a value that no quantised op produced (a float "
                                         f"operation between ops); make every operation on the path a module qfx "
                                         f"quantises")
                if s == "input":
                    if not (isinstance(op, QfxWeighted) and bool(op.quantize_input)):
                        raise DeltatuneError(f"qfx_export: {name} reads the model's input without quantising it")
                    in_fmts.append(op.input.format())
                else:
                    in_fmts.append(formats[s])
            if isinstance(op, QfxWeighted):
                if bool(op.quantize_input):
                    rec["input_format"] = _fmt_json(op.input.format())
                w = op.quantized_weight().double()
                rec["weight_format"] = _weight_json(op.weight)
                w_frac = torch.tensor([op.weight.width - f.int_bits for f in op.weight.channel_formats()],
                                      dtype=torch.float64).reshape(-1, *([1] * (w.dim() - 1)))
                tensors[f"{name}.weight"] = quantize_integer(w, op.weight.channel_formats()[0], w_frac).to(torch.int64)
                b_fmt = None
                if op.bias is not None:
                    b_fmt = op.bias.format()
                    tensors[f"{name}.bias"] = quantize_integer(op.base.bias.double(), b_fmt).to(torch.int64)
                    rec["bias_format"] = _fmt_json(b_fmt)
                fan_in = w[0].numel()
                if op.kind == "conv2d":
                    base = op.base
                    rec.update(stride=list(base.stride), dilation=list(base.dilation), groups=base.groups,
                               padding=op.padding(torch.Size(g["input_shape"])))
                bits = _acc_bits(op, in_fmts[0], fan_in, b_fmt)
            elif isinstance(op, QfxBatchNorm):
                a, b = op.affine()
                tensors[f"{name}.scale"] = quantize_integer(a.double(), op.scale.format()).to(torch.int64)
                tensors[f"{name}.shift"] = quantize_integer(b.double(), op.shift.format()).to(torch.int64)
                rec.update(scale_format=_fmt_json(op.scale.format()), shift_format=_fmt_json(op.shift.format()))
                bits = in_fmts[0].width + op.scale.format().width + 1
            elif isinstance(op, QfxAvgPool):
                h, w_ = g["input_shape"][-2:]
                r_fmt = op.reciprocal.format()
                tensors[f"{name}.reciprocal"] = quantize_integer(torch.tensor([1.0 / (h * w_)], dtype=torch.float64),
                                                                 r_fmt).to(torch.int64)
                rec["reciprocal_format"] = _fmt_json(r_fmt)
                bits = in_fmts[0].width + math.ceil(math.log2(h * w_)) + r_fmt.width
            elif isinstance(op, (QfxActivation, QfxAdd)):
                bits = max(f.width for f in in_fmts) + 1 + abs(in_fmts[0].frac_bits - in_fmts[-1].frac_bits)
            else:
                raise DeltatuneError(f"qfx_export: {name} ({type(op).__name__}) has no integer form")
            if bits > EXACT_BITS:
                raise DeltatuneError(f"qfx_export: {name} accumulates {bits} bits, more than the {EXACT_BITS} that "
                                     f"float64 emulation holds exactly; use narrower types")
            formats[name] = op.output.format()
            records.append(rec)
    if not spec["complete"]:
        raise DeltatuneError(f"qfx_export: the model's output is not the result of a quantised op (the last is "
                             f"{graph[-1]['op']}): a float operation follows it; quantise every op up to the output")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "output": names[-1], "ops": records}
    atomic_write_bytes(folder / "qfx.json", (json.dumps(doc, indent=1) + "\n").encode())
    tmp = folder / "weights.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(folder / "weights.safetensors")
    if header:
        atomic_write_bytes(folder / "weights.h", _header(records, tensors).encode())
    return folder


def _header(records: list[dict], tensors: dict[str, torch.Tensor]) -> str:
    lines = ["// fixed-point weights written by deltatune.quant.qfx_export", "#include <ap_fixed.h>", ""]
    for rec in records:
        for part in ("weight", "bias", "scale", "shift", "reciprocal"):
            key = f"{rec['name']}.{part}"
            if key not in tensors:
                continue
            doc = dict(rec[f"{part}_format"])
            ident = key.replace(".", "_")
            values = ", ".join(str(int(v)) for v in tensors[key].flatten().tolist())
            # the integers are the types' raw bits (value = raw * 2^-F), set through .range() on
            # the target; a per-channel type lists each channel's integer bits
            lines.append(f"// {key}: {list(tensors[key].shape)}")
            if isinstance(doc["int_bits"], list):
                per_channel = doc.pop("int_bits")
                lines.append(f"static const int {ident}_int_bits[{len(per_channel)}] = "
                             f"{{{', '.join(map(str, per_channel))}}};  // ap_fixed<{doc['width']}, I_c>")
                doc["int_bits"] = max(per_channel)
            lines.append(f"typedef {_fmt(doc).hls()} {ident}_t;")
            lines.append(f"static const long long {ident}_raw[{tensors[key].numel()}] = {{{values}}};")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- integer arithmetic

def int_cast(k: np.ndarray, frac, fmt: FixedFormat) -> np.ndarray:
    """Integers ``k`` with ``frac`` fraction bits (a number, or an array broadcasting against
    ``k``: per-channel types) assigned to ``fmt``: integer shifts only."""
    k = np.asarray(k, dtype=np.int64)
    d = np.asarray(frac, dtype=np.int64) - fmt.frac_bits
    if (d >= 63).any():         # every bit is dropped
        if not (d >= 63).all():
            raise DeltatuneError("integer_infer: a cast drops 63 bits or more from some channels only")
        return _overflow(_round_all_dropped(k, fmt), fmt)
    left, right = np.maximum(-d, 0), np.maximum(d, 0)
    _check_shift(k, int(left.max()) if left.size else 0)
    k = k << left
    n = k >> right                                         # arithmetic: floor
    rem = k - (n << right)                                 # the dropped bits, in [0, 2^right)
    half = np.int64(1) << np.maximum(right - 1, 0)         # right = 0: rem is 0 and nothing rounds
    return _overflow(n + _round_up(n, rem, half, k < 0, fmt.quant).astype(np.int64), fmt)


def _round_all_dropped(k: np.ndarray, fmt: FixedFormat) -> np.ndarray:
    # |v| < 2^-1 whenever 63+ bits are dropped from an int64 (|k| < 2^63): rounding gives 0,
    # truncation floor(v): -1 for negatives, 0 otherwise
    if fmt.quant == "AP_TRN":
        return np.where(k < 0, -1, 0).astype(np.int64)
    return np.zeros_like(k)


def _round_up(n, rem, half, negative, quant: str) -> np.ndarray:
    if quant == "AP_TRN":
        return np.zeros_like(rem, dtype=bool)
    if quant == "AP_TRN_ZERO":
        return negative & (rem > 0)
    if quant == "AP_RND":
        return rem >= half
    if quant == "AP_RND_ZERO":
        return (rem > half) | ((rem == half) & negative)
    if quant == "AP_RND_INF":
        return (rem > half) | ((rem == half) & ~negative)
    if quant == "AP_RND_MIN_INF":
        return rem > half
    return (rem > half) | ((rem == half) & ((n & 1) == 1))      # AP_RND_CONV


def _overflow(k: np.ndarray, fmt: FixedFormat) -> np.ndarray:
    lo, hi = fmt.int_min, fmt.int_max
    if fmt.overflow == "AP_WRAP":
        mask = np.int64((1 << fmt.width) - 1) if fmt.width < 63 else np.int64(-1)
        low = k & mask
        if fmt.signed and fmt.width < 63:
            low = np.where(low > hi, low - (np.int64(1) << np.int64(fmt.width)), low)
        return low
    if fmt.overflow == "AP_SAT_ZERO":
        return np.where((k < lo) | (k > hi), 0, k).astype(np.int64)
    if fmt.overflow == "AP_SAT_SYM" and fmt.signed:
        lo = -hi
    return np.clip(k, lo, hi).astype(np.int64)


def _check_shift(k: np.ndarray, shift: int) -> None:
    top = int(np.abs(k).max()) if k.size else 0
    if top and top.bit_length() + shift > INT64_BITS:
        raise DeltatuneError(f"integer_infer: aligning by {shift} bits overflows int64 (values of "
                             f"{top.bit_length()} bits); use types with closer binary points")


def _align(k: np.ndarray, frac, to) -> np.ndarray:
    shift = np.asarray(to, dtype=np.int64) - np.asarray(frac, dtype=np.int64)
    _check_shift(k, int(shift.max()))
    return k << shift


def _conv(x: np.ndarray, w: np.ndarray, stride, dilation, groups: int, padding) -> np.ndarray:
    left, right, top, bottom = padding
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    ho = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, groups, o // groups, ho, wo), dtype=np.int64)
    wg = w.reshape(groups, o // groups, cg, kh, kw)
    for i in range(kh):
        for j in range(kw):
            ys, xs = i * dilation[0], j * dilation[1]
            patch = x[:, :, ys:ys + stride[0] * (ho - 1) + 1:stride[0], xs:xs + stride[1] * (wo - 1) + 1:stride[1]]
            patch = patch.reshape(n, groups, cg, ho, wo)
            out += np.einsum("ngchw,goc->ngohw", patch, wg[:, :, :, i, j])
    return out.reshape(n, o, ho, wo)


def integer_infer(folder: str | Path, inputs: torch.Tensor) -> IntegerResult:
    """Run the exported model on ``inputs`` (a float tensor, assigned once to the input type) in
    numpy int64; returns the output integers and their fraction bits."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    spec_path, weights_path = folder / "qfx.json", folder / "weights.safetensors"
    if not spec_path.is_file() or not weights_path.is_file():
        raise DeltatuneError(f"integer_infer: {folder} lacks qfx.json or weights.safetensors; write it with "
                             f"dt.qfx_export(model, folder)")
    spec = json.loads(spec_path.read_text())
    if spec.get("format") != FORMAT_NAME or spec.get("version") != FORMAT_VERSION:
        raise DeltatuneError(f"integer_infer: {spec_path} is not a {FORMAT_NAME} v{FORMAT_VERSION} file")
    weights = load_file(str(weights_path))
    x_float = inputs.detach().to(torch.float64).cpu()
    values: dict[str, tuple[np.ndarray, int]] = {}
    for rec in spec["ops"]:
        name, kind, out_fmt = rec["name"], rec["kind"], _fmt(rec["output_format"])
        srcs = []
        for s in rec["sources"]:
            if s == "input":
                fmt = _fmt(rec["input_format"])
                srcs.append((quantize_integer(x_float, fmt).to(torch.int64).numpy(), fmt.frac_bits))
            else:
                srcs.append(values[s])
        (k, f) = srcs[0]
        if kind in ("conv2d", "linear"):
            w = weights[f"{name}.weight"]
            acc = (_conv(k, w, rec["stride"], rec["dilation"], rec["groups"], rec["padding"]) if kind == "conv2d"
                   else k @ w.T)
            frac = f + _frac(rec["weight_format"], acc.ndim)        # per output channel, or one number
            if f"{name}.bias" in weights:
                b_fmt = _fmt(rec["bias_format"])
                bias = weights[f"{name}.bias"].reshape((1, -1, 1, 1) if kind == "conv2d" else (1, -1))
                to = np.maximum(frac, b_fmt.frac_bits)
                acc, frac = _align(acc, frac, to) + _align(bias, b_fmt.frac_bits, to), to
        elif kind == "affine":
            a_fmt, b_fmt = _fmt(rec["scale_format"]), _fmt(rec["shift_format"])
            prod, frac = k * weights[f"{name}.scale"].reshape(1, -1, 1, 1), f + a_fmt.frac_bits
            to = max(frac, b_fmt.frac_bits)
            acc, frac = _align(prod, frac, to) + _align(weights[f"{name}.shift"], b_fmt.frac_bits, to).reshape(
                1, -1, 1, 1), to
        elif kind in ("relu", "relu6"):
            frac = np.maximum(f, 0)     # so that 6 is an integer number of LSBs
            acc = np.maximum(_align(k, f, frac), 0)
            if kind == "relu6":
                acc = np.minimum(acc, np.int64(6) << np.asarray(frac, dtype=np.int64))
        elif kind == "add":
            (k2, f2) = srcs[1]
            frac = np.maximum(f, f2)
            acc = _align(k, f, frac) + _align(k2, f2, frac)
        elif kind == "avgpool":
            r_fmt = _fmt(rec["reciprocal_format"])
            acc, frac = k.sum(axis=(2, 3)) * weights[f"{name}.reciprocal"][0], f + r_fmt.frac_bits
        else:
            raise DeltatuneError(f"integer_infer: op {name} has unknown kind {kind!r}")
        values[name] = (int_cast(acc, frac, out_fmt), out_fmt.frac_bits)
    out, frac = values[spec["output"]]
    return IntegerResult(out, frac)
