"""What ``deltatune train`` needs from a task, whatever its kind.

A task kind turns the run's arguments into a ``TaskSetup``: the model to adapt, the two splits
and how to score them. The loop (``loop.train``) is then the same for every kind:

- ``text`` (``bbc``, ``tweets``, a CSV/JSONL file): MiniLM (or a local encoder) with a
  mean-pooled classification head, scored by accuracy;
- ``vision`` (``fashion``): a pretrained CNN with a new classification head, scored by accuracy;
- ``lm`` (``lm``): a causal LM on packed blocks of real English text, scored by perplexity.

The kinds that need extra modules are imported only when their task is asked for.

A split is any object with ``num_batches(batch_size)``, ``batches(batch_size, order)`` (dicts of
tensors, each with a ``labels`` entry whose first dimension is the number of examples),
``grouped_order(batch_size, generator)`` (the shuffled order of one training epoch) and
``length_order()`` (the evaluation order), plus ``len()``. The model's
``forward(**batch)`` returns ``(logits, loss)`` with ``loss`` a mean over the batch.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.errors import DeltatuneError

# metric name -> True when larger is better
METRICS = {"test_accuracy": True, "test_perplexity": False}

# task name -> module with ``setup(args) -> TaskSetup`` (text is the fallback for files)
KINDS = {"fashion": "deltatune.train.vision", "lm": "deltatune.train.lm"}
TEXT_TASKS = ("bbc", "tweets")


class EqualSizeSplit:
    """The order part of the split protocol for examples of one size (images, packed blocks):
    nothing to group by length, so an epoch is a plain shuffle and evaluation goes in order.
    Subclasses provide ``__len__`` and ``batches``."""

    def __len__(self) -> int:
        raise NotImplementedError

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def grouped_order(self, batch_size: int, generator: torch.Generator) -> list[int]:
        return torch.randperm(len(self), generator=generator).tolist()

    def length_order(self) -> list[int]:
        return list(range(len(self)))


@dataclasses.dataclass
class TaskSetup:
    description: str
    model: torch.nn.Module
    train: Any
    test: Any
    # evaluate(model, split, batch_size, device, precision) -> {"test_loss": ..., metric: ...}
    evaluate: Callable[..., dict[str, float]]
    model_name: str = ""
    metric: str = "test_accuracy"
    head: str | None = "classifier"      # a new module that trains (and saves) with every method
    label_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise DeltatuneError(f"unknown task metric {self.metric!r}; known: {', '.join(METRICS)}")


def task_kind(data: str) -> str:
    """``text``, ``vision`` or ``lm`` for a task name or data file."""
    if data in KINDS:
        return KINDS[data].rsplit(".", 1)[1]
    return "text"


def is_known_task(data: str) -> bool:
    return data in KINDS or data in TEXT_TASKS or Path(data).is_file()


def setup_task(args: Any) -> TaskSetup:
    """The ``TaskSetup`` of ``args.data`` (a ``TrainArgs``)."""
    module = KINDS.get(args.data)
    if module is None:
        return setup_text(args)
    return importlib.import_module(module).setup(args)


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, split: Any, batch_size: int, device: torch.device,
                        precision: str = "fp32") -> dict[str, float]:
    """Test accuracy and mean cross-entropy of a classifier over ``split``."""
    from .loop import autocast
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    for batch in split.batches(batch_size, split.length_order()):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, precision):
            logits, loss = model(**batch)
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        loss_sum += float(loss) * len(batch["labels"])
        n += len(batch["labels"])
    model.train(was_training)
    return {"test_accuracy": correct / max(n, 1), "test_loss": loss_sum / max(n, 1)}


def check_max_length(max_length: int, limit: int | None, model_name: str) -> None:
    """Refuse a ``--max-length`` beyond the model's position embeddings before anything is
    tokenised (it would fail deep inside the first forward pass)."""
    if limit is not None and max_length > limit:
        raise DeltatuneError(f"--max-length {max_length} is above the {limit} positions of model {model_name!r}; "
                             f"use --max-length {limit} or less")


def setup_text(args: Any) -> TaskSetup:
    from .data import encode_task, load_task
    from .model import MINILM, build_classifier, load_tokenizer, max_positions
    model_name = args.model or MINILM
    check_max_length(args.max_length, max_positions(model_name), model_name)
    task = load_task(args.data)
    tokenizer = load_tokenizer(model_name)
    train_split, test_split = encode_task(tokenizer, task, args.max_length)
    model = build_classifier(model_name, task.num_labels, seed=args.seed, dropout=args.head_dropout)
    return TaskSetup(description=task.describe(), model=model, train=train_split, test=test_split, model_name=model_name,
                     evaluate=evaluate_classifier, label_names=list(task.label_names))
