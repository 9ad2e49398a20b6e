"""Adapter diagnostics: what a fine-tune did to each weight matrix.

For every weight matrix a fine-tune changed (each layer an adapter wraps, or each matrix of two
plain models for a full fine-tune) this reports, on the layer's 2-D weight view ``(out, fan_in)``
(core.layers) and in float64:

- ``‖W0‖_F``, ``‖ΔW‖_F`` and their ratio, where ``W0`` is the frozen (pretrained) weight and
  ``ΔW`` the update (``W_tuned = W0 + ΔW``);
- the singular values of ``ΔW``, its numerical rank and its *effective rank* (Roy & Vetterli,
  "The effective rank: a measure of effective dimensionality", 2007): ``exp(H(p))`` with
  ``p_i = σ_i / Σ_j σ_j`` and ``H`` the Shannon entropy; it is 1 for a rank-1 update and
  ``n`` for ``n`` equal singular values;
- the *intruder dimensions* of "LoRA vs Full Fine-tuning: An Illusion of Equivalence"
  (Shuttleworth et al., 2024): among the top ``k`` left singular vectors of ``W_tuned``, those
  whose largest ``|cosine|`` with every left singular vector of ``W0`` is below ``epsilon``.
  Singular vectors have no sign, hence the absolute value. Both sides use only the singular
  vectors of a nonzero singular value (to the numerical rank): those of a zero one are any basis
  of a null space, a choice of the SVD routine rather than a property of the matrix. A direction
  outside ``W0``'s column space is therefore always new.

``scale_intruders`` applies the paper's intervention: the intruder components of the tuned
weight are scaled down, ``W' = W_tuned - (1 - factor) Σ_{i ∈ intruders} σ_i u_i v_iᵀ``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .core.errors import DeltatuneError
from .core.layers import WeightBackup, from_2d, kind_of, to_2d
from .core.matching import adapters, layer_index, unwrap, walk, wrappers
from .core.registry import get_method
from .core.weights import WeightDelta, frozen_2d
from .core.wrapper import BiasDelta, DeltaLayer, ModuleCopies
from .files import atomic_write_bytes

# layer kinds whose weight is a matrix (a map of one hidden state to another) by default in
# diagnose_weights: an embedding table's "input" is a vocabulary, outside what the paper studies
MATRIX_KINDS = ("linear", "conv", "conv1d_gpt2")
FULL = "full"       # the adapter column of a full fine-tune's rows


@dataclasses.dataclass(frozen=True)
class LayerDiagnosis:
    """One weight matrix of one adapter (or of a full fine-tune). ``shape`` is the 2-D view
    ``(out, fan_in)``; norms are Frobenius norms; ``singular_values`` is the whole spectrum of
    ``ΔW``, descending; ``max_cosines[i]`` is the largest ``|cos|`` between the ``i``-th left
    singular vector of ``W_tuned`` and any left singular vector of ``W0`` (top ``k`` only), and
    ``intruder_indices`` the positions (0-based) where it is below ``epsilon``. ``merged``: the
    adapter is folded into the base weight, so ``ΔW`` is the stored weight minus the weight the
    layer had before its first merge (every adapter merged into it, and any edit since)."""
    layer: str
    adapter: str
    method: str
    shape: tuple[int, int]
    base_norm: float
    delta_norm: float
    relative_norm: float
    effective_rank: float
    numerical_rank: int
    singular_values: tuple[float, ...]
    max_cosines: tuple[float, ...]
    intruder_indices: tuple[int, ...]
    merged: bool = False

    @property
    def intruders(self) -> int:
        return len(self.intruder_indices)


@dataclasses.dataclass(frozen=True)
class SkippedLayer:
    """A wrapped module with no weight matrix to decompose, and why."""
    layer: str
    adapter: str
    method: str
    reason: str


@dataclasses.dataclass(frozen=True)
class AdapterTotals:
    adapter: str
    method: str
    layers: int
    intruders: int
    layers_with_intruders: int
    mean_relative_norm: float
    mean_effective_rank: float


@dataclasses.dataclass
class Diagnosis:
    """What ``diagnose`` and ``diagnose_weights`` return: one row per (layer, adapter)."""
    k: int
    epsilon: float
    layers: list[LayerDiagnosis]
    skipped: list[SkippedLayer] = dataclasses.field(default_factory=list)
    plots: list[Path] = dataclasses.field(default_factory=list)

    def adapters(self) -> list[str]:
        return list(dict.fromkeys([r.adapter for r in self.layers] + [s.adapter for s in self.skipped]))

    def rows(self, adapter: str | None = None) -> list[LayerDiagnosis]:
        return [r for r in self.layers if adapter is None or r.adapter == adapter]

    def intruders(self, adapter: str | None = None) -> int:
        """Intruder dimensions summed over layers (of one adapter, or of all)."""
        return sum(r.intruders for r in self.rows(adapter))

    def totals(self) -> list[AdapterTotals]:
        out = []
        for a in self.adapters():
            rows = self.rows(a)
            methods = {r.method for r in rows} | {s.method for s in self.skipped if s.adapter == a}
            out.append(AdapterTotals(
                adapter=a, method=",".join(sorted(methods)), layers=len(rows), intruders=sum(r.intruders for r in rows),
                layers_with_intruders=sum(1 for r in rows if r.intruders),
                mean_relative_norm=sum(r.relative_norm for r in rows) / len(rows) if rows else 0.0,
                mean_effective_rank=sum(r.effective_rank for r in rows) / len(rows) if rows else 0.0))
        return out

    def table(self) -> str:
        head = ("layer", "adapter", "shape", "|W0|", "|dW|", "|dW|/|W0|", "erank", "rank", "s1(dW)", "s2(dW)",
                "s3(dW)", f"intruders/{self.k}")
        lines = [head]
        for r in self.layers:
            s = list(r.singular_values[:3]) + [None] * (3 - min(3, len(r.singular_values)))
            lines.append((r.layer, r.adapter + (" (merged)" if r.merged else ""), f"{r.shape[0]}x{r.shape[1]}",
                          f"{r.base_norm:.4g}", f"{r.delta_norm:.4g}", f"{r.relative_norm:.3e}",
                          f"{r.effective_rank:.2f}", str(r.numerical_rank),
                          *("-" if v is None else f"{v:.3e}" for v in s), str(r.intruders)))
        widths = [max(len(row[c]) for row in lines) for c in range(len(head))]
        text = []
        for i, row in enumerate(lines):
            text.append("  ".join(c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
                        .rstrip())
            if i == 0:
                text.append("  ".join("-" * w for w in widths))
        for t in self.totals():
            who = "full fine-tune" if t.method == FULL else f"adapter {t.adapter} ({t.method})"
            text.append(f"{who}: {t.intruders} intruder dimensions in {t.layers_with_intruders} "
                        f"of {t.layers} layers (top {self.k} left singular vectors of each tuned weight, |cos| < "
                        f"{self.epsilon:g} with every singular vector of the base weight); mean |dW|/|W0| "
                        f"{t.mean_relative_norm:.3e}, mean effective rank {t.mean_effective_rank:.2f}")
        for s in self.skipped:
            text.append(f"skipped {s.layer} ({s.adapter}, {s.method}): {s.reason}")
        return "\n".join(text)

    def __str__(self) -> str:
        return self.table()

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: settings, every row (with ``intruders``), skipped layers, totals."""
        return _plain({"k": self.k, "epsilon": self.epsilon,
                       "layers": [{**dataclasses.asdict(r), "intruders": r.intruders} for r in self.layers],
                       "skipped": [dataclasses.asdict(s) for s in self.skipped],
                       "totals": [dataclasses.asdict(t) for t in self.totals()],
                       "plots": [str(p) for p in self.plots]})

    def plot(self, path: str | os.PathLike) -> list[Path]:
        """One PNG per adapter (see ``write_plot``): ``path`` ending in ``.png`` is the file (one
        adapter only); any other path is a folder, which gets ``diagnosis-<adapter>.png`` each."""
        path = Path(path)
        names = [a for a in self.adapters() if self.rows(a)]
        if not names:
            raise DeltatuneError("nothing to plot: no layer with a weight matrix was diagnosed")
        if path.suffix.lower() == ".png":
            if len(names) > 1:
                raise DeltatuneError(f"plot={str(path)!r} names one PNG file but {len(names)} adapters were diagnosed "
                                     f"({', '.join(names)}); give a folder (one PNG per adapter) or name= one adapter")
            files = {names[0]: path}
        else:
            files = {a: path / f"diagnosis-{re.sub(r'[^A-Za-z0-9_.-]', '_', a)}.png" for a in names}
        written = [write_plot(self, a, f) for a, f in files.items()]
        self.plots.extend(written)
        return written


def _plain(value: Any) -> Any:
    """``value`` as JSON reads it back: tuples as lists, and None for a non-finite number (a
    relative norm over a zero base weight), which strict JSON cannot hold."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ----------------------------------------------------------------------------- one matrix

def _spectrum(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(m) if m.numel() else m.new_zeros(0)


def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank ``exp(H(σ / Σσ))``; 0 for a zero matrix."""
    s = singular_values.double().clamp_min(0)
    total = float(s.sum())
    if total == 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Singular values above ``σ_max · max(out, fan_in) · eps(dtype)``, ``dtype`` being what the
    weights are stored in: a float32 layer's values carry float32 rounding, not float64's."""
    if singular_values.numel() == 0:
        return 0
    eps = torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps
    tol = float(singular_values.max()) * max(shape) * eps
    return int((singular_values > tol).sum())


def _left_vectors(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The left singular vectors of ``m`` with a nonzero singular value (to its numerical rank):
    those of a zero singular value are any basis of a null space, not a property of ``m``."""
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    return u[:, :numerical_rank(s, (int(m.shape[0]), int(m.shape[1])), dtype)]


def intruder_cosines(w0: torch.Tensor, tuned: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """For each of the top ``k`` left singular vectors of ``tuned``, its largest ``|cos|`` with
    any left singular vector of ``w0`` (both float64 2-D; ``dtype``: what the weights are stored
    in, which sets the numerical rank)."""
    u0 = _left_vectors(w0, dtype)
    u = _left_vectors(tuned, dtype)[:, :k]
    if u0.shape[1] == 0:        # a zero base weight: every direction of the tuned one is new
        return u.new_zeros(u.shape[1])
    return (u.T @ u0).abs().amax(dim=1)


def layer_diagnosis(layer: str, adapter: str, method: str, w0: torch.Tensor, delta: torch.Tensor, k: int,
                    epsilon: float, dtype: torch.dtype = torch.float32, merged: bool = False) -> LayerDiagnosis:
    """The row of one weight matrix: ``w0`` the base weight and ``delta`` its update, 2-D."""
    w0, delta = w0.detach().to("cpu", torch.float64), delta.detach().to("cpu", torch.float64)
    if w0.dim() != 2 or w0.shape != delta.shape:
        raise DeltatuneError(f"{layer}: the base weight {tuple(w0.shape)} and its update {tuple(delta.shape)} must be "
                             f"2-D matrices of one shape")
    s = _spectrum(delta)
    cos = intruder_cosines(w0, w0 + delta, k, dtype)
    base_norm, delta_norm = float(w0.norm()), float(delta.norm())
    shape = (int(w0.shape[0]), int(w0.shape[1]))
    return LayerDiagnosis(
        layer=layer, adapter=adapter, method=method, shape=shape, base_norm=base_norm, delta_norm=delta_norm,
        relative_norm=delta_norm / base_norm if base_norm > 0 else math.inf if delta_norm > 0 else 0.0,
        effective_rank=effective_rank(s), numerical_rank=numerical_rank(s, shape, dtype),
        singular_values=tuple(float(v) for v in s), max_cosines=tuple(float(c) for c in cos),
        intruder_indices=tuple(int(i) for i in (cos < epsilon).nonzero().flatten()), merged=merged)


def _check_settings(k: int, epsilon: float) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DeltatuneError(f"k={k!r}: the number of top singular vectors to test must be an integer >= 1 (the paper "
                             f"uses 10)")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 < epsilon <= 1:
        raise DeltatuneError(f"epsilon={epsilon!r}: the cosine threshold must be a number in (0, 1] (e.g. 0.5)")


# ----------------------------------------------------------------------------- adapters

def _original_2d(w: DeltaLayer) -> torch.Tensor:
    """The layer's weight as attach found it: the backup taken at the first merge, if any."""
    backup = w.backup
    if backup is None:
        return frozen_2d(w.base, w.kind).detach()
    if isinstance(backup, WeightBackup):
        return to_2d(backup.weight, w.kind).detach()
    module = getattr(backup, "module", None)       # a quantised layer keeps the original module
    if isinstance(module, nn.Module):
        return frozen_2d(module, w.kind).detach()
    raise DeltatuneError(f"cannot read the pre-merge weight of a {type(w.base).__name__} from its "
                         f"{type(backup).__name__}; dt.unmerge(model) first, then diagnose")


def _names(model: nn.Module, name: str | list[str] | None) -> list[str]:
    known = adapters(model)
    if not known:
        raise DeltatuneError("the model has no adapter attached: dt.attach or dt.load_adapter one first (to compare "
                             "two plain models, a full fine-tune with its base, use diagnose_weights)")
    names = list(known) if name is None else [name] if isinstance(name, str) else list(name)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DeltatuneError(f"no adapter named {', '.join(map(repr, unknown))}; attached: {', '.join(known)}")
    return names


def _skip_reason(w: DeltaLayer, delta: nn.Module, method_name: str) -> str | None:
    method = get_method(method_name)
    if w.kind == "block":
        return "not a weight delta (it acts on a block's output)"
    if not method.foldable:
        return ("not a weight delta (it changes the input sequence)" if method.changes_sequence
                else "not a weight delta (its output is not a function of the weights alone)")
    if isinstance(delta, BiasDelta):
        return "a bias shift only (no weight matrix changes)"
    if w.kind == "norm":
        return "a 1-D normalisation weight (no matrix to decompose)"
    return None


@torch.no_grad()
def adapter_delta(w: DeltaLayer, name: str, w0: torch.Tensor | None = None) -> torch.Tensor:
    """``ΔW`` (float64, 2-D view) of adapter ``name`` on wrapped layer ``w``, computed from the
    weight the layer had before any merge: ``delta_2d`` of a weight delta, else the difference
    its ``merge`` makes to that weight."""
    delta = w.deltas[name]
    w0 = (_original_2d(w) if w0 is None else w0).double()
    if isinstance(delta, WeightDelta):
        return delta.delta_2d(w0)
    bias = getattr(w.backup, "bias", None) if isinstance(w.backup, WeightBackup) else getattr(w.base, "bias", None)
    merged, _ = delta.merge(w0.clone(), None if bias is None else bias.double())
    return merged - w0


@torch.no_grad()
def diagnose(model: nn.Module, name: str | list[str] | None = None, k: int = 10, epsilon: float = 0.5,
             plot: str | os.PathLike | None = None) -> Diagnosis:
    """Per-layer norms, spectra, effective rank and intruder dimensions of the adapters on
    ``model`` (``name``: one adapter or a list; default every attached adapter), one row per
    wrapped layer with a weight matrix. ``plot``: a folder (one PNG per adapter) or a ``.png``
    file. Intruder dimensions as defined in "LoRA vs Full Fine-tuning: An Illusion of
    Equivalence" (see the module docstring)."""
    _check_settings(k, epsilon)
    names = _names(model, name)
    known = adapters(model)
    rows, skipped = [], []
    for mod_name, w in wrappers(model):
        present = [n for n in names if n in w.deltas]
        if not present:
            continue
        w0 = None
        for n in present:
            method = known[n].method
            reason = _skip_reason(w, w.deltas[n], method)
            if reason is not None:
                skipped.append(SkippedLayer(mod_name, n, method, reason))
                continue
            if w0 is None:
                w0 = _original_2d(w).double()
            merged = n in w.merged
            if merged:
                # after a merge (and any edit of the merged weight, scale_intruders) the stored
                # weight is what runs: its difference from the pre-merge weight is the update
                delta = frozen_2d(w.base, w.kind).double() - w0
            else:
                delta = adapter_delta(w, n, w0)
            rows.append(layer_diagnosis(mod_name, n, method, w0, delta, k, epsilon, w.base.weight.dtype, merged))
    diag = Diagnosis(k=k, epsilon=float(epsilon), layers=rows, skipped=skipped)
    if plot is not None:
        diag.plot(plot)
    return diag


# ----------------------------------------------------------------------------- plain models

def matrix_modules(model: nn.Module, kinds: Iterable[str] = MATRIX_KINDS) -> dict[str, nn.Module]:
    """Module name -> module, for every module of ``model`` whose layer kind is in ``kinds``."""
    kinds = tuple(kinds)
    out = {}
    for mod_name, module, _, _ in walk(model):
        kind = kind_of(module)
        if kind is not None and kind.name in kinds and isinstance(getattr(module, "weight", None), torch.Tensor):
            out[mod_name] = module
    return out


def block_layers(model: nn.Module, kinds: Iterable[str] = MATRIX_KINDS) -> list[str]:
    """The matrix modules inside the repeated blocks (a name with a layer index: attention and
    feed-forward projections), leaving out embeddings, poolers and task heads."""
    return [n for n in matrix_modules(model, kinds) if layer_index(n) is not None]


@torch.no_grad()
def diagnose_weights(base_model: nn.Module, tuned_model: nn.Module, k: int = 10, epsilon: float = 0.5,
                     modules: Iterable[str] | None = None, label: str = FULL,
                     plot: str | os.PathLike | None = None) -> Diagnosis:
    """The same table for two plain models of one architecture (a full fine-tune and its base):
    ``ΔW = W_tuned - W0`` for each matrix module (``modules``: these names; default every
    Linear, convolution and GPT-2 Conv1D of ``base_model``). ``label`` fills the adapter column."""
    _check_settings(k, epsilon)
    for what, m in (("base_model", base_model), ("tuned_model", tuned_model)):
        if adapters(m) or any(isinstance(x, (DeltaLayer, ModuleCopies)) for x in m.modules()):
            raise DeltatuneError(f"{what} has adapters attached; diagnose_weights compares stored weights of plain "
                                 f"models: use dt.diagnose(model) for adapters, or dt.unload(model) first")
    base_mods, tuned_mods = matrix_modules(base_model, kinds=("linear", "conv", "conv1d_gpt2", "embedding")), \
        matrix_modules(tuned_model, kinds=("linear", "conv", "conv1d_gpt2", "embedding"))
    names = [n for n in matrix_modules(base_model)] if modules is None else list(modules)
    if not names:
        raise DeltatuneError("no weight matrix to compare: the models have no Linear, convolution or Conv1D module "
                             "(or modules= is empty)")
    rows = []
    for n in names:
        if n not in base_mods or n not in tuned_mods:
            where = "base_model" if n not in base_mods else "tuned_model"
            raise DeltatuneError(f"module {n!r} is not a weight matrix of {where}; modules= takes names of Linear, "
                                 f"convolution, Conv1D or Embedding modules present in both models")
        b, t = base_mods[n], tuned_mods[n]
        kind = kind_of(b).name
        if kind_of(t) is None or kind_of(t).name != kind or b.weight.shape != t.weight.shape:
            raise DeltatuneError(f"module {n!r} differs between the models ({type(b).__name__} "
                                 f"{tuple(b.weight.shape)} vs {type(t).__name__} {tuple(t.weight.shape)}); "
                                 f"diagnose_weights compares two models of one architecture")
        w0 = frozen_2d(b, kind).double()
        w1 = frozen_2d(t, kind).double().to(w0.device)
        rows.append(layer_diagnosis(n, label, FULL, w0, w1 - w0, k, epsilon, b.weight.dtype))
    diag = Diagnosis(k=k, epsilon=float(epsilon), layers=rows)
    if plot is not None:
        diag.plot(plot)
    return diag


# ----------------------------------------------------------------------------- intervention

@dataclasses.dataclass(frozen=True)
class ScaledLayer:
    """A layer whose intruder components ``scale_intruders`` scaled: ``intruder_indices`` among
    the top ``k`` singular vectors of the merged weight, their singular values before, and
    ``‖W' - W‖_F``."""
    layer: str
    adapters: tuple[str, ...]
    intruder_indices: tuple[int, ...]
    singular_values: tuple[float, ...]
    change_norm: float


@torch.no_grad()
def scale_intruders(model: nn.Module, factor: float = 0.0, name: str | list[str] | None = None, k: int = 10,
                    epsilon: float = 0.5, quantized: str | None = None) -> list[ScaledLayer]:
    """Scale the intruder dimensions of the tuned weights down by ``factor`` (0: remove them,
    1: leave them), the intervention of "LoRA vs Full Fine-tuning: An Illusion of Equivalence":
    ``W' = W_tuned - (1 - factor) Σ_{i ∈ intruders} σ_i u_i v_iᵀ`` with ``σ_i, u_i, v_i`` from the
    SVD of ``W_tuned`` and intruders found as in ``diagnose``.

    ``W'`` is not a LoRA's ``W0 + B A`` any more, so the adapters (``name``; default the active
    ones) are first merged (``dt.merge``, ``quantized`` as there) and the merged weights edited in
    place: the result is a merged model. ``dt.unmerge(model)`` still restores the base weights
    bit for bit (from the copy ``dt.merge`` took before the first merge), undoing the merge and
    the edit together; ``dt.unload(model)`` returns the edited plain model. Removing intruders
    can move other singular vectors into the top ``k``; ``diagnose`` after this recounts.
    Returns the layers that changed."""
    from .core.activation import active_adapters
    from .core.merging import merge

    _check_settings(k, epsilon)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 <= factor <= 1:
        raise DeltatuneError(f"factor={factor!r}: the scale of the intruder components must be a number in [0, 1] "
                             f"(0 removes them, 1 keeps them)")
    names = _names(model, name) if name is not None else active_adapters(model)
    if not names:
        raise DeltatuneError("no active adapter to merge and edit; name= the adapter (dt.set_active or name=...)")
    merge(model, names, quantized=quantized)
    changed = []
    for mod_name, w in wrappers(model):
        merged = [n for n in w.merged if n in names]
        if not merged or all(_skip_reason(w, w.deltas[n], adapters(model)[n].method) for n in merged):
            continue
        w0 = _original_2d(w).double()
        weight = kind_of(w.base).weight(w.base)
        tuned = to_2d(weight, w.kind).double().to(w0.device)
        cos = intruder_cosines(w0, tuned, k, w.base.weight.dtype)
        hits = (cos < epsilon).nonzero().flatten()
        if hits.numel() == 0 or factor == 1:
            continue
        u, s, vh = torch.linalg.svd(tuned, full_matrices=False)
        removed = (u[:, hits] * s[hits]) @ vh[hits]
        edited = tuned - (1 - factor) * removed
        bias = getattr(w.base, "bias", None)
        w.base, _ = kind_of(w.base).store(w.base, from_2d(edited, weight, w.kind), None if bias is None else bias.double(),
                                          quantized)
        changed.append(ScaledLayer(mod_name, tuple(merged), tuple(int(i) for i in hits),
                                   tuple(float(s[i]) for i in hits), float(((1 - factor) * removed).norm())))
    return changed


# ----------------------------------------------------------------------------- plot

def short_names(names: list[str]) -> list[str]:
    """Layer labels for a plot: ``L<index>`` plus the fewest trailing name parts that still tell
    the layers of one block apart (``L3 query``, ``L3 attention.output.dense``, ``L3 output.dense``)."""
    parts = [n.split(".") for n in names]

    def key(i: int, j: int) -> tuple:
        return layer_index(names[i]), tuple(parts[i][-j:])

    labels = []
    for i, p in enumerate(parts):
        idx = layer_index(names[i])
        for j in range(1, len(p) + 1):
            tail = p[-j:]
            if idx is not None and str(idx) in tail:
                tail = tail[tail.index(str(idx)) + 1:] or tail
            if all(key(m, j) != key(i, j) for m in range(len(names)) if m != i) or j == len(p):
                labels.append((f"L{idx} " if idx is not None else "") + ".".join(tail))
                break
    return labels


def write_plot(diag: Diagnosis, adapter: str, path: str | os.PathLike, max_values: int = 64) -> Path:
    """A PNG for one adapter: left, the top singular values of ``ΔW`` per layer (twice the
    largest numerical rank, at least 16, at most ``max_values``; a heat map, log colour scale;
    grey where a value is zero to the layer's numerical rank; a red tick at the effective rank),
    right, the intruder count per layer. Written atomically (matplotlib's Agg canvas, no display
    or global backend needed)."""
    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = diag.rows(adapter)
    if not rows:
        raise DeltatuneError(f"no diagnosed layer for adapter {adapter!r}; diagnosed: {', '.join(diag.adapters())}")
    # twice the largest rank (at least 16) shows where a low-rank update ends without a wall of grey
    shown = max(16, 2 * max(r.numerical_rank for r in rows))
    n_values = max(1, min(max_values, shown, max(len(r.singular_values) for r in rows)))
    grid = np.full((len(rows), n_values), np.nan)
    for i, r in enumerate(rows):
        keep = min(r.numerical_rank, n_values)
        grid[i, :keep] = r.singular_values[:keep]
    positive = grid[np.isfinite(grid) & (grid > 0)]
    height = max(3.8, 2.2 + 0.26 * len(rows))
    fig = Figure(figsize=(11, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(1, 2, width_ratios=[3, 1], sharey=True)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.88")
    y = np.arange(len(rows))
    if positive.size:
        mesh = ax.pcolormesh(np.arange(n_values + 1) + 0.5, np.arange(len(rows) + 1) - 0.5, np.ma.masked_invalid(grid),
                             cmap=cmap, norm=LogNorm(vmin=positive.min(), vmax=positive.max()), shading="flat")
        fig.colorbar(mesh, ax=ax, location="bottom", pad=0.02, fraction=0.06, aspect=50).set_label("σ of ΔW (log scale)")
    else:
        ax.text(0.5, 0.5, "ΔW = 0 in every layer", transform=ax.transAxes, ha="center", va="center")
    erank = [min(r.effective_rank, n_values) for r in rows]
    ax.scatter([e + 0.5 for e in erank], y, marker="|", s=90, linewidths=2, color="tab:red", label="effective rank")
    ax.set_xlim(0.5, n_values + 0.5)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_yticks(y, short_names([r.layer for r in rows]), fontsize=8)
    ax.set_xlabel(f"index of the singular value of ΔW (top {n_values}; grey: zero, past the numerical rank)")
    ax.set_title("singular values of ΔW per layer", fontsize=10)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    counts = [r.intruders for r in rows]
    bx.barh(y, counts, color=["tab:red" if c else "0.6" for c in counts], height=0.7)
    bx.set_xlim(0, max(diag.k, 1) + 0.8)
    bx.xaxis.set_major_locator(MaxNLocator(integer=True))
    bx.tick_params(axis="y", left=False)
    bx.set_xlabel(f"count (of the top {diag.k}, |cos| < {diag.epsilon:g})")
    bx.set_title("intruder dimensions", fontsize=10)
    for yi, c in zip(y, counts):
        bx.text(c + 0.15, yi, str(c), va="center", fontsize=8)
    bx.grid(True, axis="x", alpha=0.3)
    method = ",".join(sorted({r.method for r in rows}))
    total = sum(counts)
    who = "full fine-tune" if method == FULL else f"adapter {adapter} ({method})"
    fig.suptitle(f"{who}: {total} intruder dimensions in {sum(1 for c in counts if c)} of "
                 f"{len(rows)} layers", fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())
