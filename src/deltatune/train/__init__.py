"""Training tools behind ``deltatune train``: the built-in tasks (text classification on
MiniLM, ``fashion`` on EfficientNet-Lite0 in ``vision``, ``lm`` on SmolLM2 in ``lm``; ``tasks``
says what each provides to the loop).

- ``data``: the built-in datasets (BBC News, sentiment tweets) and CSV/JSONL files, the fixed
  stratified 80/20 split, tokenization with dynamic padding;
- ``model``: the packaged MiniLM encoder (or a local Hugging Face folder) with a mean-pooled
  classification head;
- ``checkpoint``: one-file atomic checkpoints (safetensors, never unpickled);
- ``loop``: the training loop, ``train(args) -> metrics``.

Importing this package does not import transformers; the functions that need it do.
"""

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .data import Task, load_task, stratified_split
from .loop import TrainArgs, train
from .model import TextClassifier, build_classifier, load_encoder, load_tokenizer

__all__ = ["Checkpoint", "CheckpointError", "Task", "TextClassifier", "TrainArgs", "build_classifier",
           "load_checkpoint", "load_encoder", "load_task", "load_tokenizer", "save_checkpoint",
           "stratified_split", "train"]
