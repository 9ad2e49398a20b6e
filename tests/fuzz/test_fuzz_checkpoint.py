"""Property-based fuzzing of the checkpoint reader: ``load_checkpoint`` and ``restore``.

Each example starts from a real checkpoint of a small AdamW + LambdaLR run (with and without
optimizer state, one or two parameter groups) and mutates it: metadata entries deleted or
replaced (random strings, numbers, JSON), the JSON documents inside edited at random places,
tensors dropped, renamed, re-typed, reshaped, poisoned, added; then the sha256 digest is
usually recomputed (a hostile file can always carry a valid digest: it proves integrity, not
origin) and the bytes maybe damaged. The property: each input either loads and restores, and
then the run holds the file's parameters and can take a training step, or raises a
``CheckpointError``; never another exception, and a refused restore leaves the model, the
optimizer and the scheduler as they were.
"""

from __future__ import annotations

import copy
import functools
import json
import tempfile
import warnings
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from deltatune.train.checkpoint import CHECKPOINT_FILE, _digest, load_checkpoint, restore, save_checkpoint
from fuzzing import FUZZ, counted
from test_fuzz_adapters import FOCI, JSON, KEYS, damage_safetensors, edits, mutate_json, mutate_tensors, write


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.relu(self.body(self.frozen(x))))


def make_run(groups: int):
    torch.manual_seed(0)
    model = Toy()
    if groups == 1:
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = [{"params": list(model.body.parameters()), "lr": 0.05}, {"params": list(model.head.parameters())}]
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def train_step(model, opt, sched):
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    model(x).square().mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


RUNS = {"stepped": (1, 2), "fresh": (1, 0), "two-groups": (2, 3)}    # name -> (groups, steps before saving)


@functools.lru_cache(maxsize=None)
def real_checkpoints() -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (groups, n) in RUNS.items():
            model, opt, sched = make_run(groups)
            for _ in range(n):
                train_step(model, opt, sched)
            path = Path(tmp) / f"{name}.safetensors"
            save_checkpoint(path, model, opt, sched, epoch=1, step=n, metrics=[{"epoch": 1, "loss": 0.5}],
                            args={"lr": 0.1, "method": "lora"})
            with safe_open(str(path), framework="pt") as f:
                out[name] = (load_file(path), dict(f.metadata()))
    return out


META_DOCS = ("metrics", "args", "scheduler", "optimizer")
META_STRINGS = st.one_of(st.text(max_size=8), st.sampled_from(["-1", "1.5", "9" * 30, "0", " 3", "+2", "", "{}", "[]",
                                                               "deltatune-checkpoint", "1", "null", "NaN"]),
                         JSON.map(json.dumps))


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def mutate_meta(draw, meta: dict[str, str], count: tuple[int, int] = (0, 3)) -> dict[str, str]:
    meta = dict(meta)
    for _ in range(draw(st.integers(*count))):
        key = draw(st.sampled_from(sorted(meta) + ["extra"]))
        op = draw(st.sampled_from(["delete", "replace", "edit", "edit", "edit"]))
        if op == "delete":
            meta.pop(key, None)
        elif op == "edit" and key in META_DOCS and key in meta and _is_json(meta[key]):
            meta[key] = json.dumps(mutate_json(draw, json.loads(meta[key])))
        else:
            meta[key] = draw(META_STRINGS)
    return meta


def run_state(model, opt, sched):
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict()))


def assert_same_run(before, after):
    assert before[0].keys() == after[0].keys() and all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1] == after[1], "the optimizer changed"
    assert before[2] == after[2], "the scheduler changed"


PARAMS = ["head.weight", "head.bias", "body.weight", "body.bias", "frozen.weight", "ghost", ""]
STATES = ["exp_avg", "exp_avg_sq", "step", "max_exp_avg_sq", "momentum_buffer", ""]
NAMES = st.one_of(st.builds("param/{}".format, st.sampled_from(PARAMS)),
                  st.builds("optim/{}/{}".format, st.sampled_from(PARAMS), st.sampled_from(STATES)),
                  st.sampled_from(["rng/torch", "rng/cuda/0", "rng/cuda/x", "rng/x", "optim/head.bias", "weights"]),
                  KEYS)


@FUZZ
@given(st.data())
def test_fuzz_load_checkpoint_and_restore(data):
    base = data.draw(st.sampled_from(sorted(RUNS)), label="checkpoint")
    groups = RUNS[base][0]
    tensors, meta = real_checkpoints()[base]
    focus = data.draw(st.sampled_from(FOCI), label="focus")      # "config": the metadata
    t = {} if focus == "hollow" else mutate_tensors(data.draw, tensors, NAMES, edits(focus, "tensors"))
    t = {k: v.contiguous() for k, v in t.items()}
    meta = mutate_meta(data.draw, meta, edits(focus, "config"))
    if data.draw(st.integers(0, 4), label="recompute digest") and "sha256" in meta:
        meta["sha256"] = _digest(t)
    mode = "maybe" if focus == "mixed" else "force" if focus == "bytes" else "off"
    blob = damage_safetensors(data.draw, save(t, metadata=meta), mode)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CHECKPOINT_FILE
        write(data.draw, path, blob, focus)
        stage, run, before = "load", None, None
        with counted("checkpoint"):
            ckpt = load_checkpoint(path)
            stage = "restore"
            run = make_run(groups)
            before = run_state(*run)
            restore(ckpt, *run)
            stage = "ok"
    if stage == "restore":          # refused by restore: nothing was changed
        assert_same_run(before, run_state(*run))
    elif stage == "ok":
        model, opt, sched = run
        params = dict(model.named_parameters())
        for n, v in ckpt.params.items():
            # NaN too: a diverged run's checkpoint is restored as it was (resuming it is the user's call)
            torch.testing.assert_close(params[n].detach(), v.to(params[n].dtype), rtol=0, atol=0, equal_nan=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train_step(model, opt, sched)     # the restored state is usable, not merely loaded
