"""Shared and random bases against their papers' definitions, written out here: NOLA
(A = Σ α_i A_i, B = Σ β_j B_j), RandLoRA (Σ_i B_i Λ_i A Γ_i, also against the real ``peft``),
ShareLoRA (one trained A per projection type) and MoS (A, B assembled from shards of global
pools). For each: the frozen material is regenerated from the seed, the file holds only the
trained tensors (within 10 % of their bytes, on MiniLM-shaped layers), and a saved adapter loads
into a fresh model with the same outputs, bit for bit.
"""

from __future__ import annotations

import copy
import gc
import math
import os

import pytest
import torch
from safetensors import safe_open

import deltatune as dt
from deltatune.core.engine import wrappers
from models import Classifier, tiny_gpt2, tiny_llama


def minilm_shaped() -> Classifier:
    """MiniLM's layer shapes (hidden 384, 12 heads, feed-forward 1536) in two layers with random
    weights: the file-size bound is measured on real sizes without loading MiniLM."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=512, hidden_size=384, num_hidden_layers=2, num_attention_heads=12,
                                  intermediate_size=1536, max_position_embeddings=64)
    torch.manual_seed(0)
    return Classifier(transformers.BertModel(cfg), 5).eval()


def bert_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def perturb(model, scale=0.1, seed=0):
    """Random values in every trained tensor (a zero-initialised factor would hide the formula)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in dt.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def deltas(model, adapter="default"):
    return {n: w.deltas[adapter] for n, w in wrappers(model)}


def file_bound_and_reload(model, tmp_path, build, keys_absent=()) -> tuple[int, int]:
    """Save, check the file's size against the trained tensors' bytes and that no frozen matrix
    is in it, reload into a fresh model and compare outputs exactly. Returns (size, trained bytes)."""
    trained = sum(p.numel() * p.element_size() for _, p in dt.trainable_parameters(model))
    dt.save_adapter(model, tmp_path)
    path = os.path.join(tmp_path, "adapter.safetensors")
    size = os.path.getsize(path)
    with safe_open(path, framework="pt") as f:
        saved = list(f.keys())
    assert not [k for k in saved if any(a in k for a in keys_absent)], saved
    assert size <= 1.10 * trained, (size, trained)
    fresh = build()
    dt.load_adapter(fresh, tmp_path)
    b = bert_batch()
    with torch.no_grad():
        assert torch.equal(model.eval()(**b), fresh.eval()(**b))
    return size, trained


# ----------------------------------------------------------------------------- NOLA

def test_nola_is_a_combination_of_seeded_bases():
    model = tiny_llama().eval()
    dt.attach(model, dt.config("nola", r=4, alpha=8, k=16, l=12, targets=["q_proj", "v_proj"]))
    perturb(model)
    layers = dict(wrappers(model))
    holder = model.deltatune_shared["default"]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        w = layers[name]
        d = w.deltas["default"]
        out, fan_in = w.base.weight.shape
        # the paper's formula, the bases read raw from the adapter-level module: A_i (r, fan_in),
        # B_j (out, r), each Kaiming-uniform over sqrt(count) (NOLA's normalisation)
        A_i = holder.get_buffer(f"nola_A_{16 * 4}x{fan_in}").view(16, 4, fan_in) / math.sqrt(16)
        B_j = holder.get_buffer(f"nola_B_{12 * out}x4").view(12, out, 4) / math.sqrt(12)
        assert A_i.abs().max() <= 1 / math.sqrt(16 * fan_in) and B_j.abs().max() <= 1 / math.sqrt(12 * 4)
        A = sum(d.nola_alpha[i] * A_i[i] for i in range(16))
        B = sum(d.nola_beta[j] * B_j[j] for j in range(12))
        with torch.no_grad():
            want = x @ (w.base.weight + (8 / 4) * B @ A).T
            torch.testing.assert_close(w(x), want)
    assert sorted(holder._buffers) == ["nola_A_64x64", "nola_B_384x4", "nola_B_768x4"]
    assert not any(b.requires_grad for b in holder.buffers())
    assert {n.rsplit(".", 1)[1] for n, _ in dt.trainable_parameters(model)} == {"nola_alpha", "nola_beta"}
    assert dt.count_parameters(model)[0] == 4 * (16 + 12)


def test_nola_starts_at_the_model_with_lora_scaled_a():
    model = tiny_llama().eval()
    ref = copy.deepcopy(model)
    dt.attach(model, dt.config("nola", targets=["q_proj"]))
    d = next(iter(deltas(model).values()))
    assert torch.equal(d.nola_beta, torch.zeros(1024))
    # α uniform in ±sqrt(3): var(A) = k var(α) var(A_i) = 1 / (3 fan_in), LoRA's Kaiming A
    assert d.nola_alpha.abs().max() <= 3 ** 0.5 and d.nola_alpha.std() > 0.9
    ids = torch.randint(0, 512, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
        A = torch.einsum("k,kri->ri", d.nola_alpha, d.basis_A)
    assert 0.7 < A.var().item() * 3 * 64 < 1.3


def test_nola_bases_are_regenerated_from_the_seed_alone():
    def bases(seed):
        model = tiny_llama()
        dt.attach(model, dt.config("nola", k=8, l=8, seed=seed, targets=["q_proj"]))
        d = next(iter(deltas(model).values()))
        return d.basis_A.clone(), d.basis_B.clone()

    A, B = bases(3)
    gc.collect()
    A2, B2 = bases(3)
    assert torch.equal(A, A2) and torch.equal(B, B2)
    assert not torch.equal(bases(4)[0], A)


def test_nola_file_holds_the_coefficients_only(tmp_path):
    model = minilm_shaped()
    dt.attach(model, dt.config("nola", targets=["query", "value"]))
    perturb(model)
    size, trained = file_bound_and_reload(model, tmp_path, minilm_shaped, keys_absent=("nola_A_", "nola_B_"))
    assert trained == 4 * (1024 + 1024) * 4          # 2 layers x (query, value) x (k + l), float32
    assert size < 1.05 * trained                    # measured: 33816 bytes for 32768


# ----------------------------------------------------------------------------- RandLoRA

def randlora_delta_by_the_paper(d) -> torch.Tensor:
    """``s Σ_i B_i diag(λ_i) A diag(γ_i)`` term by term, on the smaller side (transposed back
    when the output is the smaller side)."""
    D, n, r = d.randlora_B.shape
    total = sum(d.randlora_B[:, i] @ torch.diag(d.randlora_lambda[i]) @ d.randlora_A @ torch.diag(d.randlora_gamma[i])
                for i in range(n))
    return d.scale * (total if d.input_side else total.T)


def test_randlora_is_the_papers_sum_and_full_rank():
    model = tiny_llama().eval()
    dt.attach(model, dt.config("randlora", r=8, alpha=160, targets=["q_proj", "v_proj"]))
    perturb(model)
    layers = dict(wrappers(model))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    for name, (d_small, n) in {"model.layers.0.self_attn.q_proj": (64, 8),
                               "model.layers.1.self_attn.v_proj": (32, 4)}.items():
        w = layers[name]
        d = w.deltas["default"]
        assert d.randlora_lambda.shape == (n, 8) and d.randlora_gamma.shape == (n, d_small)
        with torch.no_grad():
            dw = randlora_delta_by_the_paper(d)
            torch.testing.assert_close(w(x), x @ (w.base.weight + dw).T)
            # n r >= d: the sum of rank-8 terms reaches the full rank of the smaller side
            assert torch.linalg.matrix_rank(dw.double()) == d_small > 8
    q0, q1 = layers["model.layers.0.self_attn.q_proj"].deltas["default"], \
        layers["model.layers.1.self_attn.q_proj"].deltas["default"]
    assert q0.randlora_A.data_ptr() == q1.randlora_A.data_ptr()       # one A per shape, shared
    assert {n.rsplit(".", 1)[1] for n, _ in dt.trainable_parameters(model)} == {"randlora_lambda", "randlora_gamma"}


@pytest.mark.parametrize("target, d_small", [("q_proj", 64), ("v_proj", 32)])
def test_randlora_matches_peft_given_the_same_bases_and_scalings(target, d_small):
    """The real ``peft`` RandLoRA with our bases and scalings copied in gives the same outputs.
    PEFT flattens its (r, n) scalings rank-major and its bases basis-major, so the same sum
    pairs each basis column with another (λ, γ): its B is ours with the columns relabelled."""
    peft = pytest.importorskip("peft")
    ours = tiny_llama().eval()
    pristine = copy.deepcopy(ours)
    theirs = peft.get_peft_model(copy.deepcopy(ours), peft.RandLoraConfig(
        r=8, randlora_alpha=160, target_modules=[target])).eval()
    dt.attach(ours, dt.config("randlora", r=8, alpha=160, targets=[target]))
    perturb(ours)
    holder = theirs.base_model
    for name, d in deltas(ours).items():
        D, n, r = d.randlora_B.shape
        layer = theirs.get_submodule(f"base_model.model.{name}")
        with torch.no_grad():
            layer.randlora_lambda["default"].copy_(d.randlora_lambda.T)
            layer.randlora_gamma["default"].copy_(d.randlora_gamma)
        holder.randlora_A["default"] = d.randlora_A[:, None, :].clone()
        holder.randlora_B["default"] = d.randlora_B.permute(0, 2, 1).reshape(D, n, r).clone()
        assert d.randlora_gamma.shape[1] == d_small
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        got = ours(input_ids=ids).logits
        assert (want - pristine(input_ids=ids).logits).abs().max() > 1e-3      # the update is not void
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_randlora_starts_at_the_model_and_saves_only_the_scalings(tmp_path):
    model = minilm_shaped()
    ref = copy.deepcopy(model)
    dt.attach(model, dt.config("randlora", targets=["query", "value"]))
    d = next(iter(deltas(model).values()))
    assert torch.equal(d.randlora_lambda, torch.zeros(12, 32))
    assert torch.equal(d.randlora_gamma, torch.full((12, 384), 1 / 384))
    b = bert_batch()
    with torch.no_grad():
        assert torch.equal(model(**b), ref(**b))
    perturb(model, scale=0.01)
    size, trained = file_bound_and_reload(model, tmp_path, minilm_shaped, keys_absent=("randlora_A", "randlora_B"))
    assert trained == 4 * 12 * (32 + 384) * 4        # n = 384 / 32 bases of (r + d) scalings per layer


# ----------------------------------------------------------------------------- ShareLoRA

def test_sharelora_is_lora_with_one_a_per_projection_type_and_matches_peft():
    """Every layer's q_proj uses one trained A (another for v_proj), each its own B; the real
    ``peft`` LoRA with that A copied into every layer and our Bs gives the same outputs, and the
    shared A's gradient is the sum of what PEFT's per-layer copies get."""
    peft = pytest.importorskip("peft")
    ours = tiny_llama().eval()
    theirs = peft.get_peft_model(copy.deepcopy(ours), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).eval()
    dt.attach(ours, dt.config("sharelora", r=4, alpha=8, targets=["q_proj", "v_proj"]))
    perturb(ours)
    holder = ours.deltatune_shared["default"]
    assert sorted(n for n, _ in holder.named_parameters()) == [
        "A__model__layers__self_attn__q_proj__4x64", "A__model__layers__self_attn__v_proj__4x64"]
    layers = deltas(ours)
    for name, d in layers.items():
        kind = name.rsplit(".", 1)[1]
        assert d.A is holder.get_parameter(f"A__model__layers__self_attn__{kind}__4x64")
        assert [n for n, _ in d.named_parameters()] == ["lora_B"]
        layer = theirs.get_submodule(f"base_model.model.{name}")
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(d.A)
            layer.lora_B["default"].weight.copy_(d.B)
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    want, got = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want.square().mean().backward()
    got.square().mean().backward()
    for kind in ("q_proj", "v_proj"):
        summed = sum(theirs.get_submodule(f"base_model.model.model.layers.{i}.self_attn.{kind}").lora_A["default"]
                     .weight.grad for i in range(2))
        torch.testing.assert_close(holder.get_parameter(f"A__model__layers__self_attn__{kind}__4x64").grad, summed)


def test_sharelora_shared_factor_is_one_parameter_listed_once_and_saved_once(tmp_path):
    model = minilm_shaped()
    ref = copy.deepcopy(model)
    dt.attach(model, dt.config("sharelora", targets=["query", "value"]))
    b = bert_batch()
    with torch.no_grad():
        assert torch.equal(model(**b), ref(**b))      # B = 0 at init
    shared = dict(model.deltatune_shared["default"].named_parameters())
    assert len(shared) == 2
    ids = [id(p) for g in dt.parameter_groups(model, lr=1e-3) for p in g["params"]]
    assert len(ids) == len(set(ids)) == 2 + 4          # two shared As, four per-layer Bs
    assert sum(id(p) == id(q) for p in model.parameters() for q in shared.values()) == 2
    assert dt.count_parameters(model)[0] == 4 * 384 * 8 + 2 * 8 * 384
    perturb(model, scale=0.01)
    file_bound_and_reload(model, tmp_path, minilm_shaped)
    with safe_open(os.path.join(tmp_path, "adapter.safetensors"), framework="pt") as f:
        keys = sorted(f.keys())
    assert [k for k in keys if k.startswith("shared.")] == [f"shared.{n}" for n in sorted(shared)]
    assert len([k for k in keys if k.endswith("lora_B")]) == 4 and not [k for k in keys if k.endswith("lora_A")]


@pytest.mark.parametrize("share, own, shared_names", [
    ("B", ["lora_A"], ["B__transformer__h__attn__c_attn__192x8"]),
    ("AB", [], ["A__transformer__h__attn__c_attn__8x64", "B__transformer__h__attn__c_attn__192x8"]),
])
def test_sharelora_can_share_b_or_both(share, own, shared_names):
    model = tiny_gpt2().eval()
    dt.attach(model, dt.config("sharelora", share=share))      # default targets: c_attn
    layers = deltas(model)
    assert len(layers) == 2
    holder = model.deltatune_shared["default"]
    assert sorted(n for n, _ in holder.named_parameters()) == shared_names
    perturb(model)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    for name, d in layers.items():
        assert [n for n, _ in d.named_parameters()] == own
        w = model.get_submodule(name)
        with torch.no_grad():     # GPT-2's Conv1D keeps its weight as (in, out)
            torch.testing.assert_close(w(x), x @ (w.base.weight + (16 / 8) * (d.B @ d.A).T) + w.base.bias)
    if share == "AB":
        d0, d1 = layers.values()
        assert torch.equal(d0.delta_weight(model.get_submodule("transformer.h.0.attn.c_attn").base),
                           d1.delta_weight(model.get_submodule("transformer.h.1.attn.c_attn").base))


# ----------------------------------------------------------------------------- MoS

def mos_factors_by_hand(d, pools, r, p, l):
    """A's rank vectors (rows) and B's (columns), each the concatenation of l shards: the first p
    from the layer's private shards, the rest from the public pool at the layer's indices."""
    rows = {}
    for which, dim in (("A", d.fan_in), ("B", d.out)):
        private = getattr(d, f"mos_private_{which}")
        pool = pools.get_parameter(getattr(d, f"pool_{which}"))
        index = getattr(d, f"index_{which}")
        vectors = []
        for i in range(r):
            shards = [private[i * l + t] if i < p else pool[index[i - p, t]] for t in range(l)]
            vectors.append(torch.cat(shards)[:dim])
        rows[which] = torch.stack(vectors)
    return rows["A"], rows["B"].T


def test_mos_factors_are_shards_of_shared_pools_and_private_ones():
    model = tiny_llama().eval()
    dt.attach(model, dt.config("mos", r=4, alpha=8, equivalent_r=3, private_r=1, shards_per_vector=2,
                               targets=["q_proj", "v_proj"]))
    perturb(model)
    pools = model.deltatune_shared["default"]
    # 4 layers, each adding (3 - 1) x 2 public shards per factor; q's B shards are 32 long, v's 16
    assert {n: tuple(p.shape) for n, p in pools.named_parameters()} == {
        "pool_A_32": (16, 32), "pool_B_32": (8, 32), "pool_B_16": (8, 16)}
    layers = dict(wrappers(model))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    routes = []
    for name, w in layers.items():
        d = w.deltas["default"]
        assert d.mos_private_A.shape == (2, 32) and d.mos_private_B.shape == (2, d.out // 2)
        A, B = mos_factors_by_hand(d, pools, r=4, p=1, l=2)
        with torch.no_grad():
            torch.testing.assert_close(w(x), x @ (w.base.weight + (8 / 4) * B @ A).T)
        for which in ("A", "B"):       # 6 public slots from a pool of 8 or 16 shards: no repeat
            index = getattr(d, f"index_{which}")
            assert index.shape == (3, 2) and len(set(index.flatten().tolist())) == 6
            routes.append(tuple(index.flatten().tolist()))
    assert len(set(routes)) == len(routes)     # every layer and factor routed on its own
    assert dt.count_parameters(model)[0] == sum(p.numel() for p in pools.parameters()) + 4 * 2 * 32 + 2 * 2 * (32 + 16)


def test_mos_pools_are_shared_and_private_shards_are_the_layers_own():
    model = tiny_llama().eval()
    dt.attach(model, dt.config("mos", targets=["q_proj"]))
    perturb(model)
    pools = model.deltatune_shared["default"]
    d0, d1 = deltas(model).values()
    w0 = model.get_submodule("model.layers.0.self_attn.q_proj").base
    d0.delta_2d(w0.weight).square().sum().backward()
    assert d1.mos_private_A.grad is None and d1.mos_private_B.grad is None
    assert d0.mos_private_A.grad.abs().sum() > 0 and d0.mos_private_B.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in pools.parameters())
    ids = [id(p) for g in dt.parameter_groups(model, lr=1e-3) for p in g["params"]]
    assert len(ids) == len(set(ids)) == 2 + 2 * 2      # two pools, two private tensors per layer


def test_mos_routing_is_regenerated_from_the_seed(tmp_path):
    def routes(seed):
        model = tiny_llama()
        dt.attach(model, dt.config("mos", seed=seed, targets=["q_proj", "v_proj"]))
        return [torch.cat([d.index_A.flatten(), d.index_B.flatten()]) for d in deltas(model).values()]

    first = routes(5)
    assert all(torch.equal(a, b) for a, b in zip(first, routes(5)))
    assert not all(torch.equal(a, b) for a, b in zip(first, routes(6)))
    square = tiny_llama()       # q_proj: A's and B's pools have one size, their indices still differ
    dt.attach(square, dt.config("mos", targets=["q_proj"]))
    assert all(not torch.equal(d.index_A, d.index_B) for d in deltas(square).values())
    model = minilm_shaped()
    ref = copy.deepcopy(model)
    dt.attach(model, dt.config("mos", targets=["query", "value"]))
    b = bert_batch()
    with torch.no_grad():
        assert torch.equal(model(**b), ref(**b))       # B's shards start at zero
    perturb(model, scale=0.01)
    size, trained = file_bound_and_reload(model, tmp_path, minilm_shaped, keys_absent=("index_",))
    assert trained == 4 * 2 * 2 * (192 + 192) * 4      # 4 layers x equivalent_r 2 x 2 shards x (A + B), float32


def test_mos_refuses_a_budget_with_no_public_shards():
    with pytest.raises(dt.DeltatuneError, match="private_r=2 must be below equivalent_r=2"):
        dt.config("mos", equivalent_r=2, private_r=2)
