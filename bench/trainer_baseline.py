"""Baseline for `deltatune train`: a transformers ``Trainer`` + Hugging Face PEFT LoRA script.

This is the script a user writes today, with Trainer's default settings except what the task
needs to be the same work as ``deltatune train --data tweets --epochs 1``: the same packaged
MiniLM, the same deduplicated stratified split (read through deltatune's task loader so the
examples are identical), LoRA r=8 alpha=16 on query/value with the same learning rate, batch
size 32, max length 128, one epoch. Padding is per batch (``DataCollatorWithPadding``, the
default whenever a tokenizer is given). Prints the wall time and the test accuracy.

    .venv/bin/python bench/trainer_baseline.py --data tweets --epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from deltatune.train.data import load_task  # noqa: E402
from deltatune.train.model import resolve_model_path  # noqa: E402


class Texts(torch.utils.data.Dataset):
    def __init__(self, enc, labels):
        self.enc, self.labels = enc, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.enc["input_ids"][i], "attention_mask": self.enc["attention_mask"][i],
                "labels": self.labels[i]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="tweets")
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    a = p.parse_args()

    start = time.perf_counter()
    task = load_task(a.data)
    path = str(resolve_model_path("minilm"))
    tok = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=task.num_labels,
                                                                            trust_remote_code=False)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["query", "value"]))
    train = Texts(tok(task.train_texts, truncation=True, max_length=a.max_length), task.train_labels)
    test = Texts(tok(task.test_texts, truncation=True, max_length=a.max_length), task.test_labels)

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    with tempfile.TemporaryDirectory() as tmp:
        args = transformers.TrainingArguments(output_dir=tmp, num_train_epochs=a.epochs, learning_rate=a.lr,
                                              per_device_train_batch_size=a.batch_size,
                                              per_device_eval_batch_size=128, save_strategy="no",
                                              report_to=[], seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                                       processing_class=tok, compute_metrics=accuracy)
        t0 = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - t0
        acc = trainer.evaluate()["eval_accuracy"]
    result = {"test_accuracy": acc, "train_seconds": round(train_seconds, 1),
              "wall_seconds": round(time.perf_counter() - start, 1), "data": a.data, "epochs": a.epochs,
              "lr": a.lr, "batch_size": a.batch_size}
    print(json.dumps(result))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
