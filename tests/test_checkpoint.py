"""Checkpoints: round trip, atomic writes (a process killed mid-write leaves the previous
checkpoint loadable), exact resumption, clear errors for corrupted files, no unpickling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from deltatune.train.checkpoint import (CHECKPOINT_FILE, KILL_ENV, CheckpointError, atomic_write_bytes,
                                        load_checkpoint, restore, save_checkpoint)
from deltatune.train.loop import linear_schedule

ROOT = Path(__file__).resolve().parents[1]


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.head(torch.relu(self.frozen(x)))


def make_run(seed: int = 0):
    torch.manual_seed(seed)
    model = Toy()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(20, 2))
    return model, opt, sched


def steps(model, opt, sched, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        x = torch.randn(8, 4)
        loss = nn.functional.cross_entropy(nn.functional.dropout(model(x), 0.2), (x.sum(1) > 0).long())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@pytest.fixture(autouse=True)
def no_torch_load(monkeypatch):
    """Loading a checkpoint never unpickles."""
    def refuse(*a, **k):
        raise AssertionError("torch.load was called")
    monkeypatch.setattr(torch, "load", refuse)


def test_round_trip_restores_training_exactly(tmp_path):
    model, opt, sched = make_run()
    steps(model, opt, sched, 3)
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, model, opt, sched, epoch=1, step=3, metrics=[{"epoch": 1, "acc": 0.5}],
                    args={"lr": 0.1, "targets": ["a"]})
    lr_at_save = sched.get_last_lr()
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask      # not mkstemp's 0600
    expected = steps(model, opt, sched, 4)
    expected_state = {k: v.clone() for k, v in model.state_dict().items()}

    ckpt = load_checkpoint(tmp_path)            # a folder means its checkpoint.safetensors
    assert (ckpt.epoch, ckpt.step) == (1, 3)
    assert ckpt.metrics == [{"epoch": 1, "acc": 0.5}] and ckpt.args == {"lr": 0.1, "targets": ["a"]}
    assert set(ckpt.params) == {"head.weight", "head.bias"}     # trainable parameters only
    assert any(k.endswith("/exp_avg_sq") for k in ckpt.tensors) and ckpt.tensors["rng/torch"].dtype == torch.uint8

    model2, opt2, sched2 = make_run(seed=123)     # different init and RNG: all comes from the checkpoint
    model2.frozen.load_state_dict(model.frozen.state_dict())
    restore(ckpt, model2, opt2, sched2)
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == lr_at_save
    assert steps(model2, opt2, sched2, 4) == expected
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected_state[k]), k


def test_restore_refuses_a_different_model(tmp_path):
    model, opt, sched = make_run()
    save_checkpoint(tmp_path / CHECKPOINT_FILE, model, opt, sched, epoch=1, step=0, metrics=[], args={})
    other = Toy()
    other.frozen.requires_grad_(True)
    with pytest.raises(CheckpointError, match=r"checkpoint.safetensors.*does not fit.*frozen.weight"):
        restore(load_checkpoint(tmp_path / CHECKPOINT_FILE), other)
    small = Toy()
    small.head = nn.Linear(4, 3)
    with pytest.raises(CheckpointError, match=r"parameter head\.bias has shape \(2,\) in the checkpoint but \(3,\)"):
        restore(load_checkpoint(tmp_path / CHECKPOINT_FILE), small)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty", "foreign", "missing"])
def test_corrupted_checkpoint_gives_clear_error(tmp_path, damage):
    model, opt, sched = make_run()
    steps(model, opt, sched, 1)
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, model, opt, sched, epoch=1, step=1, metrics=[], args={})
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        b = bytearray(data)
        b[-5] ^= 0xFF                               # inside the tensor data: only the digest notices
        path.write_bytes(bytes(b))
    elif damage == "garbage":
        path.write_bytes(os.urandom(300))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "foreign":
        save_file({"w": torch.zeros(2)}, str(path))
    else:
        path.unlink()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg
    assert {"truncate": "corrupted or truncated", "flip": "sha256", "garbage": "corrupted or truncated",
            "empty": "corrupted or truncated", "foreign": "not a deltatune training checkpoint",
            "missing": "no checkpoint file"}[damage] in msg


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")          # the write fails half-way through the protocol
    assert path.read_bytes() == b"old"
    assert not list(tmp_path.glob(".f.bin.*.tmp"))


def test_kill_hook_mid_write_leaves_previous_checkpoint(tmp_path):
    """A process killed while writing epoch 2's checkpoint: epoch 1's file is intact and loads."""
    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_checkpoint import make_run, steps
from deltatune.train.checkpoint import save_checkpoint
model, opt, sched = make_run()
for epoch in (1, 2):
    steps(model, opt, sched, 2)
    save_checkpoint({str(tmp_path / CHECKPOINT_FILE)!r}, model, opt, sched, epoch=epoch, step=2 * epoch,
                    metrics=[], args={{}})
    print("saved", epoch, flush=True)
"""
    env = dict(os.environ, **{KILL_ENV: "2"})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 137, r.stderr
    assert r.stdout.split() == ["saved", "1"]
    tmp = list(tmp_path.glob(f".{CHECKPOINT_FILE}.*.tmp"))
    assert len(tmp) == 1 and 0 < tmp[0].stat().st_size     # the half-written temp file, never renamed
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert ckpt.epoch == 1 and ckpt.step == 2
    # the next save cleans up the stale temp file
    model, opt, sched = make_run()
    save_checkpoint(tmp_path / CHECKPOINT_FILE, model, opt, sched, epoch=3, step=0, metrics=[], args={})
    assert not list(tmp_path.glob(f".{CHECKPOINT_FILE}.*.tmp"))


def test_kill_during_cli_training_then_resume_matches_uninterrupted(tmp_path):
    """`deltatune train` killed while writing epoch 2's checkpoint; `--resume` then finishes with
    exactly the metrics of an uninterrupted run (same test accuracy, same final train loss)."""
    pytest.importorskip("transformers")
    from test_train import make_dataset, make_tiny_model, run_cli, tiny_train_argv

    model = make_tiny_model(tmp_path / "tiny")
    data = make_dataset(tmp_path / "toy.csv", per_class=30)
    full, cut = tmp_path / "full", tmp_path / "cut"

    r = run_cli(tiny_train_argv(model, data, full, epochs=3))
    assert r.returncode == 0, r.stderr[-3000:]

    r = run_cli(tiny_train_argv(model, data, cut, epochs=3), **{KILL_ENV: "2"})
    assert r.returncode == 137, r.stderr[-3000:]
    assert not (cut / "metrics.json").exists()
    ckpt = load_checkpoint(cut / CHECKPOINT_FILE)       # the previous (epoch 1) checkpoint survives
    assert ckpt.epoch == 1 and len(ckpt.metrics) == 1

    r = run_cli(tiny_train_argv(model, data, cut, epochs=3) + ["--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout

    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((cut / "metrics.json").read_text())
    assert b["resumed_from_epoch"] == 1 and a["resumed_from_epoch"] is None
    assert b["test_accuracy"] == a["test_accuracy"]
    assert b["final_train_loss"] == a["final_train_loss"]
    assert b["test_loss"] == a["test_loss"]
    for ha, hb in zip(a["history"], b["history"]):
        assert {k: v for k, v in ha.items() if "seconds" not in k} == {k: v for k, v in hb.items() if "seconds" not in k}
    from safetensors.torch import load_file
    ta, tb = load_file(str(full / "adapter.safetensors")), load_file(str(cut / "adapter.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)     # bit-identical adapters


def _adalora_run():
    import deltatune as dt
    torch.manual_seed(0)
    model = Toy()
    dt.attach(model, dt.config("adalora", targets=["frozen"], init_r=4, target_r=2, total_step=10))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(20, 2))


def test_adapter_buffers_resume_with_the_parameters(tmp_path):
    """A rank mask pruned during training (a persistent buffer of the delta) comes back on resume;
    without it the resumed run would compute with every singular value again."""
    model, opt, sched = _adalora_run()
    steps(model, opt, sched, 2)
    mask = model.frozen.deltas["default"].adalora_mask
    mask[1:3] = False                       # as AdaLoRA's schedule prunes
    save_checkpoint(tmp_path / CHECKPOINT_FILE, model, opt, sched, epoch=1, step=2, metrics=[], args={})
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert set(ckpt.buffers) == {"frozen.deltas.default.adalora_mask"}
    fresh, fresh_opt, fresh_sched = _adalora_run()
    restore(ckpt, fresh, fresh_opt, fresh_sched)
    assert torch.equal(fresh.frozen.deltas["default"].adalora_mask, mask)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    other, other_opt, other_sched = make_run()      # a run without the adapter: refused by name
    with pytest.raises(CheckpointError, match="adapter buffers|does not fit"):
        restore(ckpt, other, other_opt, other_sched)


def test_batchnorm_statistics_of_a_full_fine_tune_resume(tmp_path):
    """Full fine-tuning of a convnet updates each BatchNorm's running statistics: they are part of
    the trained model, so the checkpoint keeps them, and a frozen BatchNorm's are left out."""
    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
        model[4].requires_grad_(False)
        model[4].eval()         # a frozen BatchNorm keeps its statistics (as ImageClassifier.train does)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(4, 1))
    model, opt, sched = run()
    for _ in range(3):
        model(torch.randn(8, 3, 6, 6) * 3 + 1).sum().backward()
        opt.step()
    save_checkpoint(tmp_path / CHECKPOINT_FILE, model, opt, sched, epoch=1, step=3, metrics=[], args={})
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert set(ckpt.buffers) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    fresh, fresh_opt, fresh_sched = run()
    assert not torch.equal(fresh[1].running_mean, model[1].running_mean)
    restore(ckpt, fresh, fresh_opt, fresh_sched)
    assert torch.equal(fresh[1].running_mean, model[1].running_mean) and int(fresh[1].num_batches_tracked) == 3
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


class Mixed(nn.Module):
    """An embedding, a matrix and a Conv2d kernel: what the projected optimizers project
    (moments of another shape, Tucker factors, 8-bit codes), with a vector they do not."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.lin = nn.Linear(16, 24)
        self.conv = nn.Conv2d(3, 8, 3)
        self.out = nn.Linear(24, 2)

    def forward(self, tokens, image):
        return self.out(torch.relu(self.lin(self.emb(tokens).mean(1)))) + self.conv(image).mean()


def _optimizer_steps(model, opt, n: int, zeroth_order: bool) -> None:
    for _ in range(n):
        tokens, image = torch.randint(0, 40, (4, 5)), torch.randn(4, 3, 8, 8)

        def loss():
            return model(tokens, image).pow(2).mean()

        if zeroth_order:
            opt.step(loss)
        else:
            loss().backward()
            opt.step()
            opt.zero_grad()


def _registered_optimizers():
    from deltatune.optim import OPTIMIZERS
    return sorted(OPTIMIZERS)


@pytest.mark.parametrize("name", _registered_optimizers())
def test_every_registered_optimizer_resumes_exactly_from_the_file(tmp_path, name):
    """Steps 1-3, a checkpoint file, a fresh model and optimizer restored from it, steps 4-6: the
    same parameters as six uninterrupted steps (the projected optimizers' low-rank moments,
    projectors and 8-bit codes, and MeZO's seed stream, all survive the file)."""
    from deltatune.optim import OPTIMIZERS, is_zeroth_order

    def build():
        torch.manual_seed(0)
        model = Mixed()
        return model, OPTIMIZERS[name]([{"params": list(model.parameters())}], 1e-2, 0.01)

    model, opt = build()
    zo = is_zeroth_order(opt)
    torch.manual_seed(1)
    _optimizer_steps(model, opt, 3, zo)
    path = save_checkpoint(tmp_path / "c.safetensors", model, opt, None, epoch=1, step=3, metrics=[], args={})
    _optimizer_steps(model, opt, 3, zo)

    resumed, opt2 = build()
    restore(load_checkpoint(path), resumed, opt2, restore_rng=True)
    _optimizer_steps(resumed, opt2, 3, zo)
    for (n, a), b in zip(model.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"{name}: {n} differs after resuming")


def test_a_checkpoint_of_another_state_layout_is_refused(tmp_path):
    """A GaLore checkpoint with 32-bit moments cannot go into its 8-bit variant (the state keys
    differ): refused on load with both layouts named, before anything is copied."""
    from deltatune.optim import OPTIMIZERS
    torch.manual_seed(0)
    model = Mixed()
    opt = OPTIMIZERS["galore_adamw"]([{"params": list(model.parameters())}], 1e-2, 0.0)
    _optimizer_steps(model, opt, 2, False)
    path = save_checkpoint(tmp_path / "c.safetensors", model, opt, None, epoch=1, step=2, metrics=[], args={})
    fresh = Mixed()
    before = [p.detach().clone() for p in fresh.parameters()]
    opt8 = OPTIMIZERS["galore_adamw8bit"]([{"params": list(fresh.parameters())}], 1e-2, 0.0)
    with pytest.raises(CheckpointError, match="exp_avg_codes"):
        restore(load_checkpoint(path), fresh, opt8)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters()))
