"""LoKr, LoHa, FLoRA (Tucker) and FourierFT against their definitions written here, and against
Hugging Face PEFT (an independent implementation of LoKr, LoHa and FourierFT) given the very same
parameter values; plus each method's defining property: LoKr's Kronecker structure and LyCORIS's
split, LoHa's Hadamard rank above r, FLoRA's Tucker multilinear rank on the 4-D kernel,
FourierFT's seeded spectral entries and a file of coefficients only."""

from __future__ import annotations

import copy
import math
import os
import tempfile

import peft
import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lokr.layer import factorization as peft_factorization
from safetensors import safe_open
from torch import nn

import deltatune as dt
from deltatune.core.engine import wrappers
from deltatune.methods.structured.lokr import factorization
from models import small_cnn, tiny_gpt2, tiny_llama


class Host(nn.Module):
    """One Linear to adapt (``proj``), fed by a frozen one."""

    def __init__(self, fan_in: int, out: int):
        super().__init__()
        torch.manual_seed(0)
        self.pre, self.proj = nn.Linear(8, fan_in), nn.Linear(fan_in, out)

    def forward(self, x):
        return self.proj(torch.tanh(self.pre(x)))

    def example(self) -> torch.Tensor:
        return torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(3))


def randomise(model: nn.Module, seed: int = 1, std: float = 0.5) -> None:
    """Trained-like values for every adapter tensor, none at its initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in dt.trainable_parameters(model):
            p.copy_(std * torch.randn(p.shape, generator=g))


def delta_of(model: nn.Module, name: str = "proj", adapter: str = "default"):
    layer = dict(wrappers(model))[name]
    return layer, layer.deltas[adapter]


def peft_twin(model: nn.Module, config) -> nn.Module:
    return peft.get_peft_model(copy.deepcopy(model), config).eval()


def cnn_input() -> torch.Tensor:
    return torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(5))


def edited_cnn(model: nn.Module, name: str, delta4: torch.Tensor) -> nn.Module:
    """The reference: a plain small_cnn whose ``name`` kernel is ``W + ΔW``."""
    ref = small_cnn().eval()
    with torch.no_grad():
        getattr(ref, name).weight.add_(delta4)
    return ref


def kron(c: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The Kronecker product by its definition: block (i, j) is ``C[i, j] · M``."""
    return torch.cat([torch.cat([c[i, j] * m for j in range(c.shape[1])], dim=1) for i in range(c.shape[0])])


# ----------------------------------------------------------------------------- LoKr

def test_lokr_split_is_lycoris_factorization():
    """PEFT's own factorisation (LyCORIS's) against ours on every dimension below 300."""
    for dim in range(1, 300):
        for factor in (-1, 1, 2, 3, 4, 8, 16):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)
    assert factorization(384) == (16, 24) and factorization(64, 4) == (4, 16) and factorization(127) == (1, 127)


LOKR_CASES = {   # 24 = 4 x 6 out, 48 = 6 x 8 in
    "full_M": dict(r=8, alpha=4.0),                          # 8 >= max(6, 8) / 2: M one full matrix
    "lowrank_M": dict(r=2, alpha=3.0),                       # 2 < 4: M = B A
    "both_lowrank": dict(r=1, alpha=2.0, decompose_both=True),   # 1 < max(4, 6) / 2: C low-rank too
    "factor_4": dict(r=2, alpha=2.0, factor=4),              # 24 = 4 x 6, 48 = 4 x 12
}


@pytest.mark.parametrize("case", list(LOKR_CASES))
def test_lokr_is_the_kronecker_product_and_matches_peft(case):
    kw = LOKR_CASES[case]
    model = Host(48, 24).eval()
    twin_base = copy.deepcopy(model)
    dt.attach(model, dt.config("lokr", targets=["proj"], **kw))
    layer, d = delta_of(model)
    own = {n.rsplit(".", 1)[1]: p for n, p in dt.trainable_parameters(model)}
    zero = own["lokr_w1_a"] if "lokr_w1_a" in own else own["lokr_w1"]
    assert not zero.any() and all(p.abs().sum() > 0 for n, p in own.items() if p is not zero)
    randomise(model)
    p = {n: t.detach() for n, t in own.items()}
    c = p["lokr_w1_a"] @ p["lokr_w1_b"] if "lokr_w1_a" in p else p["lokr_w1"]
    m = p["lokr_w2_a"] @ p["lokr_w2_b"] if "lokr_w2_a" in p else p["lokr_w2"]
    o1, i1 = (4, 4) if kw.get("factor") == 4 else (4, 6)
    assert c.shape == (o1, i1) and m.shape == (24 // o1, 48 // i1)
    delta = kw["alpha"] / kw["r"] * kron(c, m)
    x = model.example()
    with torch.no_grad():
        want = F.linear(torch.tanh(model.pre(x)), layer.base.weight + delta, layer.base.bias)
        torch.testing.assert_close(model(x), want)
        twin = peft_twin(twin_base, peft.LoKrConfig(
            r=kw["r"], alpha=kw["alpha"], decompose_both=kw.get("decompose_both", False),
            decompose_factor=kw.get("factor", -1), target_modules=["proj"]))
        theirs = {n: getattr(twin.base_model.model.proj, n)["default"] for n in twin.base_model.model.proj.adapter_layer_names
                  if "default" in getattr(twin.base_model.model.proj, n)}
        assert {n: t.shape for n, t in theirs.items()} == {n: t.shape for n, t in p.items()}
        for n, t in theirs.items():
            t.copy_(p[n])
        torch.testing.assert_close(twin(x), model(x))
        dt.merge(model)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("r", [8, 1])       # M full (8 >= max(4, 4) / 2) and low-rank (its columns carry the kernel)
def test_lokr_on_a_conv_kernel_is_channel_kronecker_with_whole_kernels_in_m_and_matches_peft(r):
    model = small_cnn().eval()
    dt.attach(model, dt.config("lokr", r=r, alpha=2.0, targets=["conv2"]))    # 16 = 4 x 4 out, 8 = 2 x 4 in
    randomise(model)
    layer, d = delta_of(model, "conv2")
    p = {n.rsplit(".", 1)[1]: t.detach() for n, t in dt.trainable_parameters(model)}
    m2 = p["lokr_w2_a"] @ p["lokr_w2_b"] if r == 1 else p["lokr_w2"]
    assert p["lokr_w1"].shape == (4, 2) and m2.shape == (4, 4 * 9)
    m4 = m2.reshape(4, 4, 3, 3)
    # the kernel's channel (o, i) pair is (o1 o2, i1 i2), its spatial taps M's own
    delta4 = 2.0 / r * torch.einsum("ac,bdkl->abcdkl", p["lokr_w1"], m4).reshape(16, 8, 3, 3)
    x = cnn_input()
    with torch.no_grad():
        torch.testing.assert_close(model(x), edited_cnn(model, "conv2", delta4)(x))
        twin = peft_twin(small_cnn(), peft.LoKrConfig(r=r, alpha=2.0, target_modules=["conv2"]))
        conv = twin.base_model.model.conv2
        conv.lokr_w1["default"].copy_(p["lokr_w1"])
        if r == 1:
            conv.lokr_w2_a["default"].copy_(p["lokr_w2_a"])
            conv.lokr_w2_b["default"].copy_(p["lokr_w2_b"])
        else:
            conv.lokr_w2["default"].copy_(m4)       # PEFT keeps a full M in the kernel's shape
        torch.testing.assert_close(twin(x), model(x))


def test_lokr_config_and_layer_errors_name_the_fix():
    with pytest.raises(dt.DeltatuneError, match="factor=0"):
        dt.config("lokr", factor=0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"))
    for name in ("lokr", "loha", "flora_tucker"):
        with pytest.raises(dt.DeltatuneError, match=r"'0'.*padding_mode='circular'"):
            dt.attach(model, dt.config(name, targets=["0"]))


# ----------------------------------------------------------------------------- LoHa

def test_loha_is_the_hadamard_product_of_two_low_rank_products_and_matches_peft():
    model = Host(32, 24).eval()
    twin_base = copy.deepcopy(model)
    dt.attach(model, dt.config("loha", r=4, alpha=6.0, targets=["proj"]))
    layer, d = delta_of(model)
    # FedPara's He initialisation with the second product's right factor zero (as PEFT)
    assert not d.hada_w2_b.any() and all(t.abs().sum() > 0 for t in (d.hada_w1_a, d.hada_w1_b, d.hada_w2_a))
    randomise(model)
    b1, a1, b2, a2 = (t.detach() for t in (d.hada_w1_a, d.hada_w1_b, d.hada_w2_a, d.hada_w2_b))
    assert b1.shape == (24, 4) and a1.shape == (4, 32)
    delta = torch.empty(24, 32)
    for i in range(24):
        for j in range(32):
            delta[i, j] = 1.5 * (b1[i] @ a1[:, j]) * (b2[i] @ a2[:, j])
    x = model.example()
    with torch.no_grad():
        want = F.linear(torch.tanh(model.pre(x)), layer.base.weight + delta, layer.base.bias)
        torch.testing.assert_close(model(x), want)
        twin = peft_twin(twin_base, peft.LoHaConfig(r=4, alpha=6.0, target_modules=["proj"]))
        proj = twin.base_model.model.proj
        for n, t in zip(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), (b1, a1, b2, a2)):
            getattr(proj, n)["default"].copy_(t)
        torch.testing.assert_close(twin(x), model(x))
        # FedPara's point: rank r x r from two rank-r products
        b1, a1, b2, a2 = (t.double() for t in (b1, a1, b2, a2))
        assert torch.linalg.matrix_rank((b1 @ a1) * (b2 @ a2)) == 16


def test_loha_on_a_conv_kernel_is_the_2d_view_and_matches_peft():
    model = small_cnn().eval()
    dt.attach(model, dt.config("loha", r=2, alpha=2.0, targets=["conv2"]))
    randomise(model)
    _, d = delta_of(model, "conv2")
    b1, a1, b2, a2 = (t.detach() for t in (d.hada_w1_a, d.hada_w1_b, d.hada_w2_a, d.hada_w2_b))
    delta4 = ((b1 @ a1) * (b2 @ a2)).reshape(16, 8, 3, 3)
    x = cnn_input()
    with torch.no_grad():
        torch.testing.assert_close(model(x), edited_cnn(model, "conv2", delta4)(x))
        twin = peft_twin(small_cnn(), peft.LoHaConfig(r=2, alpha=2.0, target_modules=["conv2"]))
        conv = twin.base_model.model.conv2
        for n, t in zip(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), (b1, a1, b2, a2)):
            getattr(conv, n)["default"].copy_(t)
        torch.testing.assert_close(twin(x), model(x))


# ----------------------------------------------------------------------------- FLoRA (Tucker)

def unfold(t: torch.Tensor, mode: int) -> torch.Tensor:
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def test_flora_on_a_conv_kernel_is_a_tucker_product_of_its_multilinear_rank():
    model = small_cnn().eval()
    dt.attach(model, dt.config("flora_tucker", r=4, kernel_r=2, scale=3.0, targets=["conv2"]))
    layer, d = delta_of(model, "conv2")
    assert not d.flora_core.any()
    for u in d.flora_factors:       # He-normal over the rank: std 1 / sqrt(2 r_n)
        assert abs(u.std().item() * math.sqrt(2 * u.shape[1]) - 1) < 0.5
    randomise(model)
    g = d.flora_core.detach()
    u1, u2, u3, u4 = (u.detach() for u in d.flora_factors)
    assert g.shape == (4, 4, 2, 2) and [u.shape for u in (u1, u2, u3, u4)] == [(16, 4), (8, 4), (3, 2), (3, 2)]
    delta4 = 3.0 * torch.einsum("abcd,ia,jb,kc,ld->ijkl", g, u1, u2, u3, u4)
    x = cnn_input()
    with torch.no_grad():
        torch.testing.assert_close(model(x), edited_cnn(model, "conv2", delta4)(x))
        got = d.delta_weight(layer.base).reshape(16, 8, 3, 3)
        torch.testing.assert_close(got.float(), delta4)
    # the Tucker structure is on the kernel itself: each mode's unfolding has exactly its rank
    assert [int(torch.linalg.matrix_rank(unfold(got, n))) for n in range(4)] == [4, 4, 2, 2]


def test_flora_ranks_are_at_most_each_modes_size():
    model = small_cnn()
    dt.attach(model, dt.config("flora_tucker", r=8, targets=["conv1"]))     # kernel (8, 3, 3, 3)
    _, d = delta_of(model, "conv1")
    assert d.flora_core.shape == (8, 3, 3, 3)
    assert sum(p.numel() for _, p in dt.trainable_parameters(model)) == 8 * 27 + 8 * 8 + 3 * 3 * 3


@pytest.mark.parametrize("which", ["linear", "conv1d_gpt2"])
def test_flora_on_a_matrix_is_u1_g_u2t(which):
    model = (tiny_llama() if which == "linear" else tiny_gpt2()).eval()
    name = "model.layers.0.self_attn.v_proj" if which == "linear" else "transformer.h.0.attn.c_attn"
    dt.attach(model, dt.config("flora_tucker", r=4, scale=2.0, targets=[name]))
    randomise(model, std=0.2)
    layer, d = delta_of(model, name)
    g, u1, u2 = d.flora_core.detach(), *(u.detach() for u in d.flora_factors)
    delta = 2.0 * u1 @ g @ u2.T        # (out, in)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        w = layer.base.weight
        want = F.linear(x, w + delta, layer.base.bias) if which == "linear" else x @ (w + delta.T) + layer.base.bias
        torch.testing.assert_close(layer(x), want)


# ----------------------------------------------------------------------------- FourierFT

def idft2_real(m: int, n: int, rows, cols, coef) -> torch.Tensor:
    """``Re(IDFT2(F))`` for a spectrum that is ``coef`` at ``(rows, cols)``, by its sum of cosines."""
    p = torch.arange(m, dtype=torch.float64)[:, None, None]
    q = torch.arange(n, dtype=torch.float64)[None, :, None]
    phase = 2 * math.pi * (p * rows.double() / m + q * cols.double() / n)
    return (coef.double() * torch.cos(phase)).sum(-1) / (m * n)


def test_fourierft_is_the_inverse_dft_of_a_sparse_spectrum_and_matches_peft():
    model = Host(32, 24).eval()
    twin_base = copy.deepcopy(model)
    dt.attach(model, dt.config("fourierft", n_frequency=100, scale=20.0, seed=5, targets=["proj"]))
    layer, d = delta_of(model)
    assert not d.fourierft_spectrum.any()
    randomise(model)
    rows, cols = d.entries
    assert len({(int(a), int(b)) for a, b in zip(rows, cols)}) == 100      # distinct entries
    coef = d.fourierft_spectrum.detach()
    delta = (20.0 * idft2_real(24, 32, rows, cols, coef)).float()
    x = model.example()
    with torch.no_grad():
        want = F.linear(torch.tanh(model.pre(x)), layer.base.weight + delta, layer.base.bias)
        torch.testing.assert_close(model(x), want)
        twin = peft_twin(twin_base, peft.FourierFTConfig(n_frequency=100, scaling=20.0, random_loc_seed=5,
                                                         target_modules=["proj"]))
        proj = twin.base_model.model.proj
        assert torch.equal(proj.indices["default"], d.entries)      # the same entries from the same seed
        proj.fourierft_spectrum["default"].copy_(coef)
        torch.testing.assert_close(twin(x), model(x))


def test_fourierft_on_gpt2_matches_peft_with_its_default_size():
    model = tiny_gpt2().eval()
    twin_base = copy.deepcopy(model)
    dt.attach(model, dt.config("fourierft"))
    randomise(model, std=0.02)
    twin = peft_twin(twin_base, peft.FourierFTConfig(target_modules=["c_attn"], fan_in_fan_out=True))
    for name, layer in wrappers(model):
        twin.get_submodule(f"base_model.model.{name}").fourierft_spectrum["default"].data.copy_(
            layer.deltas["default"].fourierft_spectrum)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        assert (ours - twin_base(input_ids=ids).logits).abs().max() > 1e-3
        torch.testing.assert_close(twin(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-4)


def test_fourierft_entries_come_from_the_seed_and_the_file_holds_only_the_coefficients():
    model = tiny_llama()
    dt.attach(model, dt.config("fourierft", targets=["q_proj", "v_proj"]))
    randomise(model)
    entries = {n: w.deltas["default"].entries.clone() for n, w in wrappers(model)}
    with tempfile.TemporaryDirectory() as tmp:
        dt.save_adapter(model, tmp)
        path = os.path.join(tmp, "adapter.safetensors")
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
        size = os.path.getsize(path)
        fresh = tiny_llama()
        dt.load_adapter(fresh, tmp)
    assert len(keys) == 4 and all(k.endswith(".fourierft_spectrum") for k in keys)
    coefficients = 4 * 1000 * 4          # 2 layers x (q, v) x 1000 float32
    assert coefficients <= size <= coefficients + 1024, size
    assert all(torch.equal(w.deltas["default"].entries, entries[n]) for n, w in wrappers(fresh))
    other = tiny_llama()
    dt.attach(other, dt.config("fourierft", seed=1, targets=["q_proj"]))
    assert not torch.equal(next(iter(wrappers(other)))[1].deltas["default"].entries,
                           entries["model.layers.0.self_attn.q_proj"])


def test_fourierft_refuses_a_layer_smaller_than_its_coefficients_and_gaussian_init_is_standard_normal():
    with pytest.raises(dt.DeltatuneError, match=r"'proj'.*24x32.*768.*n_frequency=1000"):
        dt.attach(Host(32, 24), dt.config("fourierft", targets=["proj"]))
    model = tiny_llama()
    dt.attach(model, dt.config("fourierft", init="gaussian", targets=["q_proj"]))
    c = torch.cat([p.detach() for _, p in dt.trainable_parameters(model)])
    assert abs(c.mean().item()) < 0.1 and abs(c.std().item() - 1) < 0.1
    with pytest.raises(dt.DeltatuneError, match="init='uniform'"):
        dt.config("fourierft", init="uniform")
