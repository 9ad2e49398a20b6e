"""The ``deltatune`` command line: ``train``, ``plan``, ``methods``, ``inspect``, ``merge``, ``bench``.

``deltatune train`` with no options fine-tunes the packaged all-MiniLM-L6-v2 on BBC News with
LoRA (r=8, alpha=16 on query and value). Method options are the fields of the method's config,
given as ``--field value`` (``--r 8 --alpha 16 --targets query,value --dropout 0.1``): lists are
comma-separated, dicts are JSON, booleans are true/false (a bare ``--flag`` means true), and
``none`` sets an optional field to None.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from .core.errors import DeltatuneError

# bare `deltatune train`: LoRA r=8, alpha=16; targets left to the method's defaults for the model
# type (query and value for BERT models such as MiniLM)
LORA_DEFAULTS = {"r": 8, "alpha": 16.0}


# ----------------------------------------------------------------------------- method options

def config_fields(method: str) -> dict[str, Any]:
    """Field name -> type hint of a method's config dataclass."""
    import deltatune as dt
    cls = dt.get_method(method).config_cls
    try:
        hints = typing.get_type_hints(cls)
    except Exception:       # unresolvable annotation: fall back to the raw ones
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls)}


_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def convert(value: str | None, hint: Any, option: str) -> Any:
    """Turn the command-line text ``value`` into a value of type ``hint`` (see module doc)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        allowed = [a for a in args if a is not type(None)]
        if type(None) in args and value is not None and value.strip().lower() in ("none", "null"):
            return None
        errors = []
        for a in allowed:
            try:
                return convert(value, a, option)
            except DeltatuneError as e:
                errors.append(str(e))
        raise DeltatuneError(errors[0] if len(errors) == 1 else f"{option}: cannot read {value!r} ({'; '.join(errors)})")
    if hint is bool:
        if value is None:
            return True
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
        raise DeltatuneError(f"{option} expects true or false, got {value!r}")
    if value is None:
        raise DeltatuneError(f"{option} needs a value")
    if hint is int:
        try:
            return int(value)
        except ValueError:
            raise DeltatuneError(f"{option} expects an integer, got {value!r}") from None
    if hint is float:
        try:
            return float(value)
        except ValueError:
            raise DeltatuneError(f"{option} expects a number, got {value!r}") from None
    if hint is str:
        return value
    if hint is list or origin in (list, tuple, typing.Sequence):
        item = args[0] if args else str
        text = value.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                raise DeltatuneError(f"{option}: {value!r} is not a valid JSON list ({e})") from None
            if not isinstance(items, list):
                raise DeltatuneError(f"{option} expects a list, got {value!r}")
            return [convert(json.dumps(x) if not isinstance(x, str) else x, item, option) for x in items]
        return [convert(x.strip(), item, option) for x in text.split(",") if x.strip()]
    if hint is dict or origin is dict:
        try:
            d = json.loads(value)
        except json.JSONDecodeError as e:
            raise DeltatuneError(f"{option} expects a JSON object such as '{{\"query\": 4}}', got {value!r} ({e})") from None
        if not isinstance(d, dict):
            raise DeltatuneError(f"{option} expects a JSON object, got {value!r}")
        return d
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == value:
                return choice
        raise DeltatuneError(f"{option}={value!r} is not one of {', '.join(map(str, args))}")
    try:        # anything else: JSON if it parses, else the text
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def parse_method_options(method: str, tokens: Sequence[str]) -> dict[str, Any]:
    """Parse ``--key value`` / ``--key=value`` pairs against the fields of ``method``'s config."""
    fields = config_fields(method)
    valid = ", ".join(f"--{n.replace('_', '-')}" for n in fields)
    opts: dict[str, Any] = {}
    tokens = list(tokens)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            raise DeltatuneError(f"unexpected argument {tok!r}; method options are --name value pairs "
                                 f"(valid for {method}: {valid})")
        key, eq, value = tok[2:].partition("=")
        field = key.replace("-", "_")
        if field not in fields:
            import difflib
            close = difflib.get_close_matches(field, list(fields), n=1)
            hint = f" (did you mean --{close[0].replace('_', '-')}?)" if close else ""
            raise DeltatuneError(f"unknown option --{key}{hint}; valid options for method {method}: {valid}; "
                                 f"training options: see `deltatune train --help`")
        if not eq:
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if nxt is not None and not (nxt.startswith("--") and len(nxt) > 2):
                value, i = nxt, i + 1
            else:
                value = None
        if field in opts:
            raise DeltatuneError(f"option --{key} is given twice")
        opts[field] = convert(value, fields[field], f"--{key}")
        i += 1
    return opts


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    # --debug is accepted before or after the command; SUPPRESS keeps a subcommand's parser from
    # resetting a --debug given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the Python traceback of an error")
    parser = argparse.ArgumentParser(
        prog="deltatune", parents=[common],
        description="Parameter- and memory-efficient fine-tuning of pretrained PyTorch models.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True

    t = sub.add_parser(
        "train", allow_abbrev=False, parents=[common], help="fine-tune a text classifier (default: MiniLM on BBC News with LoRA)",
        description="Fine-tune an encoder with a new classification head. Any other --option is a field of the "
                    "method's config (see `deltatune methods`), e.g. --r 8 --alpha 16 --targets query,value "
                    "--dropout 0.1; lists are comma-separated, dicts JSON, booleans true/false.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--model", default=None, help="the task's model: for text tasks 'minilm' (the packaged "
                   "all-MiniLM-L6-v2, the default) or a local Hugging Face model folder; fashion and lm use "
                   "their packaged models (EfficientNet-Lite0, SmolLM2-135M)")
    t.add_argument("--data", default="bbc", help="bbc, tweets, fashion (Fashion-MNIST on EfficientNet-Lite0), "
                   "lm (SmolLM2-135M on Moby Dick, perplexity), or a .csv/.jsonl file with text,label columns")
    t.add_argument("--method", default="lora", help="a registered method (see `deltatune methods`), or the "
                   "baselines full (every weight trains) and head (only the new classifier head)")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's default_lr, or its rate for the model's "
                   "architecture; `deltatune methods` lists them)")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--eval-batch-size", type=int, default=128)
    t.add_argument("--max-length", type=int, default=128, help="truncate texts to this many tokens")
    t.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--head-dropout", type=float, default=0.1, help="dropout before the classification head")
    t.add_argument("--out", default=None, help="output folder (default: runs/<data>-<method>)")
    t.add_argument("--head-lr", type=float, default=None,
                   help="learning rate of the new classification head (default: the linear probe's rate for the "
                        "model, 3e-2 on transformers, 3e-3 on the convnet; 0: the same as --lr)")
    t.add_argument("--budget-seconds", type=float, default=None,
                   help="stop training once this many seconds were spent in training steps, then evaluate")
    t.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: matmuls in bfloat16 under autocast (faster on CPUs with AVX512-BF16/AMX and "
                        "on GPUs); parameters, optimizer and loss stay fp32")
    from .optim import OPTIMIZERS
    t.add_argument("--optimizer", default="adamw", help=f"one of {', '.join(sorted(OPTIMIZERS))} (sgd with momentum "
                   "0.9); the rate of each parameter group comes from the method (e.g. LoRA+) and --head-lr; a "
                   "zeroth-order one (such as MeZO) learns from forward passes alone (no --grad-accum)")
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="keep only each layer's input for the backward pass and recompute the rest there: far "
                        "less activation memory for about one more forward pass of time (docs/memory.md)")
    t.add_argument("--offload-activations", action="store_true",
                   help="keep the activations saved for the backward pass in pinned host memory until it needs "
                        "them (GPU runs only; docs/memory.md)")
    t.add_argument("--no-chunked-loss", dest="chunked_loss", action="store_false",
                   help="lm task: compute the loss from the full logits; by default it is computed a chunk of "
                        "tokens at a time, to the same value, without the tokens x vocabulary logits")
    t.add_argument("--quantize-base", default=None, choices=["nf4", "int8"],
                   help="store the frozen base's Linear layers quantised (dt.quantize; the head stays float) "
                        "before attaching the adapter: --method lora --quantize-base nf4 is QLoRA")
    t.add_argument("--init-from", default=None, metavar="RUN",
                   help="start from the model a finished --method full run trained (its folder)")
    t.add_argument("--qfx", default=None, metavar="W,A",
                   help="quantisation-aware fine-tuning in fixed point (dt.qfx): W-bit weights, A-bit activations, "
                        "each binary point learned; with --method full (e.g. --init-from a float fine-tune); the "
                        "exported integer model goes to OUT/qfx")
    t.add_argument("--qfx-khot", type=int, default=None, metavar="K",
                   help="--qfx: multiplier-free weights, each a sum of at most K powers of two")
    t.add_argument("--qfx-point-lr", type=float, default=1e-2, help="--qfx: rate of the learned integer bits "
                   "(default: 1e-2)")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (it stays whole until the new run is complete)")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    sub.add_parser("methods", parents=[common], help="list the registered methods with their papers and options")

    i = sub.add_parser(
        "inspect", parents=[common],
        help="list the modules of a model that methods can target, or diagnose an adapter or a full fine-tune "
             "(norms, spectra, intruder dimensions of each weight update)",
        description="Given a model (or nothing: minilm), list its modules that methods can target. Given the "
                    "output folder of `deltatune train` (an adapter folder, or the checkpoint of --method full), "
                    "print per layer the norm, effective rank and singular values of the weight update and its "
                    "intruder dimensions ('LoRA vs Full Fine-tuning: An Illusion of Equivalence'); see "
                    "docs/diagnostics.md.")
    i.add_argument("target", nargs="?", default=None, metavar="FOLDER_OR_MODEL",
                   help="an adapter folder or run folder of `deltatune train` (diagnosed), or a model: 'minilm' or "
                        "a local Hugging Face folder (its targetable modules are listed; default minilm)")
    i.add_argument("--model", default=None, help="the model whose targetable modules to list (the same as giving "
                   "it as the argument)")
    i.add_argument("--base", default=None, help="the base model the run was trained on (default: the model its "
                   "metrics.json names, else minilm)")
    i.add_argument("--k", type=int, default=None, help="how many top singular vectors of each tuned weight are "
                   "tested for intruders (default 10)")
    i.add_argument("--epsilon", type=float, default=None, help="cosine threshold of an intruder dimension "
                   "(default 0.5)")
    i.add_argument("--plot", default=None, metavar="DIR", help="write one PNG per adapter into this folder")
    i.add_argument("--json", default=None, metavar="FILE", help="write the diagnosis as JSON to this file")
    i.add_argument("--scale-intruders", type=float, default=None, metavar="FACTOR",
                   help="merge the adapter and scale its intruder components by FACTOR in [0, 1] (0 removes "
                        "them), then report the recount; with --out, save the edited merged model")
    i.add_argument("--out", default=None, help="folder for the model edited by --scale-intruders (as "
                   "`deltatune merge` writes it)")
    i.add_argument("--overwrite", action="store_true", help="replace the model already in --out")

    m = sub.add_parser("merge", parents=[common], help="fold an adapter into the model and save the full model")
    m.add_argument("--model", default="minilm", help="the base model the adapter was trained on")
    m.add_argument("--adapter", required=True, help="adapter folder (e.g. the --out of `deltatune train`)")
    m.add_argument("--out", required=True, help="folder for the merged model (save_pretrained, safetensors); "
                   "written completely or not at all")
    m.add_argument("--overwrite", action="store_true", help="replace the merged model already in --out")

    b = sub.add_parser("bench", parents=[common], help="benchmarks: speed against Hugging Face PEFT; methods compared on a task")
    bsub = b.add_subparsers(dest="bench", metavar="{speed,methods,optim}", required=True)
    from .bench.speed import add_arguments as speed_arguments
    speed_arguments(bsub.add_parser("speed", parents=[common], help="deltatune and PEFT side by side, timed interleaved"))
    from .bench.methods import add_arguments as methods_arguments
    methods_arguments(bsub.add_parser(
        "methods", parents=[common], help="train methods and the full / head-only baselines on one task: report and plots"))
    from .bench.optim import add_arguments as optim_arguments
    optim_arguments(bsub.add_parser(
        "optim", parents=[common], help="one model trained with several optimizers against AdamW: state, time, memory, metric"))
    from .plan import add_arguments as plan_arguments
    plan_arguments(sub.add_parser(
        "plan", parents=[common], help="predict the peak memory of a training run and its breakdown, without running it",
        description="Predict peak training memory (frozen and trainable weights, gradients, optimizer states, "
                    "activations) on fake tensors, loading no weights. Any other --option is a field of the "
                    "method's config, as for train."))
    return parser


# ----------------------------------------------------------------------------- commands

def cmd_train(ns: argparse.Namespace, extra: list[str]) -> int:
    import deltatune as dt
    from .train.loop import BASELINES, TrainArgs, method_config, train

    if ns.method in BASELINES:      # full fine-tuning / head only: no adapter, no method options
        if extra:
            raise DeltatuneError(f"--method {ns.method} is a baseline without options; unexpected: "
                                 f"{' '.join(extra)}")
        options = {}
    else:
        dt.get_method(ns.method)        # unknown method: clear error before anything else
        options = parse_method_options(ns.method, extra)
        if ns.method == "lora":
            options = {**LORA_DEFAULTS, **options}
        method_config(ns.method, options)       # validate now, before loading data and model
    args = TrainArgs(model=ns.model, data=ns.data, method=ns.method, method_options=options, epochs=ns.epochs,
                     lr=ns.lr, batch_size=ns.batch_size, eval_batch_size=ns.eval_batch_size,
                     max_length=ns.max_length, grad_accum=ns.grad_accum, seed=ns.seed,
                     weight_decay=ns.weight_decay, head_dropout=ns.head_dropout, head_lr=ns.head_lr, precision=ns.precision, optimizer=ns.optimizer, budget_seconds=ns.budget_seconds,
                     gradient_checkpointing=ns.gradient_checkpointing, offload_activations=ns.offload_activations,
                     chunked_loss=ns.chunked_loss, init_from=ns.init_from, quantize_base=ns.quantize_base, qfx=ns.qfx, qfx_khot=ns.qfx_khot,
                     qfx_point_lr=ns.qfx_point_lr,
                     out=ns.out, resume=ns.resume, overwrite=ns.overwrite,
                     device=ns.device, progress=ns.progress)
    args.validate()
    train(args)
    return 0


def cmd_methods() -> int:
    import deltatune as dt
    for name in dt.available_methods():
        m = dt.get_method(name)
        print(f"{name}: {m.paper}")
        by_model = "".join(f", {lr:g} on {t}" for t, lr in m.lr_by_model.items())
        print(f"    default lr {m.default_lr:g}{by_model}; hooks the {m.hook}; layer kinds: {', '.join(m.kinds)}")
        cls = m.config_cls
        opts = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "required"
            opts.append(f"--{f.name.replace('_', '-')} ({default!r})" if default != "required"
                        else f"--{f.name.replace('_', '-')}")
        print(f"    options: {', '.join(opts)}")
    return 0


# the inspect options that apply only to a run folder being diagnosed
_DIAGNOSE_OPTIONS = ("base", "k", "epsilon", "plot", "json", "scale_intruders", "out")


def cmd_inspect(ns: argparse.Namespace) -> int:
    """A run folder is diagnosed; a model (or nothing) has its targetable modules listed."""
    if ns.target is not None and ns.model is not None:
        raise DeltatuneError(f"give the model either as the argument ({ns.target!r}) or with --model "
                             f"({ns.model!r}), not both")
    target = ns.target if ns.target is not None else ns.model
    kind = _inspect_target(target)
    given = [f"--{o.replace('_', '-')}" for o in _DIAGNOSE_OPTIONS if getattr(ns, o) is not None]
    if kind == "model":
        if given:
            raise DeltatuneError(f"{' '.join(given)} apply to an adapter or run folder of `deltatune train`, and "
                                 f"{target or 'minilm'!r} is a model; give the folder to diagnose as the argument")
        return _list_modules(target or "minilm")
    return _inspect_run(ns, Path(target), kind)


def _inspect_target(target: str | None) -> str:
    """``adapter``, ``checkpoint`` (a baseline run) or ``model``; a folder that is none of them
    is refused, naming what each would hold."""
    from .core.io import CONFIG_FILE, WEIGHTS_FILE
    from .train.checkpoint import CHECKPOINT_FILE
    if target is None or not Path(target).is_dir():
        return "model"      # minilm, or a path that resolve_model_path refuses by name
    folder = Path(target)
    if (folder / CONFIG_FILE).exists() or (folder / WEIGHTS_FILE).exists():
        return "adapter"
    if (folder / CHECKPOINT_FILE).exists():
        return "checkpoint"
    if (folder / "config.json").is_file():
        return "model"
    if (folder / "metrics.json").is_file():
        raise DeltatuneError(f"{folder}: a run folder with metrics.json but neither adapter files nor {CHECKPOINT_FILE}: "
                             f"a baseline run (--method full) keeps its weights only in the checkpoint of a complete "
                             f"epoch, and this run stopped (--budget-seconds) inside its first; train at least one whole "
                             f"epoch, then inspect it")
    raise DeltatuneError(f"{folder}: neither an adapter folder ({CONFIG_FILE} + {WEIGHTS_FILE}), the run folder of a "
                         f"full fine-tune ({CHECKPOINT_FILE}) nor a model folder (config.json); give the --out folder "
                         f"of `deltatune train`, or a model")


def _list_modules(model_name: str) -> int:
    import deltatune as dt
    from .core.layers import layer_kind
    from .train.model import load_encoder

    model = load_encoder(model_name)
    methods = {n: dt.get_method(n) for n in dt.available_methods()}
    rows = [("module", "type", "kind", "weight", "methods")]
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None or not name:
            continue
        w = getattr(module, "weight", None)
        shape = "x".join(map(str, w.shape)) if w is not None else "-"
        usable = [n for n, m in methods.items() if kind in m.kinds]
        rows.append((name, type(module).__name__, kind, shape, ",".join(usable) or "-"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for k, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    print(f"\n{len(rows) - 1} targetable modules; model type {model_type!r}. A target pattern is a module name, "
          f"a dotted suffix (e.g. 'query'), 're:<regex>', 'type:<Class>' or 'all-linear'.")
    for n, m in methods.items():
        defaults = m.default_targets.get(model_type) if isinstance(m.default_targets, dict) else None
        if defaults:
            print(f"  {n} default targets: {', '.join(defaults)}")
    print("Models trained by `deltatune train` wrap this encoder as 'encoder' next to a 'classifier' head.")
    return 0


def _run_record(folder: Path) -> dict[str, Any]:
    """The run's ``metrics.json`` (what it was trained on), or {} without one."""
    from .files import read_json_object
    path = folder / "metrics.json"
    return read_json_object(path) if path.is_file() else {}


def _text_run(folder: Path, data: Any) -> None:
    from .train.tasks import task_kind
    if isinstance(data, str) and task_kind(data) != "text":
        raise DeltatuneError(f"{folder} is a run on {data!r}, a {task_kind(data)} task; `deltatune inspect` rebuilds "
                             f"the text classifiers of `deltatune train` only: load that model in Python and call "
                             f"deltatune.diagnostics.diagnose(model)")


def _inspect_run(ns: argparse.Namespace, folder: Path, kind: str) -> int:
    from .diagnostics import FULL, _check_settings, diagnose, scale_intruders
    from .files import atomic_write_bytes
    from .train.model import MINILM

    k = 10 if ns.k is None else ns.k
    epsilon = 0.5 if ns.epsilon is None else ns.epsilon
    _check_settings(k, epsilon)
    if ns.out is not None and ns.scale_intruders is None:
        raise DeltatuneError("--out saves the model edited by --scale-intruders; add --scale-intruders FACTOR (or use "
                             "`deltatune merge` to save the merged model unedited)")
    if ns.scale_intruders is not None and not 0 <= ns.scale_intruders <= 1:
        raise DeltatuneError(f"--scale-intruders {ns.scale_intruders:g}: the factor must be in [0, 1] (0 removes the "
                             f"intruder components, 1 keeps them)")
    if ns.scale_intruders is not None and kind != "adapter":
        raise DeltatuneError(f"--scale-intruders edits the merged weights of an adapter, and {folder} holds a "
                             f"checkpoint but no adapter; give an adapter folder")
    record = _run_record(folder)
    output = None
    if kind == "adapter":
        from .core.io import read_adapter
        meta, tensors = read_adapter(folder)      # a damaged folder is refused before any model loads
        _text_run(folder, record.get("data"))
        base = ns.base or record.get("model") or MINILM
        if ns.out is not None:
            output = _stage_edited(Path(ns.out), folder, base, ns.overwrite)
    try:
        if kind == "adapter":
            import deltatune as dt
            model, encoder, head = _adapter_model(folder, base, tensors)
            name = dt.load_adapter(model, folder)
            diag = diagnose(model, name, k, epsilon)
            what = f"{meta.get('method')} adapter {name!r}"
        else:
            from .diagnostics import block_layers, diagnose_weights, matrix_modules
            base_model, tuned, base, note = _full_models(folder, ns.base, record)
            layers = block_layers(base_model) or [n for n in matrix_modules(base_model)
                                                  if not n.startswith("classifier")]
            diag = diagnose_weights(base_model, tuned, k, epsilon, modules=layers, label=FULL)
            what = "full fine-tune (each weight matrix of the encoder's blocks against the base)"
            if note:
                print(note)
        print(f"{folder}: {what} on base {base}; k={k}, epsilon={epsilon:g}")
        print(diag.table())
        if ns.plot is not None:
            for p in diag.plot(Path(ns.plot)):
                print(f"plot: {p}")
        report = diag.to_json()
        if ns.scale_intruders is not None:
            changed = scale_intruders(model, ns.scale_intruders, name, k, epsilon)
            after = diagnose(model, name, k, epsilon)
            print(f"scaled the intruder components by {ns.scale_intruders:g} in {len(changed)} layers of the merged "
                  f"model: {after.intruders()} intruder dimensions now (were {diag.intruders()}; removing some can "
                  f"bring others into the top {k})")
            report["scaled"] = {"factor": ns.scale_intruders, "layers": [dataclasses.asdict(c) for c in changed],
                                "after": after.to_json()}
            if output is not None:
                _write_edited(output, model, encoder, head, folder, base, meta, ns.scale_intruders)
                print(f"saved the edited merged model to {ns.out}")
            else:
                print("nothing written: add --out DIR to save the edited merged model")
        if ns.json is not None:
            atomic_write_bytes(Path(ns.json), (json.dumps(report, indent=2) + "\n").encode())
            print(f"json: {ns.json}")
    except BaseException:
        if output is not None:
            output.discard()
        raise
    return 0


def _adapter_model(folder: Path, base: str, tensors: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(model, encoder, head weight or None): the base encoder, inside the classifier of
    `deltatune train` when the adapter carries its head (as `deltatune merge` builds it)."""
    from .train.model import TextClassifier, load_encoder
    head = tensors.get("modules.classifier.weight")
    if head is not None and head.dim() != 2:
        raise DeltatuneError(f"{folder}: the classifier head weight has shape {tuple(head.shape)}; a linear head "
                             f"needs (num_labels, hidden)")
    encoder = load_encoder(base)
    model = encoder if head is None else TextClassifier(encoder, int(head.shape[0]))
    return model, encoder, head


def _full_models(folder: Path, base_name: str | None, record: dict[str, Any]) -> tuple[Any, Any, str, str | None]:
    """(base, tuned, base name, note) of a full fine-tune: the base classifier as training built
    it and a copy holding the checkpoint's weights (safetensors, never unpickled); the note says
    when the run trained past its last checkpoint (a partial epoch cut by its time budget)."""
    import copy

    import torch

    from .train.checkpoint import load_checkpoint
    from .train.model import MINILM, TextClassifier, load_encoder

    ckpt = load_checkpoint(folder)
    method = ckpt.args.get("method")
    if method != "full":
        why = ("a linear probe trains only the new head, so no weight of the encoder changed" if method == "head"
               else f"it is a {method} run whose adapter files are missing (the run did not finish: --resume it)")
        raise DeltatuneError(f"{folder}: the checkpoint is not of a full fine-tune (--method full): {why}")
    _text_run(folder, ckpt.args.get("data", record.get("data")))
    base = base_name or record.get("model") or ckpt.args.get("model") or MINILM
    params = ckpt.params
    head = params.get("classifier.weight")
    if head is None or head.dim() != 2:
        raise DeltatuneError(f"{ckpt.path}: no 2-D classifier.weight; it is not the checkpoint of a text classifier "
                             f"trained by `deltatune train`")
    base_model = TextClassifier(load_encoder(base), int(head.shape[0]))
    tuned = copy.deepcopy(base_model)
    own = dict(tuned.named_parameters())
    for n, t in params.items():
        if n not in own or tuple(own[n].shape) != tuple(t.shape):
            have = "no such parameter" if n not in own else f"shape {tuple(own[n].shape)}"
            raise DeltatuneError(f"{ckpt.path}: parameter {n} {tuple(t.shape)} does not fit base {base!r} ({have}); "
                                 f"give the model the run was trained on with --base")
    with torch.no_grad():
        for n, t in params.items():
            own[n].copy_(t)
    steps = record.get("steps")
    note = None
    if isinstance(steps, int) and steps > ckpt.step:
        note = (f"note: {ckpt.path.name} holds the weights after epoch {ckpt.epoch} (step {ckpt.step}); the run went on "
                f"to step {steps} in an epoch cut by its time budget, which a baseline run does not save")
    return base_model, tuned, base, note


def _stage_edited(out: Path, adapter: Path, base: str, overwrite: bool) -> Any:
    """The staged --out of an edited model, checked before any model loads (as `deltatune merge`)."""
    from .train.model import resolve_model_path
    from .train.outputs import stage_output
    for what, f in (("the base model", resolve_model_path(base)), ("the adapter", adapter)):
        if f.exists() and _contains(out, f):
            raise DeltatuneError(f"--out {out} would write over {what} ({f}); give a new folder for the edited model")
    existing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if existing and overwrite and not (out / "config.json").is_file():
        raise DeltatuneError(f"--out {out}: holds files but no config.json, so it is not a model this command wrote; "
                             f"--overwrite replaces only such a folder: give a new folder")
    return stage_output(out, existing, overwrite, "files",
                        "add --overwrite to replace that model, or give a new folder", always_stage=True)


def _write_edited(output: Any, model: Any, encoder: Any, head: Any, adapter: Path, base: str,
                  meta: dict[str, Any], factor: float) -> None:
    import deltatune as dt
    import torch

    from .train.model import load_tokenizer
    dt.unload(model, merge=True)
    for n, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DeltatuneError(f"the edited model has non-finite values in {n}; nothing was written")
    encoder.save_pretrained(str(output.work), safe_serialization=True)
    load_tokenizer(base).save_pretrained(str(output.work))
    if head is not None:
        labels = _label_names(adapter / "metrics.json", int(head.shape[0]))
        _write_head(output.work, model.classifier, {
            "num_labels": int(head.shape[0]), "label_names": labels, "pooling": "masked mean", "adapter": str(adapter),
            "method": meta.get("method"), "intruders_scaled_by": factor})
    output.commit()


def _contains(outer: Path, inner: Path) -> bool:
    outer, inner = outer.resolve(), inner.resolve()
    return inner == outer or outer in inner.parents


def _label_names(metrics: Path, num_labels: int) -> list[str] | None:
    """The label names a training run recorded in ``metrics.json`` (None without the file)."""
    if not metrics.is_file():
        return None
    fix = "fix the file or delete it (the merged head then has no label names)"
    try:
        record = json.loads(metrics.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DeltatuneError(f"{metrics}: not valid UTF-8 JSON ({e}); {fix}") from None
    names = record.get("label_names") if isinstance(record, dict) else None
    if not isinstance(record, dict) or not (names is None or (
            isinstance(names, list) and len(names) == num_labels and all(isinstance(n, str) for n in names))):
        raise DeltatuneError(f"{metrics}: 'label_names' must be a list of {num_labels} strings (one per output of "
                             f"the head); {fix}")
    return names


def _write_head(folder: Path, head: Any, info: dict[str, Any]) -> None:
    from safetensors.torch import save as st_save

    from .files import atomic_write_bytes
    head_bytes = st_save({"weight": head.weight.detach().contiguous().cpu(),
                          "bias": head.bias.detach().contiguous().cpu()}, metadata={"format": "pt"})
    atomic_write_bytes(folder / "classifier.safetensors", head_bytes)
    atomic_write_bytes(folder / "classifier.json", (json.dumps(info, indent=2) + "\n").encode())


def cmd_merge(ns: argparse.Namespace) -> int:
    """Every input is read and checked, and the merged weights checked finite, before anything is
    written; the output folder then appears complete or not at all (``outputs.stage_output``)."""
    import deltatune as dt
    import torch

    from .core.io import read_adapter
    from .train.model import TextClassifier, load_encoder, load_tokenizer, resolve_model_path
    from .train.outputs import stage_output

    adapter, out = Path(ns.adapter), Path(ns.out)
    model_dir = resolve_model_path(ns.model)
    for what, folder in (("the base model", model_dir), ("the adapter", adapter)):
        if folder.exists() and _contains(out, folder):
            raise DeltatuneError(f"--out {out} would write over {what} ({folder}); give a new folder for the "
                                 f"merged model")
    meta, tensors = read_adapter(adapter)
    head_weight = tensors.get("modules.classifier.weight")
    if head_weight is not None and head_weight.dim() != 2:
        raise DeltatuneError(f"{adapter}: the classifier head weight has shape {tuple(head_weight.shape)}; a "
                             f"linear head needs (num_labels, hidden)")
    labels = _label_names(adapter / "metrics.json", int(head_weight.shape[0])) if head_weight is not None else None
    existing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if existing and ns.overwrite and not (out / "config.json").is_file():
        raise DeltatuneError(f"--out {out}: holds files but no config.json, so it is not a merged model this "
                             f"command wrote; --overwrite replaces only such a folder: give a new folder")
    output = stage_output(out, existing, ns.overwrite, "files",
                          "add --overwrite to replace that merged model, or give a new folder", always_stage=True)
    try:
        encoder = load_encoder(ns.model)
        model: Any = encoder if head_weight is None else TextClassifier(encoder, int(head_weight.shape[0]))
        dt.load_adapter(model, adapter)
        dt.unload(model, merge=True)
        for name, t in model.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise DeltatuneError(f"merging {adapter} gives non-finite values in {name}; the adapter does not fit "
                                     f"this model's weights (nothing was written)")
        tokenizer = load_tokenizer(ns.model)
        encoder.save_pretrained(str(output.work), safe_serialization=True)
        tokenizer.save_pretrained(str(output.work))
        if head_weight is not None:
            _write_head(output.work, model.classifier, {
                "num_labels": int(head_weight.shape[0]), "label_names": labels, "pooling": "masked mean",
                "adapter": str(adapter), "method": meta.get("method")})
        output.commit()
    except BaseException:
        output.discard()
        raise
    print(f"merged {meta.get('method')} adapter {adapter} into {ns.model}; saved the model to {out}"
          + (" with its classification head (classifier.safetensors + classifier.json)" if head_weight is not None
             else ""))
    return 0


def one_line(message: str) -> str:
    """``message`` on one line: line breaks and other control characters (which a hostile file
    name or option value can carry into a message) are shown escaped."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in message)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; bad input ends in one line on stderr naming the problem and the fix, and
    exit status 2 (``--debug`` shows the traceback instead)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    ns, extra = parser.parse_known_args(argv)
    if extra and ns.command not in ("train", "plan"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = getattr(ns, "debug", False)
    try:
        return run_command(ns, extra)
    except DeltatuneError as e:
        if debug:
            raise
        print(f"deltatune {ns.command}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"deltatune {ns.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:      # a defect of deltatune, not of the input: say so, briefly
        if debug:
            raise
        print(f"deltatune {ns.command}: internal error: {type(e).__name__}: {one_line(str(e))} (run again with "
              f"--debug for the traceback, and please report it)", file=sys.stderr)
        return 1


def run_command(ns: argparse.Namespace, extra: list[str]) -> int:
    if ns.command == "train":
        return cmd_train(ns, extra)
    if ns.command == "methods":
        return cmd_methods()
    if ns.command == "inspect":
        return cmd_inspect(ns)
    if ns.command == "merge":
        return cmd_merge(ns)
    if ns.command == "plan":
        from .plan import main_plan
        return main_plan(ns, extra)
    if ns.command == "bench" and ns.bench == "optim":
        from .bench.optim import main_optim
        return main_optim(ns)
    if ns.command == "bench" and ns.bench == "methods":
        from .bench.methods import main_methods
        return main_methods(ns)
    from .bench.speed import main_speed
    return main_speed(ns)


if __name__ == "__main__":
    sys.exit(main())
