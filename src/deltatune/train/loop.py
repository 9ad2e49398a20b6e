"""The training loop behind ``deltatune train``.

A run: load the task (``data.load_task``, fixed 80/20 stratified split), build the classifier
(``model.build_classifier``), attach the method with ``trainable_modules=["classifier"]`` (so the
new head is trained and saved with the adapter), then train with AdamW, a linear warmup over
the first 6 % of optimizer steps followed by linear decay to zero, gradient accumulation and
gradient clipping at norm 1.0. Each epoch evaluates on the test split and writes an atomic
checkpoint (``checkpoint.safetensors``); the end writes the adapter (``dt.save_adapter``) and
``metrics.json`` to the output folder.

Baselines: ``method="full"`` (every parameter of the encoder and the head trains, no adapter)
and ``method="head"`` (a linear probe: only the new head trains on the frozen encoder) are the
two yardsticks every method is measured against. They are not adapters, so they stay out of
deltatune's method registry: ``train`` handles them in one branch (``prepare_baseline``), and
they save no adapter file; their trained parameters are in the checkpoint.

Time budget: with ``budget_seconds`` the run stops once that many seconds were spent in
training steps (loading, tokenizing and evaluation are not counted): the step in progress is
finished, the model is evaluated, and ``metrics.json`` says ``stopped_early: true`` with the
steps and epochs done. The learning-rate schedule is still planned for all ``epochs``, so a
stopped run is the same run cut short, not a shorter run with a faster decay. A partial epoch
writes no checkpoint: ``--resume`` continues from the last complete epoch.

Memory (docs/memory.md): ``gradient_checkpointing`` recomputes each block's activations in the
backward pass instead of keeping them, ``offload_activations`` keeps the saved activations in
host memory (accelerators only), and the ``lm`` task computes its loss a chunk of tokens at a
time unless ``chunked_loss`` is off (``train/activations.py``, ``train/lm.py``). None of them
changes what is computed, so they may differ between a run and its resumption.

Zeroth-order optimizers (``deltatune.optim.is_zeroth_order``, e.g. MeZO) learn from forward passes
alone: each step calls ``optimizer.step(closure)`` with a closure that computes the batch loss
under ``torch.no_grad()``; there is no ``backward``, no gradient clipping, and no gradient
accumulation (each step sees one batch).

Reproducibility: at the start of epoch ``e`` the global torch RNG is seeded from
``(seed, e)`` and the data order comes from a generator seeded from ``(seed, e)``, so a run
resumed from the checkpoint of epoch ``e`` retraces the uninterrupted run exactly (same
dropout masks, same batches, same optimizer state).
"""

from __future__ import annotations

import argparse
import dataclasses
import contextlib
import hashlib
import itertools
import json
import math
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..core.errors import DeltatuneError
from ..core.engine import model_type
from ..optim import OPTIMIZERS, build_optimizer, is_zeroth_order
from .activations import check_offload_device, enable_gradient_checkpointing, offload_activations
from .checkpoint import CHECKPOINT_FILE, CheckpointError, atomic_write_bytes, load_checkpoint, restore, save_checkpoint
from .outputs import StagedOutput, check_writable, stage_output
from .tasks import KINDS, TEXT_TASKS, TaskSetup, setup_task, task_kind

WARMUP_FRACTION = 0.06
MAX_GRAD_NORM = 1.0
CALIBRATION_BATCHES = 8     # what methods that need data before training (LoRA-GA) get: dt.calibrate
METRICS_FILE = "metrics.json"
HEAD = "classifier"
# what a run writes into its folder: an existing one is replaced only with --overwrite
RUN_FILES = (CHECKPOINT_FILE, METRICS_FILE, "adapter_config.json", "adapter.safetensors")
# bf16: matmuls under torch.autocast in bfloat16 (weights, optimizer state and the loss stay fp32)
PRECISIONS = ("fp32", "bf16")
# baselines (not adapters) -> default learning rate. full: the usual BERT fine-tuning rate
# (Devlin et al. sweep 2e-5..5e-5); head: a linear probe on frozen features needs a far larger one
# (a convex problem: 3e-2 and 1e-1 tie, 1e-2 is under-converged after one epoch of BBC News).
# The sweeps behind these numbers are in docs/results/README.md.
BASELINES = {"full": 5e-5, "head": 3e-2}
QFX_CALIBRATION_BATCHES = 8
# a baseline's rate for a model_type where the sweep found another: a convnet fine-tunes at
# ~20x a transformer's rate (EfficientNet-Lite0 on Fashion-MNIST, 1 epoch: 72.6 % at 5e-5,
# 80.8 % at 1e-3); its probe on the 1,280 pooled features wants 3e-3 (81.6 %, test loss 0.54;
# at 3e-2: 79.8 %, loss 2.29, over-confident)
BASELINE_LR_BY_MODEL: dict[str, dict[str, float]] = {"full": {"efficientnet_lite": 1e-3},
                                                     "head": {"efficientnet_lite": 3e-3}}
# the new head of every run trains at the linear probe's rate for the architecture (head_lr None):
# at a method's rate (1e-3 for LoRA) it is still far from converged after an epoch, and the probe
# alone then beats the adapters (BBC News, 1 epoch: LoRA 92.3 % with the head at 1e-3, 96.6 % at
# 3e-2; head-only 96.2 %)


@dataclasses.dataclass
class TrainArgs:
    """Everything a run depends on. ``method_options`` are the method's config fields
    (e.g. ``{"r": 8, "alpha": 16.0, "targets": ["query", "value"]}``); ``lr=None`` means the
    method's default learning rate."""

    model: str | None = None            # None: the task's model (MiniLM for text, see tasks.py)
    data: str = "bbc"
    method: str = "lora"
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    epochs: int = 3
    lr: float | None = None
    batch_size: int = 32
    eval_batch_size: int = 128
    max_length: int = 128
    grad_accum: int = 1
    seed: int = 0
    weight_decay: float = 0.01
    head_dropout: float = 0.1
    head_lr: float | None = None    # the new head's rate; None: the probe's for the architecture, 0: the run's lr
    precision: str = "fp32"
    optimizer: str = "adamw"
    out: str | None = None
    resume: bool = False
    overwrite: bool = False             # replace an existing run in ``out`` (once the new one is complete)
    device: str = "auto"
    progress: bool = True
    budget_seconds: float | None = None
    gradient_checkpointing: bool = False    # recompute activations in the backward pass (activations.py)
    offload_activations: bool = False       # keep saved activations in host memory (accelerators only)
    chunked_loss: bool = True               # the lm task's loss a chunk of tokens at a time (lm.py)
    init_from: str | None = None            # a full fine-tune's run folder: start from its trained model
    quantize_base: str | None = None        # "nf4" | "int8": the frozen base stored quantised (QLoRA's base)
    qfx: str | None = None                  # "W,A": quantisation-aware fine-tuning in fixed point (dt.qfx)
    qfx_khot: int | None = None             # K-hot weights under --qfx
    qfx_point_lr: float = 1e-2              # rate of the learned integer bits under --qfx

    # arguments that may change between an interrupted run and its resumption (the memory
    # options change how a step is computed, not what)
    RESUMABLE_CHANGES = ("out", "resume", "overwrite", "device", "progress", "eval_batch_size", "budget_seconds",
                         "gradient_checkpointing", "offload_activations", "chunked_loss")

    def validate(self) -> None:
        """Check every argument's type and range before anything loads (one clear error each)."""
        for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DeltatuneError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise DeltatuneError(f"--max-length must be an integer >= 2, got {self.max_length!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise DeltatuneError(f"--seed must be an integer in [0, 2**63), got {self.seed!r}")
        for name in ("lr", "head_lr", "budget_seconds"):      # optional positive numbers (head_lr: or 0)
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or not (v > 0 or (v == 0 and name == "head_lr"))):
                kind = "a number >= 0" if name == "head_lr" else "a positive number"
                raise DeltatuneError(f"--{name.replace('_', '-')} must be {kind}, got {v!r}")
        for name, low, high in (("weight_decay", 0.0, math.inf), ("head_dropout", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v < high:
                bound = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g})"
                raise DeltatuneError(f"--{name.replace('_', '-')} must be a finite number {bound}, got {v!r}")
        if self.method in BASELINES and self.method_options:
            raise DeltatuneError(f"--method {self.method} is a baseline without options, got "
                                 f"{sorted(self.method_options)}; drop them or pick an adapter method")
        if self.optimizer not in OPTIMIZERS:
            raise DeltatuneError(f"--optimizer must be one of {', '.join(sorted(OPTIMIZERS))}, got {self.optimizer!r}")
        if self.precision not in PRECISIONS:
            raise DeltatuneError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith(("cuda", "mps")):
            raise DeltatuneError(f"--device must be auto, cpu, cuda[:N] or mps, got {self.device!r}")
        if self.resume and self.overwrite:
            raise DeltatuneError("--resume continues the run in --out and --overwrite replaces it: give one of them")
        for name in ("gradient_checkpointing", "offload_activations", "chunked_loss"):
            if not isinstance(getattr(self, name), bool):
                raise DeltatuneError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.quantize_base is not None:
            from ..quant import SCHEMES
            if self.quantize_base not in SCHEMES:
                raise DeltatuneError(f"--quantize-base must be one of {', '.join(SCHEMES)}, got {self.quantize_base!r}")
            if self.method in BASELINES:
                raise DeltatuneError(f"--quantize-base stores the frozen base quantised for an adapter to train on; "
                                     f"--method {self.method} trains no adapter: pick one (e.g. lora: QLoRA)")
        if self.qfx is not None:
            self.qfx_bits()
            if self.method != "full":
                raise DeltatuneError(f"--qfx fine-tunes every weight in fixed point: use it with --method full, not "
                                     f"{self.method}")
        elif self.qfx_khot is not None:
            raise DeltatuneError("--qfx-khot applies to --qfx runs only: add --qfx W,A or drop it")
        if not (isinstance(self.qfx_point_lr, (int, float)) and self.qfx_point_lr > 0):
            raise DeltatuneError(f"--qfx-point-lr must be a positive number, got {self.qfx_point_lr!r}")
        if self.init_from is not None and not (Path(self.init_from) / "checkpoint.safetensors").is_file():
            raise DeltatuneError(f"--init-from {self.init_from}: no checkpoint.safetensors there; give the folder of "
                                 f"a finished deltatune train run")
        if not self.chunked_loss and task_kind(str(self.data)) != "lm":
            raise DeltatuneError(f"--no-chunked-loss applies to the causal-LM task (--data lm) only; --data "
                                 f"{self.data} computes a classifier's loss, which has no vocabulary-sized logits: "
                                 f"drop the flag")

    def qfx_bits(self) -> tuple[int, int]:
        """``--qfx W,A``: the weights' and activations' widths."""
        parts = str(self.qfx).split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() and 1 <= int(p) <= 32 for p in parts):
            raise DeltatuneError(f"--qfx {self.qfx!r}: give the weight and activation widths in bits, e.g. --qfx 8,8 "
                                 f"(each 1 to 32)")
        return int(parts[0]), int(parts[1])

    def output_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        return Path("runs") / f"{Path(str(self.data)).stem}-{self.method}"

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_any(cls, args: Any) -> "TrainArgs":
        if isinstance(args, cls):
            return args
        d = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def derive_seed(seed: int, epoch: int, stream: str) -> int:
    """A 63-bit seed from ``(seed, epoch, stream)``; streams are independent of each other."""
    digest = hashlib.sha256(f"deltatune:{stream}:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2 ** 32)
    except ImportError:
        pass
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeltatuneError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    return torch.device(name)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB. On Linux VmHWM, which starts afresh at exec;
    ru_maxrss does not (a child started by a big parent would report the parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 1024     # bytes on macOS, KiB on Linux


def peak_memory_mb(device: torch.device | None = None) -> dict[str, float]:
    out = {"peak_memory_mb": round(peak_rss_mb(), 1)}
    if device is not None and device.type == "cuda":
        out["peak_cuda_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return out


def linear_schedule(total_steps: int, warmup_steps: int):
    """LR factor: linear warmup from 0 over ``warmup_steps``, then linear decay to 0 at
    ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def method_config(method: str, options: dict[str, Any], head: str | None = HEAD):
    """The validated config of ``method`` with the task's new head (if any) added to
    trainable_modules."""
    import deltatune as dt
    opts = dict(options)
    modules = list(opts.pop("trainable_modules", None) or [])
    if head is not None and head not in modules:
        modules.append(head)
    return dt.config(method, trainable_modules=modules, **opts)


def default_lr(method: str, model_type: str | None) -> float:
    """The rate a run of ``method`` on a ``model_type`` model uses unless told: the sweep's rate
    for that architecture if there is one, else the method's (or baseline's) default."""
    import deltatune as dt
    if method in BASELINES:
        by_model, rate = BASELINE_LR_BY_MODEL.get(method, {}), BASELINES[method]
    else:
        spec = dt.get_method(method)
        by_model, rate = spec.lr_by_model, spec.default_lr
    return float(by_model.get(model_type or "", rate))


def prepare_baseline(model: torch.nn.Module, method: str, head: str | None = HEAD) -> None:
    """Set which parameters train for a baseline: all of them (``full``) or only the head (``head``)."""
    if method not in BASELINES:
        raise DeltatuneError(f"{method!r} is not a baseline; baselines are {', '.join(BASELINES)}")
    if method == "head" and head is None:
        raise DeltatuneError("--method head: this task has no new head to train (a causal LM keeps its own); "
                             "use full or an adapter method")
    for name, p in model.named_parameters():
        p.requires_grad_(method == "full" or name.split(".")[0] == head)


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _log(msg: str) -> None:
    print(msg, flush=True)


def train(args: Any) -> dict[str, Any]:
    """Run a training job (see the module docstring); returns the metrics written to
    ``metrics.json``. ``args``: a ``TrainArgs``, an ``argparse.Namespace`` or a dict with its fields.
    An output folder that already holds a run is continued only with ``resume`` and replaced only
    with ``overwrite`` (see ``outputs.StagedOutput``)."""
    a = TrainArgs.from_any(args)
    a.validate()
    if a.method not in BASELINES:
        method_config(a.method, a.method_options)      # validate before the slow parts
    final = a.output_dir()
    if a.resume:
        check_writable(final)
        output = StagedOutput(final, final, [])
    else:
        output = stage_output(final, [f for f in RUN_FILES if (final / f).exists()], a.overwrite, "a run",
                              "add --resume to continue it, --overwrite to replace it (the old run stays until "
                              "the new one is complete), or give another --out")
    try:
        metrics = _train(a, output.work, final)
        output.commit()
    except BaseException:
        output.discard()
        raise
    return metrics


def calibrate(model: torch.nn.Module, train_split: Any, a: TrainArgs, device: torch.device) -> None:
    """``dt.calibrate`` on a few training batches for methods that need data before training
    (LoRA-GA), on resume too (checkpoints hold trainable tensors only: the calibrated frozen ones
    are rebuilt, identically). The batches come in an order of their own, and calibration draws
    no random numbers, so the training batches and dropout masks stay those of a run without it."""
    import deltatune as dt
    order = train_split.grouped_order(a.batch_size, torch.Generator().manual_seed(derive_seed(a.seed, 0, "calibrate")))
    batches = [{k: v.to(device) for k, v in b.items()}
               for b in itertools.islice(train_split.batches(a.batch_size, order), CALIBRATION_BATCHES)]

    def loss(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(device, a.precision):
            return m(**batch)[1]

    t0 = time.perf_counter()
    used = dt.calibrate(model, batches, loss_fn=loss)
    if used:
        _log(f"calibrated {', '.join(used)} on {len(batches)} batches of {a.batch_size} "
             f"({time.perf_counter() - t0:.1f} s)")


def data_sha256(data: str) -> str | None:
    """The content hash of a data file (None for a built-in task): ``--resume`` refuses a file
    that changed since the checkpoint, even at the same path."""
    path = Path(data)
    if data in TEXT_TASKS or data in KINDS or not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device, precision: str,
               where: str, lr: float) -> torch.Tensor:
    """The training loss of one batch, with the adapters' auxiliary terms (``dt.auxiliary_loss``);
    a loss that is not finite is an error naming the batch (``where``)."""
    import deltatune as dt
    with autocast(device, precision):
        _, loss = model(**batch)
        loss = loss + dt.auxiliary_loss(model)
    if not torch.isfinite(loss):
        raise DeltatuneError(f"{where}: the loss is {float(loss.detach())}; lower --lr (now {lr:g})")
    return loss


def zeroth_order_step(optimizer: torch.optim.Optimizer, loss_fn: Any) -> torch.Tensor:
    """One step of a zeroth-order optimizer: ``optimizer.step(closure)``, the closure computing
    ``loss_fn()`` under ``torch.no_grad()`` (the optimizer calls it as often as it needs, with its
    own perturbations of the parameters); returns the loss the step reports."""
    def closure() -> torch.Tensor:
        with torch.no_grad():
            return loss_fn()

    loss = optimizer.step(closure)
    if not isinstance(loss, (torch.Tensor, float, int)):
        raise DeltatuneError(f"{type(optimizer).__name__} is zeroth-order, so its step(closure) must return the "
                             f"loss it computed with the closure, got {loss!r}")
    return torch.as_tensor(loss).detach()


def check_zeroth_order(a: TrainArgs, optimizer: torch.optim.Optimizer) -> None:
    """A zeroth-order optimizer runs no backward pass: refuse the options that only serve one."""
    name = f"--optimizer {a.optimizer} ({type(optimizer).__name__}) learns from forward passes alone"
    if a.grad_accum > 1:
        raise DeltatuneError(f"{name}: each of its steps perturbs the parameters and evaluates one batch, so there "
                             f"are no gradients to accumulate; use --grad-accum 1 (with a larger --batch-size for "
                             f"less noisy steps)")
    for flag, on in (("--gradient-checkpointing", a.gradient_checkpointing),
                     ("--offload-activations", a.offload_activations)):
        if on:
            raise DeltatuneError(f"{name}: it keeps no activations for a backward pass, so {flag} has nothing to "
                                 f"save; drop the flag")


def _train(a: TrainArgs, out: Path, shown_out: Path) -> dict[str, Any]:
    """The run itself, writing into ``out`` (the output folder, or its staging folder when the
    run replaces an earlier one; ``shown_out`` is the folder named in messages)."""
    import deltatune as dt

    baseline = a.method in BASELINES
    cfg = None
    ckpt_path = out / CHECKPOINT_FILE
    ckpt = None
    data_hash = data_sha256(a.data)
    if a.resume:
        if not ckpt_path.exists():
            raise CheckpointError(f"--resume: no checkpoint at {ckpt_path}; run without --resume to start")
        ckpt = load_checkpoint(ckpt_path)
        # a setting a checkpoint does not record predates it: the run had its default
        defaults = _jsonable(TrainArgs().to_json())
        changed = {k: (ckpt.args.get(k, defaults[k]), v) for k, v in a.to_json().items()
                   if k not in TrainArgs.RESUMABLE_CHANGES and ckpt.args.get(k, defaults[k]) != _jsonable(v)}
        if changed:
            diff = "; ".join(f"{k}: checkpoint {old!r}, now {new!r}" for k, (old, new) in changed.items())
            raise CheckpointError(f"{ckpt_path}: cannot resume with different settings ({diff})")
        if ckpt.args.get("data_sha256") != data_hash:
            raise CheckpointError(
                f"{ckpt_path}: the data {a.data} is not the data this run was trained on (sha256 "
                f"{str(ckpt.args.get('data_sha256'))[:16]} then, {str(data_hash)[:16]} now); --resume continues "
                f"only on the same data: restore the file, or start a new run with --overwrite")

    from ..plan import plan_for_train
    _log(plan_for_train(a))     # before seeding: planning on fake tensors must not shift the run's RNG
    seed_everything(a.seed)
    device = pick_device(a.device)
    if a.offload_activations:
        check_offload_device(device)        # before the slow parts
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    setup: TaskSetup = setup_task(a)
    _log(setup.description)
    model, train_split, test_split = setup.model, setup.train, setup.test
    model_name = a.model or setup.model_name
    lr = float(a.lr) if a.lr is not None else default_lr(a.method, model_type(model))
    if a.init_from is not None:
        start = load_checkpoint(Path(a.init_from) / CHECKPOINT_FILE)
        prepare_baseline(model, "full", setup.head)
        restore(start, model, restore_rng=False)
        _log(f"started from the model trained in {a.init_from}")
    if baseline:
        prepare_baseline(model, a.method, setup.head)
    else:
        options = dict(a.method_options)
        if "total_step" in dt.get_method(a.method).config_cls.__dataclass_fields__ and options.get("total_step") is None:
            # a method with a step schedule (adalora's rank budget) plans it over the run's optimizer steps
            options["total_step"] = math.ceil(train_split.num_batches(a.batch_size) / a.grad_accum) * a.epochs
        cfg = method_config(a.method, options, setup.head)
        if a.quantize_base is not None:
            dt.quantize(model, a.quantize_base)
            _log(f"frozen base stored {a.quantize_base} (every Linear but the head)")
        dt.attach(model, cfg)
    point_rates: dict[str, float] = {}
    if a.qfx is not None:
        weight_bits, act_bits = a.qfx_bits()
        calibration = [{k: v for k, v in b.items() if k != "labels"} for _, b in
                       zip(range(QFX_CALIBRATION_BATCHES), train_split.batches(a.batch_size))]
        dt.qfx(model, weight_bits, act_bits, calibration=calibration, weight_khot=a.qfx_khot)
        point_rates = {n: a.qfx_point_lr for n, m in model.named_modules() if type(m).__name__ == "FixedQuantizer"}
        _log(f"qfx: {len(point_rates)} fixed-point types ({weight_bits}-bit weights, {act_bits}-bit activations"
             f"{f', {a.qfx_khot}-hot' if a.qfx_khot else ''}), calibrated on {len(calibration)} batches")
    model.to(device)
    trainable, total = dt.count_parameters(model)
    _log(f"{a.method} on {model_name}: {trainable:,} trainable of {total:,} parameters "
         f"({100 * trainable / max(total, 1):.3f} %), lr {lr:g}, device {device}")
    if a.gradient_checkpointing:        # before calibration, which may run backward passes too
        blocks = enable_gradient_checkpointing(model)
        _log(f"gradient checkpointing: {len(blocks)} blocks ({blocks[0]} .. {blocks[-1]})")
    if cfg is not None and dt.get_method(cfg.method).calibrate is not None:
        calibrate(model, train_split, a, device)

    params = [p for _, p in dt.trainable_parameters(model)]
    head_lr = default_lr("head", model_type(model)) if a.head_lr is None else float(a.head_lr)
    if not (head_lr > 0 and setup.head is not None and a.method != "head"):
        head_lr = None
    # the new head (a linear probe on the pooled features) converges at a far larger rate than
    # the deltas inside the encoder (see BASELINE_LR_BY_MODEL); methods may set their own rates
    rates = {**point_rates, **({setup.head: head_lr} if head_lr is not None else {})}
    groups = dt.parameter_groups(model, lr, rates=rates or None)
    optimizer = build_optimizer(a.optimizer, groups, lr, a.weight_decay)
    zeroth_order = is_zeroth_order(optimizer)
    if zeroth_order:
        check_zeroth_order(a, optimizer)
    # the forward passes of the training steps run inside this context (offload hooks, or none)
    saved_activations = offload_activations(device, model) if a.offload_activations else contextlib.nullcontext()
    batches_per_epoch = train_split.num_batches(a.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / a.grad_accum)
    total_steps = steps_per_epoch * a.epochs
    warmup_steps = int(math.ceil(WARMUP_FRACTION * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, warmup_steps))

    history: list[dict[str, Any]] = []
    step, start_epoch, stopped_early = 0, 0, False
    if ckpt is not None:
        restore(ckpt, model, optimizer, scheduler)
        history, step, start_epoch = list(ckpt.metrics), ckpt.step, ckpt.epoch
        _log(f"resumed from {ckpt_path} after epoch {ckpt.epoch} (step {step})")
        if start_epoch >= a.epochs:
            _log(f"the checkpoint already holds all {a.epochs} epochs")

    try:
        from tqdm import tqdm
    except ImportError:     # tqdm is optional: plain iteration without a progress bar
        tqdm = None

    def budget_spent(epoch_seconds: float) -> bool:
        spent = sum(h["train_seconds"] for h in history) + epoch_seconds
        return a.budget_seconds is not None and spent >= a.budget_seconds

    # a zeroth-order step compares the losses of two forward passes: with dropout on, their
    # difference would measure the masks, not the perturbation (MeZO's trainer runs them in eval
    # mode, as here; evaluation restores the mode it found)
    model.train(not zeroth_order)
    for epoch in range(start_epoch, a.epochs):
        if budget_spent(0.0):       # e.g. resumed with a budget the earlier epochs already used
            stopped_early = True
            _log(f"the time budget of {a.budget_seconds:g} s is spent; stopping before epoch {epoch + 1}")
            break
        torch.manual_seed(derive_seed(a.seed, epoch, "torch"))
        order_gen = torch.Generator().manual_seed(derive_seed(a.seed, epoch, "order"))
        # batches of similar lengths, in random order: dynamic padding then pads little
        order = train_split.grouped_order(a.batch_size, order_gen)
        t0 = time.perf_counter()
        loss_sum, seen = 0.0, 0
        bar = None
        if tqdm is not None and a.progress:
            bar = tqdm(total=batches_per_epoch, desc=f"epoch {epoch + 1}/{a.epochs}", file=sys.stderr,
                       dynamic_ncols=True, mininterval=1.0)
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(train_split.batches(a.batch_size, order)):
            batch = {k: v.to(device) for k, v in batch.items()}
            group = i // a.grad_accum
            group_size = min(a.grad_accum, batches_per_epoch - group * a.grad_accum)
            where = f"epoch {epoch + 1}, batch {i}"
            if zeroth_order:
                loss = zeroth_order_step(optimizer, lambda: batch_loss(model, batch, device, a.precision, where, lr))
            else:
                with saved_activations:
                    loss = batch_loss(model, batch, device, a.precision, where, lr)
                (loss / group_size).backward()
            n = len(batch["labels"])
            loss_sum += float(loss.detach()) * n
            seen += n
            if zeroth_order or (i + 1) % a.grad_accum == 0 or i + 1 == batches_per_epoch:
                if not zeroth_order:        # a zeroth-order step was taken above, from the closure
                    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                dt.step_hook(model, step)
                # checked after a whole optimizer step, never inside gradient accumulation
                if i + 1 < batches_per_epoch and budget_spent(time.perf_counter() - t0):
                    stopped_early = True
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
            if stopped_early:
                break
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        ev = setup.evaluate(model, test_split, a.eval_batch_size, device, a.precision)
        record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(seen, 1), **ev,
                  "train_seconds": round(seconds, 3), "eval_seconds": round(time.perf_counter() - t0 - seconds, 3)}
        if stopped_early:
            record["partial"] = True
        history.append(record)
        _log(f"epoch {epoch + 1}/{a.epochs}{' (partial)' if stopped_early else ''}: "
             f"train loss {record['train_loss']:.4f}, test loss {ev['test_loss']:.4f}, "
             f"{_metric_text(setup.metric, ev[setup.metric])} ({seconds:.1f} s)")
        if stopped_early:
            _log(f"the time budget of {a.budget_seconds:g} s is spent: stopped after {step} of {total_steps} "
                 f"steps; no checkpoint for the partial epoch")
            break
        save_checkpoint(ckpt_path, model, optimizer, scheduler, epoch=epoch + 1, step=step, metrics=history,
                        args=_jsonable({**a.to_json(), "data_sha256": data_hash}))
        if epoch + 1 < a.epochs and budget_spent(0.0):
            stopped_early = True
            _log(f"the time budget of {a.budget_seconds:g} s is spent after epoch {epoch + 1} of {a.epochs}")
            break

    if not baseline:        # a baseline's trained parameters are in the checkpoint
        dt.save_adapter(model, out)
    qfx_metrics: dict[str, Any] = {}
    if a.qfx is not None:   # the exact fixed-point model (float64 emulation), and its integers, types and graph
        qfx_metrics = _qfx_finish(model, setup, test_split, a, device, out)
    last = history[-1] if history else {}
    metrics: dict[str, Any] = {
        "metric": setup.metric,
        setup.metric: last.get(setup.metric),
        "test_loss": last.get("test_loss"),
        "final_train_loss": last.get("train_loss"),
        "trainable_params": trainable,
        "total_params": total,
        "train_seconds": round(sum(h["train_seconds"] for h in history), 3),
        **peak_memory_mb(device),
        "method": a.method,
        "method_config": cfg.to_dict() if cfg is not None else {"baseline": a.method},
        "model": model_name,
        "data": a.data,
        "label_names": setup.label_names,
        "num_train": len(train_split),
        "num_test": len(test_split),
        "epochs": a.epochs,
        "lr": lr,
        "batch_size": a.batch_size,
        "grad_accum": a.grad_accum,
        "max_length": a.max_length,
        "precision": a.precision,
        "optimizer": a.optimizer,
        "zeroth_order": zeroth_order,
        "gradient_checkpointing": a.gradient_checkpointing,
        "offload_activations": a.offload_activations,
        "chunked_loss": a.chunked_loss if task_kind(str(a.data)) == "lm" else None,
        "head_lr": head_lr,
        "quantize_base": a.quantize_base,
        "seed": a.seed,
        "steps": step,
        "planned_steps": total_steps,
        "epochs_completed": sum(1 for h in history if not h.get("partial")),
        "budget_seconds": a.budget_seconds,
        "stopped_early": stopped_early,
        "device": str(device),
        "resumed_from_epoch": ckpt.epoch if ckpt is not None else None,
        "history": history,
        **qfx_metrics,
    }
    metrics = _jsonable(metrics)
    atomic_write_bytes(out / METRICS_FILE, (json.dumps(metrics, indent=2) + "\n").encode())
    saved = "checkpoint" if baseline else "adapter, checkpoint"
    _log(f"{_metric_text(setup.metric, metrics[setup.metric])}; {saved} and {METRICS_FILE} in {shown_out}")
    _log(json.dumps({k: v for k, v in metrics.items() if k not in ("history", "method_config", "label_names")}))
    return metrics


class _Float64Inputs(torch.nn.Module):
    """Runs a model converted to float64 on the float32 batches of a split."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, **batch):
        return self.inner(**{k: v.double() if v.is_floating_point() else v for k, v in batch.items()})


def _qfx_finish(model: torch.nn.Module, setup: Any, test_split: Any, a: TrainArgs, device: torch.device,
                out: Path) -> dict[str, Any]:
    """``--qfx``: the test metric of the exact fixed-point model (float64, where every sum is
    exact), and its export to ``out/qfx`` where the whole model is fixed point."""
    import deltatune as dt
    model.double()
    try:
        ev = setup.evaluate(_Float64Inputs(model), test_split, a.eval_batch_size, device, "fp32")
        _log(f"qfx, exact fixed point (float64 emulation): {_metric_text(setup.metric, ev[setup.metric])}")
        result: dict[str, Any] = {f"qfx_exact_{setup.metric}": ev[setup.metric], "qfx_exported": None}
        try:
            result["qfx_exported"] = str(dt.qfx_export(model, out / "qfx"))
            _log(f"qfx: integer weights, types and graph in {out / 'qfx'} (run by deltatune.quant.integer_infer)")
        except DeltatuneError as e:        # e.g. a transformer: float ops (softmax, norms) between its Linears
            _log(f"qfx: not exported ({e})")
        return result
    finally:
        model.float()


def _metric_text(metric: str, value: float | None) -> str:
    name = metric.replace("test_", "test ")
    return f"{name} {value:.4f}" if value is not None else f"{name} not measured"


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, ...)."""
    return json.loads(json.dumps(value))
