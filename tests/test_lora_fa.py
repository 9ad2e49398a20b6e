"""LoRA-FA ("LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning"),
LoRA's ``freeze_A`` option, against the paper's definition: ``A`` stays at its random init and only
``B`` trains (``r * out`` parameters per layer, counted here from the layers' shapes), ``A`` is
saved with the adapter (it cannot be redrawn), the merge is ``W + s B A`` exactly, and a training
forward keeps ``x A^T`` for ``B``'s gradient, not the layer's input ``x``. DoRA takes the option too."""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import deltatune as dt
from deltatune.core.errors import DeltatuneError

pytestmark = pytest.mark.usefixtures("one_thread")

R = 4
TARGETS = ["0", "2"]


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, 3))


def batch(seed: int = 1, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 12, generator=g), torch.randint(0, 3, (size,), generator=g)


def attached(method: str = "lora", seed: int = 0, **kw) -> nn.Module:
    model = mlp(seed)
    dt.attach(model, dt.config(method, r=R, alpha=8, targets=TARGETS, freeze_A=True, **kw))
    return model


def delta(model: nn.Module, target: str):
    return model.get_submodule(target).deltas["default"]


def train(model: nn.Module, steps: int = 5, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.AdamW(dt.parameter_groups(model, lr=lr))
    x, y = batch()
    losses = []
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_only_b_is_trainable_r_times_out_per_layer():
    pristine = mlp()
    outs = [pristine.get_submodule(t).out_features for t in TARGETS]
    assert trainable(attached()) == sum(R * out for out in outs)
    # DoRA adds its magnitude, one per output unit
    assert trainable(attached("dora")) == sum(R * out + out for out in outs)
    # a trained bias shift adds out per layer
    assert trainable(attached(bias="lora_only")) == sum(R * out + out for out in outs)


def test_a_stays_put_and_b_trains():
    model = attached()
    A0 = {t: delta(model, t).lora_A.clone() for t in TARGETS}
    assert all(A.abs().sum() > 0 for A in A0.values()), "A must start random, or a frozen A learns nothing"
    assert all(not delta(model, t).lora_A.requires_grad for t in TARGETS)
    losses = train(model, steps=20)
    for t in TARGETS:
        assert torch.equal(delta(model, t).lora_A, A0[t])
        assert delta(model, t).lora_B.abs().sum() > 0       # B starts at zero
    assert losses[-1] < losses[0]


def test_save_then_load_reproduces_the_adapter_and_keeps_a_frozen():
    model = attached()
    train(model)
    x, _ = batch(seed=2)
    model.eval()
    with torch.no_grad():
        want = model(x)
    with tempfile.TemporaryDirectory() as tmp:
        dt.save_adapter(model, tmp)
        with safe_open(f"{tmp}/adapter.safetensors", framework="pt") as f:
            keys = set(f.keys())
            assert torch.equal(f.get_tensor("deltas.0.lora_A"), delta(model, "0").lora_A)
        assert {f"deltas.{t}.lora_{n}" for t in TARGETS for n in "AB"} == keys
        fresh = mlp()        # another draw of A than the saved one would give another function
        dt.load_adapter(fresh, tmp, trainable=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), want)
    assert trainable(fresh) == trainable(model)
    assert all(not delta(fresh, t).lora_A.requires_grad for t in TARGETS)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_is_w_plus_s_b_a(method):
    model = attached(method)
    train(model)
    x, _ = batch(seed=3)
    model.eval()
    d = delta(model, "0")
    W = model.get_submodule("0").base.weight.detach().double()
    full = W + d.scale * d.lora_B.detach().double() @ d.lora_A.double()
    if method == "dora":
        full = full * (d.magnitude.detach().double() / full.norm(dim=1))[:, None]
    with torch.no_grad():
        want = model(x)
        dt.merge(model)
        assert torch.allclose(model.get_submodule("0").base.weight.double(), full, atol=1e-6)
        assert torch.allclose(model(x), want, atol=1e-5)


def saved_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes of the floating tensors autograd keeps for backward (dropout's 1-byte mask aside)."""
    shapes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            shapes.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return shapes


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_training_forward_keeps_x_a_not_x(dropout):
    def one_layer(freeze: bool) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 48))
        dt.attach(model, dt.config("lora", r=R, targets=["0"], freeze_A=freeze, dropout=dropout))
        return model.train()
    x = torch.randn(7, 64, requires_grad=True)     # an upstream layer trains: x needs its gradient
    assert (7, 64) in saved_shapes(one_layer(False), x)     # plain LoRA: x, for A's gradient
    kept = saved_shapes(one_layer(True), x)
    assert (7, 64) not in kept and (7, R) in kept


def test_an_embedding_gets_a_random_a_and_a_zero_b():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 3))
    ids = torch.randint(0, 20, (5, 6))
    with torch.no_grad():
        ref = model(ids)
    dt.attach(model, dt.config("lora", r=R, targets=["0"], freeze_A=True))
    d = delta(model, "0")
    assert d.lora_A.abs().sum() > 0 and d.lora_B.abs().sum() == 0
    with torch.no_grad():
        assert torch.equal(model(ids), ref)      # unchanged at init
    A = d.lora_A.clone()
    opt = torch.optim.AdamW(dt.parameter_groups(model, lr=1e-2))
    model(ids).square().mean().backward()
    opt.step()
    assert torch.equal(d.lora_A, A) and d.lora_B.abs().sum() > 0


def test_residual_init_with_frozen_a_is_unchanged_at_init_and_trains():
    pristine = mlp()
    x, _ = batch(seed=4)
    with torch.no_grad():
        ref = pristine(x)
    model = attached(init="pissa")
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5)
    losses = train(model, steps=10)
    assert losses[-1] < losses[0]


def test_loraplus_ratio_is_refused_with_a_frozen_a():
    with pytest.raises(DeltatuneError, match="freeze_A"):
        dt.config("lora", freeze_A=True, loraplus_lr_ratio=16)
    with pytest.raises(DeltatuneError):
        dt.config("lora", freeze_A="yes")
