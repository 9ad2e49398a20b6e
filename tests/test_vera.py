"""VeRA against its definition: h = W x + b + diag(b_v) B diag(d) A x with A, B frozen, random,
shared across layers and regenerated from the seed; the file holds only the vectors."""

from __future__ import annotations

import gc
import os
import tempfile

import torch
from safetensors import safe_open

import deltatune as dt
from deltatune.core.engine import wrappers
from models import minilm_classifier, tiny_llama


def test_forward_is_the_papers_formula_and_matrices_are_shared_and_frozen():
    model = tiny_llama().eval()
    dt.attach(model, dt.config("vera", r=32, targets=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in dt.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g))
    layers = dict(wrappers(model))
    q0, q1 = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.1.self_attn.q_proj"]
    d0, d1 = q0.deltas["default"], q1.deltas["default"]
    assert d0.vera_A.data_ptr() == d1.vera_A.data_ptr() and d0.vera_B.data_ptr() == d1.vera_B.data_ptr()
    assert not d0.vera_A.requires_grad and not d0.vera_B.requires_grad
    assert {n.rsplit(".", 1)[1] for n, _ in dt.trainable_parameters(model)} == {"vera_d", "vera_b"}
    x = torch.randn(3, 64, generator=g)
    with torch.no_grad():
        want = x @ q0.base.weight.T + (d0.vera_b * ((d0.vera_d * (x @ d0.vera_A.T)) @ d0.vera_B.T))
        torch.testing.assert_close(q0(x), want)
        # the matrices are the paper's Kaiming-uniform draw: |A| <= 1/sqrt(fan_in), |B| <= 1/sqrt(r)
        assert d0.vera_A.abs().max() <= 64 ** -0.5 and d0.vera_B.abs().max() <= 32 ** -0.5
        assert d0.vera_A.std() > 0.5 * 64 ** -0.5 / 3 ** 0.5     # uniform, not zeros


def test_matrices_are_regenerated_from_the_seed_alone():
    model = tiny_llama()
    dt.attach(model, dt.config("vera", r=16, seed=7, targets=["q_proj"]))
    d = next(w for _, w in wrappers(model)).deltas["default"]
    A, B = d.vera_A.clone(), d.vera_B.clone()
    dt.delete_adapter(model, "default")
    assert not hasattr(model, "deltatune_shared"), "the adapter-level module outlives its adapter"
    del model, d
    gc.collect()
    regenerated = tiny_llama()
    dt.attach(regenerated, dt.config("vera", r=16, seed=7, targets=["q_proj"]))
    d = next(w for _, w in wrappers(regenerated)).deltas["default"]
    assert torch.equal(d.vera_A, A) and torch.equal(d.vera_B, B)
    other = tiny_llama()
    dt.attach(other, dt.config("vera", r=16, seed=8, targets=["q_proj"]))
    assert not torch.equal(next(w for _, w in wrappers(other)).deltas["default"].vera_A, A)


def test_minilm_file_is_within_ten_percent_of_the_vectors():
    """The issue's bound: VeRA on MiniLM (query/value, r=256) saves about its vectors' bytes."""
    model = minilm_classifier()
    dt.attach(model, dt.config("vera", r=256, targets=["query", "value"]))
    vectors = sum(p.numel() * p.element_size() for _, p in dt.trainable_parameters(model))
    assert vectors == 12 * (256 + 384) * 4          # 6 layers x (query, value) x (d + b), float32
    with tempfile.TemporaryDirectory() as tmp:
        dt.save_adapter(model, tmp)
        size = os.path.getsize(os.path.join(tmp, "adapter.safetensors"))
        with safe_open(os.path.join(tmp, "adapter.safetensors"), framework="pt") as f:
            assert not [k for k in f.keys() if "vera_A" in k or "vera_B" in k]
    assert size <= 1.10 * vectors, (size, vectors)


def test_the_matrices_are_one_adapter_level_module_that_moves_with_the_model():
    """Shared once: listed once among the model's buffers, and still one tensor per shape after
    ``model.to(...)`` (per-layer buffers aliasing one tensor would be copied once per layer)."""
    model = tiny_llama().eval()
    dt.attach(model, dt.config("vera", r=16, targets=["q_proj", "v_proj"]))
    holder = model.deltatune_shared["default"]
    assert sorted(holder._buffers) == ["A_16x64", "B_32x16", "B_64x16"]    # q: 64 out, v: 2 kv heads x 16
    assert sum("deltatune_shared" in n for n, _ in model.named_buffers()) == 3
    model.to(torch.float64)
    layers = [w.deltas["default"] for _, w in wrappers(model)]
    assert len({d.vera_A.data_ptr() for d in layers}) == 1
    assert all(d.vera_A.dtype == torch.float64 for d in layers)
    assert not any("deltatune_shared" in n for n, _ in dt.trainable_parameters(model))
    state = dt.core.io.adapter_state(model, "default")
    assert not [k for k in state if k.startswith("shared.")]      # regenerated, so not saved


def test_an_adapter_with_shared_state_on_a_sequential_model():
    """The adapter-level holder is a child of the root: a Sequential root runs it as a no-op."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = model(x)
        dt.attach(model, dt.config("vera", r=4, targets=["0", "2"]))
        torch.testing.assert_close(model(x), before)
