"""OFT, BOFT, HRA and SSF against their papers' definitions, written here from the formulas (not
from the library's helpers), against the real ``peft`` package given the same values, and for
their defining property: the rotation a trained adapter applies is orthogonal.

Conventions of the definitions (the methods' docstrings): the rotations act on the input side of
the 2-D weight view, ``W2' = W2 R``; OFT's blocks are Cayley transforms ``(I + Q)(I - Q)^-1`` of
skew-symmetric ``Q`` stored as their strict upper triangles (row-major); BOFT's ``R`` is the
product of butterfly factors ``B_0 ... B_{m-1}``; HRA's ``H = Π (I - 2 u uᵀ / ‖u‖²)``; SSF is
``γ ⊙ y + β`` per output channel."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import deltatune as dt
from deltatune.core.engine import wrappers
from deltatune.core.wrapper import DeltaLayer
from models import small_cnn, tiny_llama

ORTHOGONAL_TOL = 1e-5       # the acceptance bound on ‖RᵀR - I‖_max, float32


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


# ----------------------------------------------------------------------------- the definitions

def skew_from_upper(vec: torch.Tensor, b: int) -> torch.Tensor:
    """The b x b skew-symmetric matrix whose strict upper triangle, row by row, is ``vec``."""
    q = torch.zeros(b, b, dtype=vec.dtype)
    k = 0
    for i in range(b):
        for j in range(i + 1, b):
            q[i, j], q[j, i] = vec[k], -vec[k]
            k += 1
    assert k == vec.numel()
    return q


def cayley(q: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(q.shape[0], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def oft_rotation(delta, dtype=torch.float32) -> torch.Tensor:
    """OFT's R = diag(R_1, ..., R_r) from the trained triangles (a last, smaller block if any)."""
    vecs = delta.oft_Q.detach().to(dtype)
    b = round((1 + math.sqrt(1 + 8 * vecs.shape[1])) / 2)
    blocks = [cayley(skew_from_upper(v, b)) for v in vecs]
    if delta.oft_Q.shape[0] == 1:       # block_share
        blocks = blocks * delta.blocks.count
    if delta.oft_Q_rest is not None:
        v = delta.oft_Q_rest.detach().to(dtype)
        blocks.append(cayley(skew_from_upper(v, round((1 + math.sqrt(1 + 8 * v.numel())) / 2))))
    return torch.block_diag(*blocks)


def butterfly_block_features(d: int, b: int, level: int) -> list[list[int]]:
    """The features each b x b block of butterfly factor ``level`` joins: factor 0 contiguous runs
    of b; factor k > 0, in each group of g = b 2^k features, the t-th run of b/2 features of the
    group's first half followed by the t-th run of its second half (features g/2 apart)."""
    if level == 0:
        return [list(range(s, s + b)) for s in range(0, d, b)]
    g, half = b * 2 ** level, b // 2
    return [list(range(s + t * half, s + (t + 1) * half)) + list(range(s + g // 2 + t * half, s + g // 2 + (t + 1) * half))
            for s in range(0, d, g) for t in range(g // b)]


def boft_rotation(delta, d: int, dtype=torch.float32) -> torch.Tensor:
    """BOFT's R = B_0 B_1 ... B_{m-1}, B_k = P_k D_k P_kᵀ: each block's Cayley rotation placed on the
    features it joins."""
    q = delta.boft_Q.detach().to(dtype)
    m, count, n = q.shape
    b = round((1 + math.sqrt(1 + 8 * n)) / 2)
    r = torch.eye(d, dtype=dtype)
    for level in range(m):
        factor = torch.zeros(d, d, dtype=dtype)
        for block, idx in zip(q[level], butterfly_block_features(d, b, level)):
            factor[torch.tensor(idx)[:, None], torch.tensor(idx)[None, :]] = cayley(skew_from_upper(block, b))
        r = r @ factor
    return r


def householder_chain(u: torch.Tensor) -> torch.Tensor:
    h = torch.eye(u.shape[0], dtype=u.dtype)
    for i in range(u.shape[1]):
        v = u[:, i:i + 1]
        h = h @ (torch.eye(u.shape[0], dtype=u.dtype) - 2 * v @ v.T / (v.T @ v))
    return h


def orthogonality_error(r: torch.Tensor) -> float:
    return (r.T @ r - torch.eye(r.shape[0], dtype=r.dtype)).abs().max().item()


def _layers(model, name="default"):
    return [(n, w) for n, w in wrappers(model) if name in w.deltas]


def _perturb(model, scale: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in dt.trainable_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _tokens(n=4, length=16, seed=0):
    ids = torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _train(model, steps: int, lr: float):
    batch = _tokens()
    model.train()
    opt = torch.optim.AdamW(dt.parameter_groups(model, lr=lr))
    for step in range(1, steps + 1):
        opt.zero_grad()
        (model(**batch, labels=batch["input_ids"]).loss + dt.auxiliary_loss(model)).backward()
        opt.step()
        dt.step_hook(model, step)
    model.eval()


def _assert_layer_is(layer, w_eff: torch.Tensor, x: torch.Tensor):
    """The wrapped Linear computes x W_effᵀ + b."""
    with torch.no_grad():
        want = F.linear(x, w_eff, layer.base.bias)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- OFT

def test_oft_is_the_frozen_weight_times_block_diagonal_cayley_rotations():
    model = tiny_llama().eval()
    dt.attach(model, dt.config("oft", block_size=16, targets=["q_proj"]))
    _perturb(model, 0.1)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    for _, layer in _layers(model):
        d = layer.deltas["default"]
        assert d.oft_Q.shape == (4, 16 * 15 // 2)
        _assert_layer_is(layer, layer.base.weight @ oft_rotation(d), x)


def test_oft_with_a_block_size_that_does_not_divide_keeps_a_last_smaller_block():
    layer_model = nn.Sequential(nn.Linear(27, 5))
    dt.attach(layer_model, dt.config("oft", block_size=8, targets=["0"]))
    _perturb(layer_model, 0.2)
    layer = layer_model[0]
    d = layer.deltas["default"]
    assert d.oft_Q.shape == (3, 28) and d.oft_Q_rest.shape == (3,)      # blocks 8, 8, 8, 3
    r = oft_rotation(d)
    assert orthogonality_error(r) < ORTHOGONAL_TOL
    _assert_layer_is(layer, layer.base.weight @ r, torch.randn(4, 27))


def test_oft_block_share_trains_one_rotation_for_every_block():
    model = tiny_llama().eval()
    dt.attach(model, dt.config("oft", block_size=8, block_share=True, targets=["q_proj"]))
    _perturb(model, 0.2)
    layer = _layers(model)[0][1]
    d = layer.deltas["default"]
    assert d.oft_Q.shape == (1, 28) and dt.count_parameters(model)[0] == 2 * 28
    r = oft_rotation(d)
    assert torch.equal(r[:8, :8], r[56:, 56:]) and orthogonality_error(r) < ORTHOGONAL_TOL
    _assert_layer_is(layer, layer.base.weight @ r, torch.randn(3, 64))


def test_oft_on_a_convolution_rotates_the_kernel_view():
    model = small_cnn().eval()
    dt.attach(model, dt.config("oft", block_size=8, targets=["conv2"]))     # 8 channels x 3 x 3 = 72 = 9 x 8
    _perturb(model, 0.2)
    conv = model.conv2
    w_eff = (conv.base.weight.reshape(16, 72) @ oft_rotation(conv.deltas["default"])).reshape(conv.base.weight.shape)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv2d(x, w_eff, conv.base.bias, stride=2, padding=1),
                                   rtol=1e-5, atol=1e-5)


def test_oft_equals_peft_with_the_same_skew_matrices():
    from peft import OFTConfig, get_peft_model
    ours, theirs = tiny_llama().eval(), tiny_llama().eval()
    dt.attach(ours, dt.config("oft", block_size=16, targets=["q_proj", "v_proj"]))
    _perturb(ours, 0.1)
    theirs = get_peft_model(theirs, OFTConfig(r=0, oft_block_size=16, target_modules=["q_proj", "v_proj"],
                                              use_cayley_neumann=False)).eval()
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "oft_R")}
    with torch.no_grad():
        for name, layer in _layers(ours):
            peft_layers[name].oft_R["default"].weight.copy_(layer.deltas["default"].oft_Q)
    batch = _tokens(2, 12)
    with torch.no_grad():
        got, want, base = ours(**batch).logits, theirs(**batch).logits, tiny_llama().eval()(**batch).logits
    assert (want - base).abs().max() > 1e-3, "the rotations change nothing: the comparison could not fail"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_coft_keeps_every_block_within_its_radius():
    model = tiny_llama().eval()
    eps = 0.05
    dt.attach(model, dt.config("oft", coft=True, eps=eps))
    _train(model, 8, dt.get_method("oft").default_lr)
    for _, layer in _layers(model):
        d = layer.deltas["default"]
        norms = [torch.linalg.matrix_norm(skew_from_upper(v, 32)).item() for v in d.oft_Q.detach()]
        radius = eps / math.sqrt(d.oft_Q.shape[0])
        assert max(norms) <= radius * (1 + 1e-5)
        assert max(norms) > 0.99 * radius, "the constraint never bound: the check could not fail"


def test_the_file_holds_only_the_skew_triangles():
    import tempfile
    model = tiny_llama()
    dt.attach(model, dt.config("oft"))
    with tempfile.TemporaryDirectory() as tmp:
        dt.save_adapter(model, tmp)
        with safe_open(f"{tmp}/adapter.safetensors", framework="pt") as f:
            keys = list(f.keys())
            shapes = {f.get_tensor(k).shape for k in keys}
    assert keys and all(k.endswith(".oft_Q") for k in keys) and shapes == {torch.Size([2, 496])}


# ----------------------------------------------------------------------------- BOFT

@pytest.mark.parametrize("m,b", [(1, 4), (2, 4), (3, 8), (4, 8)])
def test_boft_is_the_butterfly_product_and_equals_peft(m, b, monkeypatch):
    import peft.tuners.boft.layer as boft_layer
    from peft import BOFTConfig, get_peft_model

    class BlockDiagonal:
        """PEFT builds m > 1 butterfly factors only with its CUDA block-diagonal kernel; this is
        that kernel's forward on the CPU (``torch.block_diag`` per factor)."""
        def forward(self, x):
            return [torch.stack([torch.block_diag(*factor) for factor in x])]

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: BlockDiagonal())
    ours, theirs = tiny_llama().eval(), tiny_llama().eval()
    dt.attach(ours, dt.config("boft", boft_block_size=b, boft_n_butterfly_factor=m, targets=["q_proj"]))
    _perturb(ours, 0.2)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    for _, layer in _layers(ours):
        d = layer.deltas["default"]
        assert d.boft_Q.numel() == m * (64 // b) * b * (b - 1) // 2
        _assert_layer_is(layer, layer.base.weight @ boft_rotation(d, 64), x)
    theirs = get_peft_model(theirs, BOFTConfig(boft_block_size=b, boft_n_butterfly_factor=m,
                                               target_modules=["q_proj"])).eval()
    peft_layers = {n.removeprefix("base_model.model."): mod for n, mod in theirs.named_modules()
                   if hasattr(mod, "boft_R")}
    rows, cols = torch.triu_indices(b, b, 1)
    with torch.no_grad():
        for name, layer in _layers(ours):
            full = torch.zeros(m, 64 // b, b, b)
            full[..., rows, cols] = 2 * layer.deltas["default"].boft_Q     # PEFT's Q = (A - Aᵀ) / 2
            peft_layers[name].boft_R["default"].copy_(full)
    batch = _tokens(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-5, atol=1e-5)


def test_boft_butterfly_structure_becomes_dense_with_log_many_factors():
    """d = 64, b = 4: 1 factor is block-diagonal (16 blocks); 1 + log2(64 / 4) = 5 factors reach every
    pair of features, with 5 x 16 x 6 = 480 parameters against a dense rotation's 2016."""
    for m, dense in ((1, False), (3, False), (5, True)):
        model = tiny_llama().eval()
        dt.attach(model, dt.config("boft", boft_block_size=4, boft_n_butterfly_factor=m, targets=["q_proj"]))
        _perturb(model, 0.3)
        d = _layers(model)[0][1].deltas["default"]
        r = boft_rotation(d, 64)
        reach = (r.abs() > 1e-9).float().mean().item()
        assert (reach == 1.0) == dense, (m, reach)
        assert orthogonality_error(r) < ORTHOGONAL_TOL
    assert d.boft_Q.numel() == 480


# ----------------------------------------------------------------------------- HRA

def test_hra_is_a_chain_of_householder_reflections_and_equals_peft():
    from peft import HRAConfig, get_peft_model
    ours = tiny_llama().eval()
    dt.attach(ours, dt.config("hra", r=6, targets=["q_proj", "v_proj"]))
    base_out = None
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    for _, layer in _layers(ours):          # at init: pairs of equal vectors cancel, H = I
        u = layer.deltas["default"].hra_u.detach()
        assert torch.equal(u[:, 0::2], u[:, 1::2]) and u[:, 0::2].std() > 0
        _assert_layer_is(layer, layer.base.weight, x)
    _perturb(ours, 0.3)
    for _, layer in _layers(ours):
        u = layer.deltas["default"].hra_u.detach()
        _assert_layer_is(layer, layer.base.weight @ householder_chain(u), x)
    theirs = get_peft_model(tiny_llama().eval(), HRAConfig(r=6, target_modules=["q_proj", "v_proj"])).eval()
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "hra_u")}
    with torch.no_grad():
        for name, layer in _layers(ours):
            peft_layers[name].hra_u["default"].copy_(layer.deltas["default"].hra_u)
        batch = _tokens(2, 12)
        base_out = tiny_llama().eval()(**batch).logits
        want = theirs(**batch).logits
        assert (want - base_out).abs().max() > 1e-3
        torch.testing.assert_close(ours(**batch).logits, want, rtol=1e-5, atol=1e-5)


def test_hra_regulariser_is_the_papers_term():
    model = tiny_llama().eval()
    dt.attach(model, dt.config("hra", r=4, orth_reg_weight=0.3))
    _perturb(model, 0.3)
    want = 0.0
    for _, layer in _layers(model):
        u = layer.deltas["default"].hra_u
        unit = u / u.norm(dim=0, keepdim=True)
        want = want + ((torch.eye(4) - unit.T @ unit) ** 2).sum()
    got = dt.auxiliary_loss(model)
    torch.testing.assert_close(got, 0.3 * want)
    got.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in dt.trainable_parameters(model))
    dt.delete_adapter(model, "default")
    dt.attach(model, dt.config("hra", r=4))
    assert dt.auxiliary_loss(model) == 0.0


# ----------------------------------------------------------------------------- the acceptance

ACCEPTANCE = {
    "oft": {},
    "boft": {"boft_n_butterfly_factor": 3},      # a real butterfly: the default m = 1 is OFT's blocks
    "hra": {},
}


def _rotation(method: str, delta, d: int) -> torch.Tensor:
    if method == "oft":
        return oft_rotation(delta)
    if method == "boft":
        return boft_rotation(delta, d)
    return householder_chain(delta.hra_u.detach().float())


def _first_order(method: str, delta, d: int) -> torch.Tensor:
    """The same trained values with the rotation replaced by a non-orthogonal first-order one
    (I + 2Q for a Cayley block, I - 2 Σ û ûᵀ for the reflections): what the check must reject."""
    if method == "hra":
        u = delta.hra_u.detach().float()
        u = u / u.norm(dim=0)
        return torch.eye(d) - 2 * u @ u.T
    vecs = delta.oft_Q.detach() if method == "oft" else delta.boft_Q.detach()[0]
    b = round((1 + math.sqrt(1 + 8 * vecs.shape[-1])) / 2)
    return torch.block_diag(*[torch.eye(b) + 2 * skew_from_upper(v, b) for v in vecs])


@pytest.mark.parametrize("method", list(ACCEPTANCE))
def test_after_50_training_steps_the_applied_rotation_is_orthogonal(method):
    """50 AdamW steps of the causal-LM loss at the method's default rate; then, per layer, R from the
    trained parameters by the paper's formula in float32: ‖RᵀR - I‖_max < 1e-5, and the layer
    computes exactly x (W R)ᵀ (so a library applying a non-orthogonal matrix fails here)."""
    model = tiny_llama().eval()
    torch.manual_seed(0)
    dt.attach(model, dt.config(method, **ACCEPTANCE[method]))
    _train(model, 50, dt.get_method(method).default_lr)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    worst, moved, first_order = 0.0, 0.0, math.inf
    for _, layer in _layers(model):
        delta = layer.deltas["default"]
        r = _rotation(method, delta, 64)
        worst = max(worst, orthogonality_error(r))
        moved = max(moved, (r - torch.eye(64)).abs().max().item())
        first_order = min(first_order, orthogonality_error(_first_order(method, delta, 64)))
        _assert_layer_is(layer, layer.base.weight @ r, x)
    print(f"{method}: max ‖RᵀR - I‖_max = {worst:.2e} after 50 steps (max |R - I| = {moved:.3f}; "
          f"first-order stand-in: {first_order:.2e})")
    assert worst < ORTHOGONAL_TOL
    assert moved > 1e-2, "training barely rotated anything: the check could not fail"
    assert first_order > 100 * ORTHOGONAL_TOL, "a non-orthogonal parameterisation would pass this check"


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("method,cfg,match", [
    ("oft", {"r": 2, "block_size": 0}, r"conv1: r=2 blocks do not divide its 27 input features; use r among 1, 3"),
    ("oft", {"block_share": True, "block_size": 8}, r"conv1: block_share needs block_size to divide .* 27 .* 3, 9"),
    ("boft", {"boft_n_butterfly_factor": 2}, r"conv1: 2 butterfly factors .* 27 input features; use fewer"),
])
def test_a_layer_the_blocks_cannot_split_is_refused_by_name(method, cfg, match):
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dt.DeltatuneError, match=match):
        dt.attach(model, dt.config(method, targets=["conv1", "conv2"], **cfg))
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method,kw,match", [
    ("oft", {"r": 4}, "give either r .* or block_size"),
    ("oft", {"eps": 0.0}, "eps=0.0 is out of range"),
    ("boft", {"boft_block_num": 4}, "give either boft_block_size or boft_block_num"),
    ("boft", {"boft_block_size": 3, "boft_n_butterfly_factor": 2}, "must be even"),
    ("hra", {"r": 5}, "r=5 must be even"),
])
def test_bad_configs_fail_at_construction(method, kw, match):
    with pytest.raises(dt.DeltatuneError, match=match):
        dt.config(method, **kw)


# ----------------------------------------------------------------------------- SSF

class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 6)
        self.norm = nn.LayerNorm(6)
        self.lin = nn.Linear(6, 5, bias=False)
        self.conv = nn.Conv2d(5, 4, 3, padding=1)

    def forward(self, ids):
        h = self.lin(self.norm(self.emb(ids)))              # (n, 9, 5)
        return self.conv(h.transpose(1, 2).reshape(-1, 5, 3, 3))


def test_ssf_scales_and_shifts_each_output_channel_and_folds_into_the_layer():
    model = Mixed().eval()
    pristine = Mixed().eval()
    dt.attach(model, dt.config("ssf", targets=["emb", "norm", "lin", "conv"]))
    ids = torch.randint(0, 10, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), pristine(ids), rtol=0, atol=0)      # γ = 1, β = 0
    _perturb(model, 0.3)
    gb = {n: (w.deltas["default"].ssf_scale.detach(), w.deltas["default"].ssf_shift.detach()) for n, w in wrappers(model)}
    with torch.no_grad():
        h = pristine.emb(ids) * gb["emb"][0] + gb["emb"][1]
        h = pristine.norm(h) * gb["norm"][0] + gb["norm"][1]
        h = pristine.lin(h) * gb["lin"][0] + gb["lin"][1]
        y = pristine.conv(h.transpose(1, 2).reshape(-1, 5, 3, 3))
        want = y * gb["conv"][0].view(1, -1, 1, 1) + gb["conv"][1].view(1, -1, 1, 1)
        torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-6)
        dt.merge(model)
        torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-5)
    g, s = gb["norm"]       # the LayerNorm's affine takes the scale and the shift
    torch.testing.assert_close(model.norm.base.weight.detach(), g * pristine.norm.weight)
    torch.testing.assert_close(model.norm.base.bias.detach(), g * pristine.norm.bias + s)
    g, s = gb["lin"]        # a layer without a bias gets one
    torch.testing.assert_close(model.lin.base.weight.detach(), g[:, None] * pristine.lin.weight)
    torch.testing.assert_close(model.lin.base.bias.detach(), s)
    dt.unmerge(model)
    assert model.lin.base.bias is None and torch.equal(model.lin.base.weight, pristine.lin.weight)


def test_ssf_refuses_a_norm_it_cannot_fold_into():
    model = tiny_llama()
    with pytest.raises(dt.DeltatuneError, match=r"input_layernorm \(LlamaRMSNorm\): it has no bias"):
        dt.attach(model, dt.config("ssf", targets=["input_layernorm"]))
    with pytest.raises(dt.DeltatuneError, match="no bias to take the shift"):
        dt.attach(nn.Sequential(nn.LayerNorm(4, bias=False)), dt.config("ssf", targets=["0"]))


def test_ssf_defaults_follow_the_attention_and_feed_forward_outputs():
    model = tiny_llama()
    dt.attach(model, dt.config("ssf"))
    wrapped = {n.split(".", 3)[-1] for n, _ in wrappers(model)}
    assert wrapped == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"}
    assert dt.count_parameters(model)[0] == 2 * 2 * (64 + 32 + 32 + 64 + 64)
