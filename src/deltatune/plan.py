"""``deltatune plan``: the peak memory of a ``deltatune train`` run, predicted without running it.

The run's model is built from its config on the meta device (no weights are read), the method
attached, and ``planner.plan_model`` runs two optimiser steps on fake tensors of a batch of the full
``batch_size x max_length`` (see ``deltatune.planner``): forward, backward (with gradient
checkpointing if asked), gradient clipping and the optimiser step, as the loop runs them.

``tensor peak`` is the most tensor bytes alive at once (on the GPU what
``torch.cuda.max_memory_allocated`` reports); ``process peak`` adds the resident memory of this
process when planning began (the Python, torch and transformers runtime), an estimate of the
peak RSS that ``deltatune train`` reports as ``peak_memory_mb``. ``--measure`` then runs the same two
steps for real and prints the measured tensor peak (the allocator's) and peak RSS next to the
prediction (``deltatune.measure``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.errors import DeltatuneError
from .memory import MB, ValueFree
from .planner import MemoryPlan, plan_model, rss_bytes

# the models deltatune plan knows by name (a local Hugging Face folder works too) -> task kind
MODELS = {"minilm": "text", "smollm2": "lm"}
TASKS = {"bbc": "text", "tweets": "text", "lm": "lm"}


# ----------------------------------------------------------------------------- the built-in tasks

@dataclasses.dataclass
class RunSpec:
    """A ``deltatune train`` run as planning needs it (its memory depends on nothing else)."""

    model: str = "minilm"
    data: str | None = None                  # None: the model's task (bbc for minilm, lm for smollm2)
    method: str = "lora"
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    batch_size: int = 32
    max_length: int = 128
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    grad_accum: int = 1
    precision: str = "fp32"
    head_dropout: float = 0.1
    weight_decay: float = 0.01
    chunked_loss: bool = True                # the lm task's loss a chunk of tokens at a time, as train runs it

    def kind(self) -> str:
        data = self.task()
        if data not in TASKS:
            raise DeltatuneError(f"deltatune plan knows the tasks {', '.join(TASKS)}, got --data {data!r}")
        expected = MODELS.get(self.model)
        if expected is not None and expected != TASKS[data]:
            raise DeltatuneError(f"--model {self.model} does not fit --data {data}: {self.model} is for "
                                 f"{', '.join(t for t, k in TASKS.items() if k == expected)}")
        return TASKS[data]

    def task(self) -> str:
        return self.data or ("lm" if MODELS.get(self.model) == "lm" else "bbc")

    def validate(self) -> None:
        import deltatune as dt
        from .optim import OPTIMIZERS
        from .train.loop import BASELINES, PRECISIONS
        from pathlib import Path
        if self.model not in MODELS and not Path(self.model).is_dir():
            raise DeltatuneError(f"unknown model {self.model!r}: give {', '.join(MODELS)} or a local Hugging Face "
                                 f"model folder")
        if self.method not in BASELINES and self.method not in dt.available_methods():
            raise DeltatuneError(f"unknown method {self.method!r}; available: the baselines "
                                 f"{', '.join(BASELINES)} and {', '.join(dt.available_methods())}")
        if self.optimizer not in OPTIMIZERS:
            raise DeltatuneError(f"unknown optimizer {self.optimizer!r}; available: {', '.join(sorted(OPTIMIZERS))}")
        if self.precision not in PRECISIONS:
            raise DeltatuneError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("batch_size", "max_length", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "max_length" else 1):
                raise DeltatuneError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.kind() != "lm" and not self.chunked_loss:
            raise DeltatuneError("--no-chunked-loss applies to the lm task only (a classifier has no "
                                 "vocabulary-sized logits)")

    def describe(self) -> str:
        return (f"{self.method} on {self.model} ({self.task()}), batch {self.batch_size} x {self.max_length} tokens"
                f"{f' x {self.grad_accum} accumulated' if self.grad_accum > 1 else ''}, {self.optimizer}, "
                f"{self.precision}, gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}"
                f"{'' if self.kind() != 'lm' else ', chunked loss' if self.chunked_loss else ', plain loss'}")


def _config(spec: RunSpec) -> Any:
    """The model's transformers config, read without its weights."""
    from .train.model import SMOLLM2_GGUF, SMOLLM2_PACKAGE, _transformers, cache_dir, resolve_model_path
    from .train.data import package_dir
    tf = _transformers()
    if spec.model == "smollm2":
        converted = cache_dir() / "smollm2-135m-instruct"
        if (converted / "config.json").is_file():
            return tf.AutoConfig.from_pretrained(str(converted))
        return tf.AutoConfig.from_pretrained(str(package_dir(*SMOLLM2_PACKAGE)), gguf_file=SMOLLM2_GGUF)
    return tf.AutoConfig.from_pretrained(str(resolve_model_path(spec.model)))


def build_model(spec: RunSpec, device: str = "meta") -> nn.Module:
    """The run's model with its method attached (or its baseline's parameters set to train), as
    ``deltatune train`` builds it: on ``device`` "meta" from the config (no weights), on any other
    from the pretrained weights."""
    import deltatune as dt
    from .train.lm import CausalLMTask
    from .train.loop import BASELINES, method_config, prepare_baseline
    from .train.model import TextClassifier, _transformers, build_classifier, load_causal_lm
    tf = _transformers()
    kind = spec.kind()
    if device == "meta":
        config = _config(spec)
        with torch.device("meta"):
            if kind == "lm":
                model: nn.Module = CausalLMTask(tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32),
                                                 chunked_loss=spec.chunked_loss)
            else:
                model = TextClassifier(tf.AutoModel.from_config(config), _num_labels(spec.task()), spec.head_dropout)
    else:
        model = (CausalLMTask(load_causal_lm(spec.model)[0], chunked_loss=spec.chunked_loss) if kind == "lm"
                 else build_classifier(spec.model, _num_labels(spec.task()), dropout=spec.head_dropout))
    head = "classifier" if kind == "text" else None
    if spec.method in BASELINES:
        prepare_baseline(model, spec.method, head)
    else:
        options = dict(spec.method_options)
        if "total_step" in dt.get_method(spec.method).config_cls.__dataclass_fields__:
            options.setdefault("total_step", 100)     # a schedule's length changes no tensor size
        # on meta, an initialisation that reads the weights gets value-free stand-ins (memory.value_free)
        with torch.device(device), ValueFree() if device == "meta" else contextlib.nullcontext():
            dt.attach(model, method_config(spec.method, options, head))
    return model.to(device)


def _num_labels(task: str) -> int:
    from .train.data import load_task
    return load_task(task).num_labels


def example_batch(spec: RunSpec, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A batch of the run's full size: ``batch_size`` examples of ``max_length`` tokens (the
    largest a text task pads to; every block of the lm task)."""
    ids = torch.randint(0, 100, (spec.batch_size, spec.max_length), device=device)
    if spec.kind() == "lm":
        return {"input_ids": ids, "labels": ids.clone()}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.zeros(spec.batch_size, dtype=torch.long, device=device)}


def _rates(spec: RunSpec) -> dict[str, float] | None:
    return {"classifier": 3e-2} if spec.kind() == "text" and spec.method != "head" else None


def plan_training(spec: RunSpec | None = None, **fields: Any) -> MemoryPlan:
    """The ``MemoryPlan`` of a ``deltatune train`` run: ``plan_training(model="smollm2",
    method="lora", batch_size=8, optimizer="adamw")`` (the fields of ``RunSpec``)."""
    from .train.model import _transformers
    spec = dataclasses.replace(spec or RunSpec(), **fields)
    spec.validate()
    _transformers()     # imported before the runtime is measured: every run has it
    runtime = rss_bytes()
    return plan_model(build_model(spec), example_batch(spec, "meta"), spec.optimizer, rates=_rates(spec),
                      weight_decay=spec.weight_decay, grad_accum=spec.grad_accum, precision=spec.precision,
                      gradient_checkpointing=spec.gradient_checkpointing, description=spec.describe(),
                      runtime_bytes=runtime)



def plan_for_train(args: Any) -> str:
    """The plan ``deltatune train`` prints before it starts, for its ``TrainArgs``: the table, or
    one line saying why there is none (a task or model planning does not cover, a method that
    cannot run on fake tensors); training goes on either way."""
    task = args.data
    if task not in TASKS:
        return f"memory plan: none for --data {task} (deltatune plan covers {', '.join(TASKS)})"
    spec = RunSpec(model=args.model or ("smollm2" if TASKS[task] == "lm" else "minilm"), data=task,
                   method=args.method, method_options=dict(args.method_options), batch_size=args.batch_size,
                   max_length=args.max_length, optimizer=args.optimizer,
                   gradient_checkpointing=bool(getattr(args, "gradient_checkpointing", False)),
                   grad_accum=args.grad_accum, precision=args.precision, head_dropout=args.head_dropout,
                   weight_decay=args.weight_decay,
                   chunked_loss=bool(getattr(args, "chunked_loss", True)) or TASKS[task] != "lm")
    try:
        return str(plan_training(spec))
    except Exception as e:      # a prediction that cannot be made must not stop the run it describes
        return f"memory plan: could not be made ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


# ----------------------------------------------------------------------------- the command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm", help="minilm (text classifier), smollm2 (causal LM) or a local "
                   "Hugging Face model folder (only its config.json is read)")
    p.add_argument("--data", default=None, help="bbc or tweets (text classification) or lm (causal LM on Moby "
                   "Dick); default: the model's task (bbc for minilm, lm for smollm2)")
    p.add_argument("--method", default="lora", help="a registered method (see `deltatune methods`) or the "
                   "baselines full and head; any other --option is a field of the method's config, as for train")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (text batches are planned "
                   "padded to it, their worst case)")
    p.add_argument("--optimizer", default="adamw", help="a name of deltatune.optim.OPTIMIZERS (adamw, sgd, "
                   "coap_adamw, galore_adamw, mezo, ...)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="plan with gradient checkpointing")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--no-chunked-loss", dest="chunked_loss", action="store_false",
                   help="plan the lm task with the plain loss (all tokens x vocabulary logits at once), "
                   "as deltatune train --no-chunked-loss runs it")
    p.add_argument("--measure", action="store_true", help="then run two real steps (reads the weights) and print "
                   "the measured tensor peak and peak RSS next to the prediction")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the plan (and measurement) as JSON")


def plan_record(plan: MemoryPlan) -> dict[str, Any]:
    """The plan as JSON-ready values, its derived totals included."""
    return {**dataclasses.asdict(plan), "transient_bytes": plan.transient_bytes,
            "process_peak_bytes": plan.process_peak_bytes}


def main_plan(ns: argparse.Namespace, extra: list[str] | tuple[str, ...] = ()) -> int:
    """``deltatune plan``: print the plan of the run ``ns`` describes (``extra``: the method's
    options, ``--r 16`` ...); with ``--measure`` also the measured peaks."""
    import json
    from .cli import LORA_DEFAULTS, parse_method_options
    from .train.checkpoint import atomic_write_bytes
    from .train.loop import BASELINES
    spec = RunSpec(model=ns.model, data=ns.data, method=ns.method, batch_size=ns.batch_size,
                   max_length=ns.max_length, optimizer=ns.optimizer, gradient_checkpointing=ns.gradient_checkpointing,
                   grad_accum=ns.grad_accum, precision=ns.precision, chunked_loss=ns.chunked_loss)
    spec.validate()         # an unknown method is named before its options are parsed
    if ns.method in BASELINES:
        if extra:
            raise DeltatuneError(f"--method {ns.method} is a baseline without options; unexpected: {' '.join(extra)}")
    else:
        spec.method_options = {**(LORA_DEFAULTS if ns.method == "lora" else {}),
                               **parse_method_options(ns.method, list(extra))}
    plan = plan_training(spec)
    print(plan, flush=True)
    record: dict[str, Any] = {"run": dataclasses.asdict(spec), "plan": plan_record(plan)}
    if ns.measure:
        from .measure import measure_training
        m = measure_training(spec)
        record["measured"] = dataclasses.asdict(m)
        print(f"measured in two real steps ({m.seconds:.1f} s):")
        print(f"  {'tensor peak':<19}{m.tensor_peak_bytes / MB:>11,.1f} MB  allocator; prediction "
              f"{100 * (plan.peak_bytes / m.tensor_peak_bytes - 1):+.1f} %")
        if m.process_peak_bytes is not None:
            print(f"  {'process peak':<19}{m.process_peak_bytes / MB:>11,.1f} MB  peak RSS during the steps; "
                  f"prediction {100 * (plan.process_peak_bytes / m.process_peak_bytes - 1):+.1f} %")
        print(f"  {'runtime':<19}{(m.rss_before_bytes - m.tensors_before_bytes) / MB:>11,.1f} MB  RSS before the "
              f"steps less the tensors alive then (planned: {plan.runtime_bytes / MB:,.1f} MB)")
    if ns.json:
        atomic_write_bytes(Path(ns.json), (json.dumps(record, indent=2) + "\n").encode())
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m deltatune.plan``: the same as ``deltatune plan``."""
    parser = argparse.ArgumentParser(prog="deltatune plan", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    ns, extra = parser.parse_known_args(argv)
    try:
        return main_plan(ns, extra)
    except DeltatuneError as e:
        print(f"deltatune plan: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
