"""The spectral methods against their papers' definitions, written here from the frozen weight's own
decomposition (torch.linalg.svd, and an LU with partial pivoting coded below), never from the
methods' functions: the adapted layer must equal ``x W'ᵀ + b`` with ``W'`` built by the paper's
formula from the delta's trained tensors. Plus each method's defining property: identity at init,
files with only the trained tensors and a bit-for-bit regenerated decomposition, SVFT's patterns,
SORSA's regulariser, LaMDA's gradual freezing."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import deltatune as dt
from deltatune.core.engine import wrappers
from deltatune.core.weights import frozen_2d
from models import small_cnn, tiny_gpt2, tiny_llama

V = "model.layers.0.self_attn.v_proj"        # 32 x 64: a rectangular layer
Q = "model.layers.1.self_attn.q_proj"        # 64 x 64
TRAINED = {"svfit": {"svfit_s"}, "svft": {"svft_M"}, "loldu": {"loldu_d", "loldu_z"},
           "sorsa": {"sorsa_U", "sorsa_S", "sorsa_Vh"}, "lamda": {"lamda_B", "lamda_S"}}


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


def attached(method: str, model=None, **kw):
    model = tiny_llama().eval() if model is None else model
    dt.attach(model, dt.config(method, targets=kw.pop("targets", ["q_proj", "v_proj"]), **kw))
    return model


def perturb(model, scale: float = 0.05, seed: int = 0) -> None:
    """Trained-like values: every trained tensor moved off its initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in dt.trainable_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def layer(model, name: str = V):
    return dict(wrappers(model))[name]


def assert_layer_is(wrapped, W_new: torch.Tensor) -> None:
    """The wrapped Linear equals ``x W_newᵀ + b``."""
    x = torch.randn(3, W_new.shape[1], generator=torch.Generator().manual_seed(5))
    bias = wrapped.base.bias
    want = x.double() @ W_new.T + (0 if bias is None else bias.double())
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x).double(), want, atol=2e-6, rtol=1e-5)


def svd(W: torch.Tensor):
    return torch.linalg.svd(W.detach().double(), full_matrices=False)


# ----------------------------------------------------------------------------- every method

@pytest.mark.parametrize("method", sorted(TRAINED))
def test_unchanged_at_init_and_the_file_holds_only_the_trained_tensors(method):
    model = tiny_llama().eval()
    batch = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(batch).logits
    attached(method, model)
    with torch.no_grad():
        assert (model(batch).logits - before).abs().max() < 1e-6
    perturb(model)
    with torch.no_grad():
        trained = model(batch).logits
    assert (trained - before).abs().max() > 1e-3
    with tempfile.TemporaryDirectory() as tmp:
        dt.save_adapter(model, tmp)
        with safe_open(os.path.join(tmp, "adapter.safetensors"), framework="pt") as f:
            keys = set(f.keys())
        assert {k.rsplit(".", 1)[1] for k in keys} == TRAINED[method]
        assert len(keys) == 4 * len(TRAINED[method])         # 2 layers x (q, v)
        fresh = tiny_llama().eval()
        dt.load_adapter(fresh, tmp)
    for (_, a), (_, b) in zip(wrappers(model), wrappers(fresh)):
        da, db = a.deltas["default"], b.deltas["default"]
        for name, buf in da.named_buffers():        # the decomposition, regenerated bit for bit
            assert torch.equal(buf, db.get_buffer(name)), name
    with torch.no_grad():
        assert torch.equal(fresh(batch).logits, trained)


def test_the_decomposition_is_float64_of_W_with_fixed_signs_and_of_the_dequantised_weight():
    model = attached("svft", targets=["v_proj"])
    d = layer(model).deltas["default"]
    W = layer(model).base.weight.double()
    U, S, Vh = d.svft_U.double(), svd(W).S, d.svft_Vh.double()
    torch.testing.assert_close(U * S @ Vh, W, atol=1e-6, rtol=0)
    lead = U.abs().argmax(dim=0)
    assert (U[lead, torch.arange(U.shape[1])] > 0).all()     # each u_i's largest entry is positive
    quantised = tiny_llama()
    dt.quantize(quantised, "nf4")
    attached("svfit", quantised, targets=["v_proj"])
    wq = layer(quantised)
    dq = frozen_2d(wq.base, "linear").double()
    assert (dq - W).abs().max() > 1e-4                         # the quantised weight is another matrix
    e = wq.deltas["default"]
    torch.testing.assert_close(e.svfit_U.double() * e.svfit_s0.double() @ e.svfit_Vh.double(), dq,
                               atol=1e-5, rtol=0)


def test_a_rank_the_layer_lacks_or_a_misplaced_field_raises():
    with pytest.raises(dt.DeltatuneError, match=r"r=40 does not fit layer model\.layers\.0\.self_attn\.v_proj"):
        attached("sorsa", r=40)                                # v_proj has 32 components
    with pytest.raises(dt.DeltatuneError, match="off_diag=1 applies to pattern='banded' only"):
        dt.config("svft", pattern="plain", off_diag=1)
    with pytest.raises(dt.DeltatuneError, match="per_row=40 does not fit layer"):
        attached("svft", pattern="random", per_row=40)
    for method, field, value in (("sorsa", "gamma", -1.0), ("lamda", "freeze_steps", 0), ("loldu", "alpha", 0.0),
                                 ("svfit", "r", 0)):
        with pytest.raises(dt.DeltatuneError, match=field):
            dt.config(method, **{field: value})


# ----------------------------------------------------------------------------- SVFit

@pytest.mark.parametrize("r", [5, None])
def test_svfit_trains_the_top_singular_values(r):
    model = attached("svfit", r=r)
    perturb(model)
    wrapped = layer(model)
    d = wrapped.deltas["default"]
    U, S, Vh = svd(wrapped.base.weight)
    k = S.shape[0] if r is None else r
    assert d.svfit_s.shape == (k,)
    s = d.svfit_s.detach().double()
    # W' = W_res + U_r diag(s) V_rᵀ, W_res = W - U_r diag(S_r) V_rᵀ (sign-free: u_i and v_i flip together)
    assert_layer_is(wrapped, wrapped.base.weight.double() - U[:, :k] * S[:k] @ Vh[:k] + U[:, :k] * s @ Vh[:k])


# ----------------------------------------------------------------------------- SVFT

def fixed_signs(U: torch.Tensor, Vh: torch.Tensor):
    lead = U.abs().argmax(dim=0)
    sign = U[lead, torch.arange(U.shape[1])].sign()
    return U * sign, Vh * sign[:, None]


@pytest.mark.parametrize("kw,entries", [({"pattern": "plain"}, lambda i, j: i == j),
                                        ({}, lambda i, j: abs(i - j) <= 2),
                                        ({"off_diag": 5}, lambda i, j: abs(i - j) <= 5)])
def test_svft_is_W_plus_a_sparse_combination_of_singular_vector_outer_products(kw, entries):
    model = attached("svft", **kw)
    perturb(model)
    wrapped = layer(model)
    d = wrapped.deltas["default"]
    k = 32
    pattern = {(i, j) for i in range(k) for j in range(k) if entries(i, j)}
    assert set(zip(d.svft_rows.tolist(), d.svft_cols.tolist())) == pattern
    assert d.svft_M.numel() == len(pattern)
    U, S, Vh = svd(wrapped.base.weight)
    U, Vh = fixed_signs(U, Vh)
    M = dict(zip(zip(d.svft_rows.tolist(), d.svft_cols.tolist()), d.svft_M.detach().double().tolist()))
    delta = sum(m * torch.outer(U[:, i], Vh[j]) for (i, j), m in M.items())
    assert_layer_is(wrapped, wrapped.base.weight.double() + delta)


def test_svft_random_positions_are_per_row_and_regenerated_from_seed_and_layer():
    def rows_cols(seed, name=V):
        d = layer(attached("svft", pattern="random", per_row=4, seed=seed), name).deltas["default"]
        return list(zip(d.svft_rows.tolist(), d.svft_cols.tolist()))

    first = rows_cols(3)
    assert first == rows_cols(3)
    assert first != rows_cols(4) and first != rows_cols(3, "model.layers.1.self_attn.v_proj")
    per_row = {}
    for i, j in first:
        per_row.setdefault(i, set()).add(j)
    assert sorted(per_row) == list(range(32)) and all(len(c) == 4 for c in per_row.values())


# ----------------------------------------------------------------------------- LoLDU

def lu_partial_pivoting(W: torch.Tensor):
    """Doolittle with partial pivoting (the first largest entry of each column): ``W = PL U`` with
    ``PL`` the row-permuted unit lower factor ``(m, k)`` and ``U (k, n)`` upper."""
    A, (m, n) = W.double().clone(), W.shape
    k = min(m, n)
    perm, L = list(range(m)), torch.zeros(m, k, dtype=torch.float64)
    for j in range(k):
        p = j + int(A[j:, j].abs().argmax())
        A[[j, p]], L[[j, p]] = A[[p, j]], L[[p, j]]
        perm[j], perm[p] = perm[p], perm[j]
        L[j, j] = 1.0
        L[j + 1:, j] = A[j + 1:, j] / A[j, j]
        A[j + 1:] -= L[j + 1:, j:j + 1] * A[j:j + 1]
    PL = torch.zeros_like(L)
    PL[perm] = L
    return PL, A[:k].triu()


def test_loldu_against_an_lu_written_here():
    model = attached("loldu", r=6, alpha=3.0)
    perturb(model)
    wrapped = layer(model)
    d = wrapped.deltas["default"]
    W = wrapped.base.weight.double()
    PL, U = lu_partial_pivoting(W)
    torch.testing.assert_close(PL @ U, W, atol=1e-12, rtol=0)
    assert PL.abs().max() <= 1.0 + 1e-12
    pivots = U.diagonal()
    Lr, Dr, Ur = PL[:, :6], pivots[:6], U[:6] / pivots[:6, None]
    z, diag = d.loldu_z.detach().double(), d.loldu_d.detach().double()
    # W' = W - z0 P L_r D_r U_r + z P L_r diag(d) U_r, z0 = alpha / r
    assert_layer_is(wrapped, W - 0.5 * (Lr * Dr) @ Ur + z * (Lr * diag) @ Ur)


def test_loldu_with_every_component_its_scale_rescales_the_weight():
    """All k components: ``P L D U = W``, so moving z alone from z0 by c gives W' = (1 + c) W."""
    model = attached("loldu")
    wrapped = layer(model)
    d = wrapped.deltas["default"]
    assert d.loldu_d.shape == (32,) and d.loldu_z.item() == pytest.approx(1 / 32)
    with torch.no_grad():
        d.loldu_z.add_(0.5)
    assert_layer_is(wrapped, 1.5 * wrapped.base.weight.double())


# ----------------------------------------------------------------------------- SORSA

def test_sorsa_is_a_trained_principal_part_on_a_frozen_residual():
    model = attached("sorsa", r=6)
    perturb(model)
    wrapped = layer(model)
    d = wrapped.deltas["default"]
    U, S, Vh = svd(wrapped.base.weight)
    Up, Sp, Vhp = (t.detach().double() for t in (d.sorsa_U, d.sorsa_S, d.sorsa_Vh))
    assert Up.shape == (32, 6) and Vhp.shape == (6, 64)
    W_r = wrapped.base.weight.double() - U[:, :6] * S[:6] @ Vh[:6]
    assert_layer_is(wrapped, W_r + Up * Sp @ Vhp)


def test_sorsa_regulariser_is_the_papers_and_zero_at_init():
    model = attached("sorsa", r=6, gamma=0.3)
    assert float(dt.auxiliary_loss(model).detach()) < 1e-10
    perturb(model)

    def orthonormality(d):
        eye, U, V = torch.eye(6), d.sorsa_U, d.sorsa_Vh.T       # V_p (in, r)
        return (U.T @ U - eye).norm() ** 2 + (V.T @ V - eye).norm() ** 2

    want = 0.3 * sum(orthonormality(w.deltas["default"]) for _, w in wrappers(model))
    got = dt.auxiliary_loss(model)
    torch.testing.assert_close(got, want)
    assert got > 1e-3
    got.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in dt.trainable_parameters(model)
               if not n.endswith("sorsa_S"))
    assert dt.auxiliary_loss(attached("sorsa", r=6, gamma=0.0)) == 0.0


# ----------------------------------------------------------------------------- LaMDA

def test_lamda_is_B_S_A_with_A_the_top_right_singular_vectors():
    model = attached("lamda", r=5)
    perturb(model)
    wrapped = layer(model)
    d = wrapped.deltas["default"]
    U, S, Vh = svd(wrapped.base.weight)
    A = d.lamda_A.double()
    assert not d.lamda_A.requires_grad
    torch.testing.assert_close((A @ Vh[:5].T).abs(), torch.eye(5, dtype=torch.float64), atol=1e-6, rtol=0)
    B, core = d.lamda_B.detach().double(), d.lamda_S.detach().double()
    # W' = (W - U_r Σ_r V_rᵀ) + B S A
    assert_layer_is(wrapped, wrapped.base.weight.double() - U[:, :5] * S[:5] @ Vh[:5] + B @ core @ A)


def test_lamda_freezes_B_column_by_column_then_wholly():
    model = attached("lamda", r=4, freeze_steps=8)
    model.train()
    opt = torch.optim.AdamW(dt.parameter_groups(model, lr=1e-2), weight_decay=0.1)
    batch = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    deltas = [w.deltas["default"] for _, w in wrappers(model)]
    seen = {}
    for step in range(1, 11):
        opt.zero_grad()
        model(batch, labels=batch).loss.backward()
        before = min(4, (step - 1) * 4 // 8)          # columns frozen by the previous steps
        for d in deltas:
            assert (d.lamda_B.grad is None) == (before == 4)
            if d.lamda_B.grad is not None:
                assert d.lamda_B.grad[:, :before].abs().sum() == 0
                assert d.lamda_B.grad[:, before:].abs().max() > 0
        S_before = deltas[0].lamda_S.detach().clone()
        opt.step()
        dt.step_hook(model, step)
        assert not torch.equal(deltas[0].lamda_S, S_before)           # S trains throughout
        n = min(4, step * 4 // 8)
        for i, d in enumerate(deltas):
            for c in range(n):
                seen.setdefault((i, c), d.lamda_B[:, c].detach().clone())
                assert torch.equal(d.lamda_B[:, c], seen[(i, c)]), (step, c)   # unmoved since it froze
    assert all(not d.lamda_B.requires_grad and d.lamda_B.grad is None for d in deltas)
    assert sum(p.numel() for _, p in dt.trainable_parameters(model)) == 4 * 4 * 4
    model.eval()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        dt.save_adapter(model, tmp)
        fresh = tiny_llama().eval()
        dt.load_adapter(fresh, tmp)
        assert torch.equal(fresh(batch).logits, model(batch).logits)


# ----------------------------------------------------------------------------- other layer kinds

def definition(method: str, d, W: torch.Tensor) -> torch.Tensor:
    """``W'`` by each paper's formula, from ``W``'s SVD taken here and the delta's trained tensors."""
    U, S, Vh = svd(W)
    W = W.double()
    if method == "svfit":
        k = d.svfit_s.shape[0]
        return W - U[:, :k] * S[:k] @ Vh[:k] + U[:, :k] * d.svfit_s.detach().double() @ Vh[:k]
    r = 4
    principal = W - U[:, :r] * S[:r] @ Vh[:r]
    if method == "sorsa":
        return principal + d.sorsa_U.detach().double() * d.sorsa_S.detach().double() @ d.sorsa_Vh.detach().double()
    A = Vh[:r] * (d.lamda_A.double() @ Vh[:r].T).diagonal().sign()[:, None]     # A = V_rᵀ, its signs
    return principal + d.lamda_B.detach().double() @ d.lamda_S.detach().double() @ A


@pytest.mark.parametrize("method", ["sorsa", "lamda", "svfit"])
def test_a_convolution_and_a_gpt2_conv1d_adapt_their_2d_weight_view(method):
    kw = {} if method == "svfit" else {"r": 4}
    model = small_cnn().eval()
    dt.attach(model, dt.config(method, targets=["conv2"], **kw))
    perturb(model)
    conv = model.conv2
    W = definition(method, conv.deltas["default"], conv.base.weight.reshape(16, -1))
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = F.conv2d(x.double(), W.reshape(conv.base.weight.shape), conv.base.bias.double(), stride=2, padding=1)
        torch.testing.assert_close(conv(x).double(), want, atol=2e-6, rtol=1e-5)
    gpt2 = tiny_gpt2().eval()
    dt.attach(gpt2, dt.config(method, **kw))
    perturb(gpt2)
    c_attn = gpt2.transformer.h[0].attn.c_attn       # Conv1D stores (in, out): W is its transpose
    assert_layer_is(c_attn, definition(method, c_attn.deltas["default"], c_attn.base.weight.T))
