"""MiSS, HiRA, GraLoRA and Lily against their definitions written here, and against Hugging Face PEFT
(an independent implementation of each) given the very same parameter values; plus each method's
defining property: MiSS's one shard shared by every block, HiRA's update of rank above r, GraLoRA's
per-block ranks, Lily's experts shared across layers and listed once."""

from __future__ import annotations

import copy
import tempfile

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import deltatune as dt
from deltatune.core.engine import wrappers
from models import small_cnn, tiny_llama


class Host(nn.Module):
    """One layer to adapt (``proj``), fed by a frozen one."""

    def __init__(self, fan_in: int, out: int, kind: str = "linear"):
        super().__init__()
        torch.manual_seed(0)
        self.kind, self.fan_in = kind, fan_in
        if kind == "embedding":
            self.proj = nn.Embedding(fan_in, out)
        else:
            self.pre = nn.Linear(8, fan_in)
            self.proj = nn.Linear(fan_in, out)

    def forward(self, x):
        return self.proj(x) if self.kind == "embedding" else self.proj(torch.tanh(self.pre(x)))

    def example(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(3)
        if self.kind == "embedding":
            return torch.randint(0, self.fan_in, (4, 6), generator=g)
        return torch.randn(4, 5, 8, generator=g)


def randomise(model: nn.Module, seed: int = 1) -> None:
    """Trained-like values for every adapter tensor, none at its initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in dt.trainable_parameters(model):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))


def delta_of(model: nn.Module, name: str = "proj", adapter: str = "default"):
    layer = dict(wrappers(model))[name]
    return layer, layer.deltas[adapter]


def peft_twin(model: nn.Module, config) -> nn.Module:
    return peft.get_peft_model(copy.deepcopy(model), config).eval()


def hidden(model: Host, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(model.pre(x))


# ----------------------------------------------------------------------------- MiSS

def test_initialisations_are_the_papers_and_leave_the_model_unchanged():
    """Zero D (MiSS); HiRA: A Kaiming-uniform, B zero (on an Embedding A zero, B standard normal);
    GraLoRA: each input block of A Kaiming-uniform over its own width, B zero; Lily: zero experts."""
    inits = {}
    for method, kind, kw in (("miss", "linear", {"r": 8}), ("hira", "linear", {}), ("hira", "embedding", {}),
                             ("gralora", "linear", {"k": 2}), ("lily", "linear", {})):
        model = Host(32, 24, kind).eval()
        before = model(model.example()).detach()
        dt.attach(model, dt.config(method, targets=["proj"], **kw))
        with torch.no_grad():
            assert torch.equal(model(model.example()), before), (method, kind)
        inits[method, kind] = delta_of(model)[1]
    assert not inits["miss", "linear"].miss_D.any()
    A, B = inits["hira", "linear"].hira_A, inits["hira", "linear"].hira_B
    assert not B.any() and A.abs().max() <= 32 ** -0.5 and A.std() > 0.5 * 32 ** -0.5 / 3 ** 0.5
    A, B = inits["hira", "embedding"].hira_A, inits["hira", "embedding"].hira_B
    assert not A.any() and 0.7 < B.std() < 1.3
    d = inits["gralora", "linear"]
    assert not d.gralora_B.any() and d.gralora_A.abs().max() <= 16 ** -0.5 and d.gralora_A.abs().max() > 32 ** -0.5
    d = inits["lily", "linear"]
    assert not d.lily_HP.any() and d.lily_A.abs().max() <= 32 ** -0.5 and d.lily_router.abs().max() <= 32 ** -0.5
    assert d.lily_A.std() > 0 and d.lily_router.std() > 0


@pytest.mark.parametrize("fan_in", [32, 30])       # 30: the last shard is narrower than r
def test_miss_is_one_shard_repeated_over_the_input_and_matches_peft(fan_in):
    model = Host(fan_in, 24).eval()
    twin_base = copy.deepcopy(model)
    dt.attach(model, dt.config("miss", r=8, targets=["proj"]))
    randomise(model)
    layer, d = delta_of(model)
    D = d.miss_D.detach()
    assert D.shape == (24, 8) and sum(p.numel() for _, p in dt.trainable_parameters(model)) == 8 * 24
    delta = torch.cat([D] * 4, dim=1)[:, :fan_in]       # [D D D D], cut to the layer's width
    x = model.example()
    with torch.no_grad():
        h = hidden(model, x)
        want = F.linear(h, layer.base.weight + delta, layer.base.bias)
        torch.testing.assert_close(model(x), want)
        torch.testing.assert_close(d.delta_weight(layer.base).float(), delta)
        twin = peft_twin(twin_base, peft.MissConfig(r=8, target_modules=["proj"]))
        twin.base_model.model.proj.miss_block["default"].copy_(D.T)
        torch.testing.assert_close(twin(x), model(x))
        dt.merge(model)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_miss_every_block_of_the_update_is_the_same_trained_shard():
    model = Host(32, 24)
    dt.attach(model, dt.config("miss", r=8, targets=["proj"]))
    randomise(model)
    layer, d = delta_of(model)
    shards = d.delta_weight(layer.base).split(8, dim=1)
    assert len(shards) == 4 and all(torch.equal(s, shards[0]) for s in shards)
    assert shards[0].abs().min() > 0        # the shard is the trained D, not zeros


def test_miss_bat_is_bones_block_affine_update_and_matches_peft():
    model = Host(32, 24).eval()
    twin_base = copy.deepcopy(model)
    dt.attach(model, dt.config("miss", r=8, mode="bat", targets=["proj"]))
    randomise(model)
    layer, d = delta_of(model)
    D, W = d.miss_D.detach(), layer.base.weight.detach()
    assert D.shape == (3, 8, 8)                 # one r x r matrix per block row
    delta = torch.zeros_like(W)
    for i in range(3):
        for j in range(4):
            block = W[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8]
            delta[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8] = block @ D[i] + D[i]
    x = model.example()
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.linear(hidden(model, x), W + delta, layer.base.bias))
        twin = peft_twin(twin_base, peft.MissConfig(r=8, init_weights="bat", target_modules=["proj"]))
        twin.base_model.model.proj.miss_block["default"].copy_(D)
        torch.testing.assert_close(twin(x), model(x))


def test_miss_mini_repeats_a_small_shard_down_the_output_and_matches_peft():
    model = Host(32, 24).eval()
    twin_base = copy.deepcopy(model)
    dt.attach(model, dt.config("miss", r=8, mode="mini", mini_r=4, targets=["proj"]))
    randomise(model)
    layer, d = delta_of(model)
    D = d.miss_D.detach()
    assert D.shape == (4, 8)
    delta = D.repeat(6, 4)
    x = model.example()
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.linear(hidden(model, x), layer.base.weight + delta, layer.base.bias))
        twin = peft_twin(twin_base, peft.MissConfig(r=8, init_weights="mini", mini_r=4, target_modules=["proj"]))
        twin.base_model.model.proj.miss_block["default"].copy_(D.T)
        torch.testing.assert_close(twin(x), model(x))


def test_miss_on_a_convolution_shares_the_shard_over_its_receptive_field():
    model = small_cnn().eval()
    dt.attach(model, dt.config("miss", r=8, targets=["conv2"]))
    randomise(model)
    layer, d = delta_of(model, "conv2")
    W = layer.base.weight.detach()                      # (16, 8, 3, 3): fan_in 72 = 9 shards
    delta = torch.cat([d.miss_D.detach()] * 9, dim=1).reshape(W.shape)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.conv2d(x, W + delta, layer.base.bias, stride=2, padding=1))


def test_miss_refuses_layers_it_cannot_cut_by_name_and_bad_fields_at_construction():
    with pytest.raises(dt.DeltatuneError, match="conv1.*27 x|conv1"):
        dt.attach(small_cnn(), dt.config("miss", r=8, mode="bat", targets=["conv1"]))
    with pytest.raises(dt.DeltatuneError, match="'proj' has 12 input features, fewer than r=16"):
        dt.attach(Host(12, 24), dt.config("miss", r=16, targets=["proj"]))
    with pytest.raises(dt.DeltatuneError, match="'proj' has 24 outputs, not divisible by mini_r=5"):
        dt.attach(Host(32, 24), dt.config("miss", mode="mini", mini_r=5, targets=["proj"]))
    with pytest.raises(dt.DeltatuneError, match="mini_r=4 applies to mode='mini' only"):
        dt.config("miss", mini_r=4)
    with pytest.raises(dt.DeltatuneError, match="mode='block' is not valid"):
        dt.config("miss", mode="block")


# ----------------------------------------------------------------------------- HiRA

@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_hira_is_the_frozen_weight_modulated_by_a_low_rank_product_and_matches_peft(kind):
    model = Host(32, 24, kind).eval()
    twin_base = copy.deepcopy(model)
    dt.attach(model, dt.config("hira", r=4, targets=["proj"]))
    with torch.no_grad():
        assert (model(model.example()) - twin_base(model.example())).abs().max() == 0     # identity at init
    randomise(model)
    layer, d = delta_of(model)
    A, B = d.hira_A.detach(), d.hira_B.detach()
    x = model.example()
    twin = peft_twin(twin_base, peft.HiraConfig(r=4, target_modules=["proj"]))
    wrapped = twin.base_model.model.proj
    with torch.no_grad():
        if kind == "embedding":     # (num_embeddings, dim) table: the 2-D view is its transpose
            W = layer.base.weight.detach().T
            want = F.embedding(x, (W + W * (B @ A)).T)
            wrapped.hira_embedding_A["default"].copy_(A)
            wrapped.hira_embedding_B["default"].copy_(B)
        else:
            W = layer.base.weight.detach()
            want = F.linear(hidden(model, x), W + W * (B @ A), layer.base.bias)
            wrapped.hira_A["default"].copy_(A)
            wrapped.hira_B["default"].copy_(B)
        torch.testing.assert_close(model(x), want)
        torch.testing.assert_close(twin(x), model(x))


def test_hira_on_a_convolution_matches_peft():
    model = small_cnn().eval()
    twin_base = copy.deepcopy(model)
    dt.attach(model, dt.config("hira", r=4, targets=["conv2"]))
    randomise(model)
    layer, d = delta_of(model, "conv2")
    twin = peft_twin(twin_base, peft.HiraConfig(r=4, target_modules=["conv2"]))
    wrapped = twin.base_model.model.conv2
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        wrapped.hira_A["default"].copy_(d.hira_A.reshape(4, 8, 3, 3))
        wrapped.hira_B["default"].copy_(d.hira_B.reshape(16, 4, 1, 1))
        torch.testing.assert_close(twin(x), model(x))


def test_hira_update_has_rank_far_above_r_where_lora_has_r():
    model = Host(32, 24)
    dt.attach(model, dt.config("hira", r=2, targets=["proj"]))
    randomise(model)
    layer, d = delta_of(model)
    delta = d.delta_weight(layer.base)
    assert torch.linalg.matrix_rank(d.hira_B.double() @ d.hira_A.double()) == 2
    assert torch.linalg.matrix_rank(delta) == 24        # full rank for a 24 x 32 layer, from r = 2


# ----------------------------------------------------------------------------- GraLoRA

def gralora_reference(A: torch.Tensor, B: torch.Tensor, k: int, rows: list[int], cols: list[int]) -> torch.Tensor:
    """The paper's block matrix: block (i, j) = B_ij A_ij, each pair of rank r / k, A_ij the i-th row
    chunk of A over input block j, B_ij the j-th column chunk of B over output block i."""
    c = A.shape[0] // k
    r0 = [sum(rows[:i]) for i in range(k)]
    c0 = [sum(cols[:j]) for j in range(k)]
    delta = torch.zeros(B.shape[0], A.shape[1], dtype=A.dtype)
    for i in range(k):
        for j in range(k):
            A_ij = A[i * c:(i + 1) * c, c0[j]:c0[j] + cols[j]]
            B_ij = B[r0[i]:r0[i] + rows[i], j * c:(j + 1) * c]
            delta[r0[i]:r0[i] + rows[i], c0[j]:c0[j] + cols[j]] = B_ij @ A_ij
    return delta


@pytest.mark.parametrize("k,hybrid_r", [(2, 0), (4, 0), (2, 4)])
def test_gralora_is_a_block_matrix_of_low_rank_pairs_and_matches_peft(k, hybrid_r):
    model = Host(32, 24).eval()
    twin_base = copy.deepcopy(model)
    dt.attach(model, dt.config("gralora", r=8, alpha=16, k=k, hybrid_r=hybrid_r, targets=["proj"]))
    randomise(model)
    layer, d = delta_of(model)
    A, B = d.gralora_A.detach(), d.gralora_B.detach()
    assert sum(p.numel() for _, p in dt.trainable_parameters(model)) == (8 + hybrid_r) * (32 + 24)
    delta = gralora_reference(A, B, k, [24 // k] * k, [32 // k] * k)
    if hybrid_r:
        delta = delta + d.hybrid_B.detach() @ d.hybrid_A.detach()
    delta = delta * 16 / (8 + hybrid_r)
    x = model.example()
    twin = peft_twin(twin_base, peft.GraloraConfig(r=8, alpha=16, gralora_k=k, hybrid_r=hybrid_r,
                                                    target_modules=["proj"]))
    wrapped = twin.base_model.model.proj
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.linear(hidden(model, x), layer.base.weight + delta, layer.base.bias))
        torch.testing.assert_close(d.delta_weight(layer.base).float(), delta)
        # PEFT stores A as [k, in/k, r] (input block j: A_.j transposed) and B as [k, r, out/k]
        wrapped.gralora_A["default"].copy_(A.reshape(8, k, 32 // k).permute(1, 2, 0))
        wrapped.gralora_B["default"].copy_(B.reshape(k, 24 // k, 8).transpose(1, 2))
        if hybrid_r:
            wrapped.gralora_A_general["default"].weight.copy_(d.hybrid_A)
            wrapped.gralora_B_general["default"].weight.copy_(d.hybrid_B)
        torch.testing.assert_close(twin(x), model(x))


def test_gralora_each_block_has_rank_r_over_k_and_the_whole_update_k_times_r():
    model = Host(32, 24)
    dt.attach(model, dt.config("gralora", r=4, k=2, targets=["proj"]))
    randomise(model)
    layer, d = delta_of(model)
    delta = d.delta_weight(layer.base)
    ranks = [int(torch.linalg.matrix_rank(b)) for rows in delta.split(12, 0) for b in rows.split(16, 1)]
    assert ranks == [2, 2, 2, 2]
    assert torch.linalg.matrix_rank(delta) == 8


def test_gralora_uneven_blocks_follow_the_definition_on_the_fast_path_and_in_merge():
    model = Host(30, 10).eval()         # k = 3: output blocks 4, 3, 3; input blocks 10, 10, 10
    dt.attach(model, dt.config("gralora", r=6, alpha=6, k=3, targets=["proj"]))
    randomise(model)
    layer, d = delta_of(model)
    delta = gralora_reference(d.gralora_A.detach(), d.gralora_B.detach(), 3, [4, 3, 3], [10, 10, 10])
    x = model.example()
    with torch.no_grad():
        want = F.linear(hidden(model, x), layer.base.weight + delta, layer.base.bias)
        torch.testing.assert_close(model(x), want)
        dt.merge(model)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_gralora_bad_fields_and_layers_are_refused():
    with pytest.raises(dt.DeltatuneError, match="r=6 must be divisible by k=4"):
        dt.config("gralora", r=6, k=4)
    with pytest.raises(dt.DeltatuneError, match="'proj' .*k=4"):
        dt.attach(Host(32, 3), dt.config("gralora", r=8, k=4, targets=["proj"]))


# ----------------------------------------------------------------------------- Lily

def lily_model(**kw) -> nn.Module:
    model = tiny_llama().eval()
    dt.attach(model, dt.config("lily", r=8, targets=["q_proj", "v_proj"], **kw))
    randomise(model)
    return model


def test_lily_layer_is_the_papers_routed_mixture_of_shared_experts():
    model = lily_model(num_experts=3, scaling=0.5)
    layer, d = delta_of(model, "model.layers.1.self_attn.q_proj")
    A, HP, R = d.lily_A.detach(), d.lily_HP.detach(), d.lily_router.detach()
    assert A.shape == (8, 64) and HP.shape == (3, 64, 8) and R.shape == (3, 8)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        h = x @ A.T
        w = torch.softmax(h @ R.T, dim=-1).mean(dim=(0, 1))      # the batch's average expert distribution
        want = layer.base(x) + 0.5 * h @ sum(w[i] * HP[i] for i in range(3)).T
        torch.testing.assert_close(layer(x), want)


@pytest.mark.parametrize("stride_A", [1, 2])
def test_lily_matches_peft_given_the_same_projectors_and_routers(stride_A):
    pristine = tiny_llama().eval()
    model = copy.deepcopy(pristine)
    dt.attach(model, dt.config("lily", r=8, num_experts=2, stride_A=stride_A, targets=["q_proj", "v_proj"]))
    randomise(model)
    twin = peft_twin(pristine, peft.LilyConfig(r=8, num_B=2, stride_A=stride_A, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, d in ((n, w.deltas["default"]) for n, w in wrappers(model)):
            wrapped = twin.base_model.model.get_submodule(name)
            wrapped.lily_A["default"].weight.copy_(d.lily_A)         # PEFT shares these modules as we do
            wrapped.lily_B["default"].weight.copy_(d.lily_HP.transpose(1, 2).reshape(-1, d.lily_HP.shape[1]))
            wrapped.lily_router["default"].weight.copy_(d.lily_router)
        ids = torch.randint(0, 512, (3, 7), generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(twin(input_ids=ids).logits, model(input_ids=ids).logits)


def test_lily_experts_are_shared_across_layers_listed_once_and_saved_once():
    model = lily_model()
    layers = dict(wrappers(model))
    q0, q1 = (layers[f"model.layers.{i}.self_attn.q_proj"].deltas["default"] for i in (0, 1))
    v0 = layers["model.layers.0.self_attn.v_proj"].deltas["default"]
    assert q0.lily_HP is q1.lily_HP and q0.lily_HP is not v0.lily_HP      # one expert set per role
    assert q0.lily_A is not q1.lily_A and q0.lily_router is not q1.lily_router
    params = [p for g in dt.parameter_groups(model, lr=1e-3) for p in g["params"]]
    assert sum(p is q0.lily_HP for p in params) == 1 and len({id(p) for p in params}) == len(params)
    # 4 routers (2 x 8) + q: 2 LPs (8 x 64), experts 2 x 64 x 8 + v: 2 LPs (8 x 64), experts 2 x 32 x 8
    assert sum(p.numel() for p in params) == 4 * 16 + 2 * 512 + 1024 + 2 * 512 + 512
    with tempfile.TemporaryDirectory() as tmp:
        dt.save_adapter(model, tmp)
        with safe_open(f"{tmp}/adapter.safetensors", framework="pt") as f:
            keys = list(f.keys())
        assert sum(k.startswith("shared.hp.") for k in keys) == 2 and sum(k.startswith("shared.lp.") for k in keys) == 4
        assert sum(k.endswith("lily_router") for k in keys) == 4 and len(keys) == 10
        fresh = tiny_llama().eval()
        dt.load_adapter(fresh, tmp)
        ids = torch.randint(0, 512, (2, 6))
        with torch.no_grad():
            torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_lily_stride_shares_one_projector_between_neighbouring_layers():
    model = lily_model(stride_A=2)
    layers = dict(wrappers(model))
    q0, q1 = (layers[f"model.layers.{i}.self_attn.q_proj"].deltas["default"] for i in (0, 1))
    assert q0.lily_A is q1.lily_A and q0.lily_router is not q1.lily_router


def test_lily_routing_depends_on_the_batch_so_it_neither_merges_nor_mixes_per_sample():
    model = lily_model()
    ids = torch.randint(0, 512, (2, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        together = model(input_ids=ids).logits[0]
        alone = model(input_ids=ids[:1]).logits[0]
    assert (together - alone).abs().max() > 1e-5, "the first sample's output should depend on the second"
    with pytest.raises(dt.DeltatuneError, match="cannot be merged|not foldable|fold"):
        dt.merge(model)
    with pytest.raises(dt.DeltatuneError):
        with dt.per_sample_adapters(model, ["default", None]):
            model(input_ids=ids)


@pytest.mark.parametrize("method", ["miss", "hira", "gralora"])
def test_a_convolution_without_zero_padding_is_refused_at_attach_by_name(method):
    model = small_cnn()
    model.conv2.padding_mode = "reflect"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dt.DeltatuneError, match="'conv2' has padding_mode='reflect'"):
        dt.attach(model, dt.config(method, targets=["conv2"], **({"r": 8} if method == "miss" else {})))
    assert not list(wrappers(model)) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
