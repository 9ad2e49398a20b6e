"""CorDA, OLoRA and LoRA-SB against their papers' definitions, computed here: OLoRA's start is the
first r of the weight's QR; CorDA's start is the chosen components of ``W = U S V^T C^-1`` with
``W C = U S V^T`` and C the covariance of the layer's inputs (the largest r in "ipm", the smallest
in "kpm"); LoRA-SB trains only R in ``ΔW = B R A``, with B, A, R_0 from the SVD of the first Adam
step of full fine-tuning. Where Hugging Face PEFT has the method (OLoRA, CorDA), its init on the
same weights is the second reference. Plus each method's defining property: the model unchanged
at init (CorDA, OLoRA) or moved by the approximated first step (LoRA-SB), what the file holds,
reload into a fresh model, calibration's errors."""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import deltatune as dt
from deltatune.core.engine import wrappers
from deltatune.core.errors import DeltatuneError
from models import minilm_classifier, small_cnn, tiny_bert_classifier, tiny_llama

R = 4
TARGETS = ["0", "2"]


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, 3))


def make_batches(n: int = 3, size: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(size, 12, generator=g), "y": torch.randint(0, 3, (size,), generator=g)} for _ in range(n)]


def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"])


def delta(model: nn.Module, target: str, adapter: str = "default"):
    return model.get_submodule(target).deltas[adapter]


def perturb(model: nn.Module, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in dt.trainable_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def by_hand(layer: nn.Linear, dW: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ (layer.weight.double() + dW).t() + layer.bias.double()


def components(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """The rank-one terms ``b_i a_i^T`` (r, out, in): they do not depend on each pair's sign."""
    return B.double().t()[:, :, None] * A.double()[:, None, :]


def file_tensors(tmp: str) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(tmp, "adapter.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def layer_inputs(plain: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Every row each target layer reads, by forward hooks on the plain model."""
    seen = {t: [] for t in TARGETS}
    handles = [plain.get_submodule(t).register_forward_hook(lambda m, i, o, t=t: seen[t].append(i[0].detach()))
               for t in TARGETS]
    with torch.no_grad():
        for b in batches:
            plain(b["x"])
    for h in handles:
        h.remove()
    return {t: torch.cat(v).double() for t, v in seen.items()}


def corda_terms(W: torch.Tensor, X: torch.Tensor, ridge: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's decomposition: ``W C = U S V^T``, ``W = sum_i s_i u_i (C^-1 v_i)^T``; returns the
    singular values and the rank-one terms, largest first."""
    C = X.t() @ X / X.shape[0]
    C = C + ridge * torch.diagonal(C).mean() * torch.eye(C.shape[0], dtype=C.dtype)
    U, S, Vh = torch.linalg.svd(W.double() @ C, full_matrices=False)
    V_hat = torch.linalg.inv(C) @ Vh.t()
    return S, S[:, None, None] * U.t()[:, :, None] * V_hat.t()[:, None, :]


# ----------------------------------------------------------------------------- OLoRA

def qr_first_r(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    Q, Rm = torch.linalg.qr(W.double())
    d = torch.sign(torch.diagonal(Rm))
    return (Q * d)[:, :r], (Rm * d[:, None])[:r]


def test_olora_starts_at_the_first_r_of_the_qr_and_trains_on_the_residual():
    plain = mlp()
    model = dt.attach(copy.deepcopy(plain), dt.config("olora", r=R, alpha=8, targets=TARGETS))
    x = torch.randn(5, 12)
    torch.testing.assert_close(model(x), plain(x))          # unchanged at init
    for t in TARGETS:
        d, W = delta(model, t), plain.get_submodule(t).weight
        Q_r, R_r = qr_first_r(W, R)
        torch.testing.assert_close(d.B0.double(), Q_r, rtol=0, atol=1e-6)
        torch.testing.assert_close(d.A0.double(), R_r, rtol=0, atol=1e-6)
        torch.testing.assert_close(d.lora_B, d.B0, rtol=0, atol=0)
        torch.testing.assert_close(d.B0.double().t() @ d.B0.double(), torch.eye(R, dtype=torch.float64), atol=1e-6,
                                   rtol=0)                   # B starts orthonormal
        assert not d.B0.requires_grad and {n for n, _ in d.named_parameters()} == {"lora_A", "lora_B"}
    perturb(model)
    d = delta(model, "2")
    dW = 8 / R * (d.lora_B.double() @ d.lora_A.double() - d.B0.double() @ d.A0.double())
    with torch.no_grad():
        h = torch.tanh(model[0](x))
        torch.testing.assert_close(model[2](h).double(), by_hand(plain[2], dW, h), rtol=1e-5, atol=1e-6)


def test_olora_on_every_layer_kind_is_w_plus_the_update_applied_by_hand():
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    layers = {"conv": (nn.Conv2d(3, 6, 3, padding=1), torch.randn(2, 3, 5, 5)),
              "conv1d_gpt2": (Conv1D(12, 8), torch.randn(4, 8)),
              "embedding": (nn.Embedding(20, 6), torch.randint(0, 20, (3, 5)))}
    for kind, (layer, x) in layers.items():
        model = nn.Sequential(copy.deepcopy(layer))
        dt.attach(model, dt.config("olora", r=3, targets=["0"]))
        perturb(model)
        d = model[0].deltas["default"]
        dW = d.scale * (d.lora_B.double() @ d.lora_A.double() - d.B0.double() @ d.A0.double())
        if kind == "conv":
            want = F.conv2d(x.double(), layer.weight.double() + dW.reshape(layer.weight.shape), layer.bias.double(),
                            padding=1)
            W2 = layer.weight.reshape(6, -1)
        elif kind == "conv1d_gpt2":     # weight (in, out): the 2-D view is its transpose
            want = x.double() @ (layer.weight.double() + dW.t()) + layer.bias.double()
            W2 = layer.weight.t()
        else:                           # weight (num, dim): the view (dim, num) maps a one-hot
            want = F.embedding(x, layer.weight.double() + dW.t())
            W2 = layer.weight.t()
        with torch.no_grad():
            torch.testing.assert_close(model(x).double(), want, rtol=1e-5, atol=1e-5, msg=kind)
        Q_r, R_r = qr_first_r(W2, 3)
        torch.testing.assert_close(d.B0.double() @ d.A0.double(), Q_r @ R_r, rtol=0, atol=1e-5, msg=kind)


def test_olora_matches_peft():
    """PEFT's OLoRA modifies the base to ``W - s B A`` and starts B, A at Q_r, R_r: given the same
    trained factors, its model and ours compute the same function."""
    peft = pytest.importorskip("peft")
    plain = mlp()
    ref = peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(r=R, lora_alpha=8, target_modules=TARGETS,
                                                                     init_lora_weights="olora"))
    model = dt.attach(copy.deepcopy(plain), dt.config("olora", r=R, alpha=8, targets=TARGETS))
    perturb(model)
    for t in TARGETS:
        ours, theirs = delta(model, t), ref.base_model.model.get_submodule(t)
        # the start is Q_r R_r either way (PEFT leaves the QR's signs as LAPACK gives them)
        torch.testing.assert_close(components(ours.B0, ours.A0),
                                   components(theirs.lora_B["default"].weight, theirs.lora_A["default"].weight),
                                   rtol=0, atol=1e-5)
        with torch.no_grad():
            theirs.lora_A["default"].weight.copy_(ours.lora_A)
            theirs.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(6, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_olora_file_holds_only_a_and_b_and_reloads_identically():
    model = tiny_llama().eval()
    dt.attach(model, dt.config("olora", r=4, targets=["q_proj", "v_proj"]))
    perturb(model)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as tmp:
        dt.save_adapter(model, tmp)
        saved = file_tensors(tmp)
        assert {k.rsplit(".", 1)[1] for k in saved} == {"lora_A", "lora_B"}   # B0, A0 are regenerated
        fresh = tiny_llama().eval()
        dt.load_adapter(fresh, tmp)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, want)
    for (n, w), (_, v) in zip(wrappers(model), wrappers(fresh)):
        assert torch.equal(w.deltas["default"].B0, v.deltas["default"].B0), n


# ----------------------------------------------------------------------------- CorDA

@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_adapts_the_largest_or_smallest_components_of_w_c(mode):
    plain, batches = mlp(), make_batches()
    X = layer_inputs(plain, batches)
    model = dt.attach(copy.deepcopy(plain), dt.config("corda", r=R, alpha=8, mode=mode, targets=TARGETS))
    assert dt.calibrate(model, batches, loss_fn=loss_fn) == ["default"]
    for t in TARGETS:
        d, W = delta(model, t), plain.get_submodule(t).weight.double()
        S, terms = corda_terms(W, X[t])
        torch.testing.assert_close(terms.sum(0), W, rtol=0, atol=1e-9)      # W is exactly its components
        chosen = terms[:R] if mode == "ipm" else terms[-R:]
        torch.testing.assert_close(d.scale * components(d.B0, d.A0), chosen, rtol=1e-4, atol=1e-6)
        # the frozen rest is the other components; B and A share each component's sqrt(s_i)
        kept = S[:R] if mode == "ipm" else S[-R:]
        torch.testing.assert_close(d.B0.double().norm(dim=0), (kept / d.scale).sqrt(), rtol=1e-4, atol=0)
        assert torch.equal(d.lora_A, d.A0) and torch.equal(d.lora_B, d.B0)
    x = torch.randn(5, 12)
    torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-6)       # unchanged at init


def test_corda_matches_peft():
    """PEFT's CorDA on the same samples: the same residual weight ``W - s B0 A0`` and the same
    rank-one terms (its covariance has another scale, which moves only the B/A balance)."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("attr", reason="PEFT's CorDA module imports attrs, which PEFT does not declare")
    from peft.tuners.lora.config import CordaConfig as PeftCorda
    from peft.tuners.lora.corda import preprocess_corda
    plain, batches = mlp(), make_batches(1, 24)
    for mode in ("ipm", "kpm"):
        ref = copy.deepcopy(plain)
        cfg = peft.LoraConfig(r=R, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                              corda_config=PeftCorda(corda_method=mode))
        preprocess_corda(ref, cfg, run_model=lambda: ref(batches[0]["x"]))
        ref = peft.get_peft_model(ref, cfg)
        model = dt.attach(copy.deepcopy(plain), dt.config("corda", r=R, alpha=8, mode=mode, targets=TARGETS))
        dt.calibrate(model, batches, loss_fn=loss_fn)
        for t in TARGETS:
            ours, theirs = delta(model, t), ref.base_model.model.get_submodule(t)
            torch.testing.assert_close(
                plain.get_submodule(t).weight.double() - ours.scale * ours.B0.double() @ ours.A0.double(),
                theirs.base_layer.weight.double(), rtol=0, atol=1e-4, msg=mode)
            torch.testing.assert_close(
                components(ours.B0, ours.A0),
                components(theirs.lora_B["default"].weight, theirs.lora_A["default"].weight),
                rtol=0, atol=1e-4, msg=mode)


def explicit_patches(x: torch.Tensor, k: int, stride: int, pad: int) -> torch.Tensor:
    """Every receptive field of a 2-D convolution, by slicing (rows ordered channel, then kernel)."""
    x = F.pad(x, [pad] * 4)
    out = []
    for n in range(x.shape[0]):
        for i in range(0, x.shape[2] - k + 1, stride):
            for j in range(0, x.shape[3] - k + 1, stride):
                out.append(x[n, :, i:i + k, j:j + k].reshape(-1))
    return torch.stack(out).double()


def test_corda_on_a_convolution_orients_by_its_input_patches():
    model, plain = small_cnn(), small_cnn()
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    dt.attach(model, dt.config("corda", r=3, targets=["conv2"]))
    dt.calibrate(model, [x])         # a plain tensor batch: model(batch), no labels
    d = model.conv2.deltas["default"]
    X = explicit_patches(torch.relu(plain.conv1(x)).detach(), 3, stride=2, pad=1)
    _, terms = corda_terms(plain.conv2.weight.reshape(16, -1), X)
    torch.testing.assert_close(d.scale * components(d.B0, d.A0), terms[:3], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-6)


def test_corda_calibrates_on_unlabelled_token_batches_and_raises_until_calibrated():
    plain = tiny_bert_classifier().eval()
    model = dt.attach(copy.deepcopy(plain), dt.config("corda", r=4, targets=["query", "value"]))
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch), plain(**batch))     # uncalibrated: the frozen layers
    model.train()
    with pytest.raises(DeltatuneError, match=r"corda .*dt\.calibrate\(model, batches\) before training"):
        model(**batch)
    assert dt.calibrate(model, [batch]) == ["default"]
    assert model.training                                          # its mode back
    model(**batch).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in dt.trainable_parameters(model)
               if "classifier" not in n)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch), plain(**batch), rtol=1e-5, atol=1e-5)


def test_corda_file_holds_the_start_factors_and_reloads_without_data():
    plain, batches = mlp(), make_batches()
    model = dt.attach(copy.deepcopy(plain), dt.config("corda", r=R, targets=TARGETS))
    dt.calibrate(model, batches, loss_fn=loss_fn)
    perturb(model)
    x = torch.randn(4, 12)
    with torch.no_grad():
        want = model(x)
    with tempfile.TemporaryDirectory() as tmp:
        dt.save_adapter(model, tmp)
        assert {k.rsplit(".", 1)[1] for k in file_tensors(tmp)} == {"lora_A", "lora_B", "A0", "B0"}
        fresh = mlp()
        dt.load_adapter(fresh, tmp, trainable=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), want)
    fresh.train()
    loss_fn(fresh, batches[0]).backward()       # loaded: trains without calibrating


# ----------------------------------------------------------------------------- LoRA-SB

ETA = 1e-3


def mean_gradients(plain: nn.Module, batches) -> dict[str, torch.Tensor]:
    """dL/dW of each target's weight, averaged over the batches, by autograd on the plain model."""
    plain = copy.deepcopy(plain)
    for b in batches:
        loss_fn(plain, b).backward()
    return {t: plain.get_submodule(t).weight.grad.double() / len(batches) for t in TARGETS}


def lora_sb(plain: nn.Module, **kw) -> nn.Module:
    return dt.attach(copy.deepcopy(plain), dt.config("lora_sb", r=R, targets=TARGETS, **kw))


def test_lora_sb_starts_at_the_best_rank_r_approximation_of_the_first_adam_step():
    """B = U_r, A = V_r^T, R_0 = S_r from the SVD of ΔW_1 = -η sign(G), so B R_0 A = [ΔW_1]_r; and
    ΔW_1 is what one Adam step of full fine-tuning does (checked with torch's Adam here)."""
    plain, batches = mlp(), make_batches()
    G = mean_gradients(plain, batches)
    full = copy.deepcopy(plain)          # one Adam step of full fine-tuning at rate η
    opt = torch.optim.Adam([full.get_submodule(t).weight for t in TARGETS], lr=ETA, eps=1e-12)
    sum(loss_fn(full, b) for b in batches).div(len(batches)).backward()
    opt.step()
    model = lora_sb(plain, update_lr=ETA)
    assert dt.calibrate(model, batches, loss_fn=loss_fn) == ["default"]
    for t in TARGETS:
        step = (full.get_submodule(t).weight - plain.get_submodule(t).weight).detach().double()
        torch.testing.assert_close(step, -ETA * torch.sign(G[t]), rtol=0, atol=1e-6)
        U, S, Vh = torch.linalg.svd(-ETA * torch.sign(G[t]), full_matrices=False)
        d = delta(model, t)
        B, Rm, A = d.lora_B.double(), d.lora_R.double(), d.lora_A.double()
        torch.testing.assert_close(B @ Rm @ A, U[:, :R] @ torch.diag(S[:R]) @ Vh[:R], rtol=0, atol=1e-8)
        torch.testing.assert_close(B.t() @ B, torch.eye(R, dtype=torch.float64), rtol=0, atol=1e-6)
        torch.testing.assert_close(A @ A.t(), torch.eye(R, dtype=torch.float64), rtol=0, atol=1e-6)
        torch.testing.assert_close(B @ B.t(), U[:, :R] @ U[:, :R].t(), rtol=0, atol=1e-6)
        torch.testing.assert_close(A.t() @ A, Vh[:R].t() @ Vh[:R], rtol=0, atol=1e-6)
    moved = copy.deepcopy(plain)         # the model starts at that step, not at the frozen model
    with torch.no_grad():
        for t in TARGETS:
            d = delta(model, t)
            moved.get_submodule(t).weight += d.lora_B @ d.lora_R @ d.lora_A
        x = torch.randn(5, 12)
        torch.testing.assert_close(model(x), moved(x), rtol=1e-5, atol=1e-6)
        assert (model(x) - plain(x)).abs().max() > 1e-4


def test_lora_sb_trains_only_r_and_computes_w_plus_b_r_a():
    plain, batches = mlp(), make_batches()
    model = lora_sb(plain)
    dt.calibrate(model, batches, loss_fn=loss_fn)
    assert [n.rsplit(".", 1)[1] for n, _ in dt.trainable_parameters(model)] == ["lora_R", "lora_R"]
    assert dt.count_parameters(model)[0] == len(TARGETS) * R * R
    perturb(model)
    x = torch.randn(5, 12)
    d = delta(model, "0")
    assert not d.lora_B.requires_grad and not d.lora_A.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model[0](x).double(), by_hand(plain[0], d.lora_B.double() @ d.lora_R.double()
                                                                 @ d.lora_A.double(), x), rtol=1e-5, atol=1e-6)
    # R's gradient is B^T g A^T, g the gradient of the layer's effective weight (the paper's g^R)
    model.train()
    loss_fn(model, batches[0]).backward()
    eff = copy.deepcopy(plain)
    with torch.no_grad():
        for t in TARGETS:
            e = delta(model, t)
            eff.get_submodule(t).weight += e.lora_B @ e.lora_R @ e.lora_A
    loss_fn(eff, batches[0]).backward()
    for t in TARGETS:
        e, g = delta(model, t), eff.get_submodule(t).weight.grad
        torch.testing.assert_close(e.lora_R.grad, e.lora_B.t() @ g @ e.lora_A.t(), rtol=1e-4, atol=1e-7)


def test_lora_sb_on_a_quantised_base_takes_the_gradient_of_the_dequantised_weight():
    """NF4 layers have no float weight to differentiate; the zero probe gives dL/dW~ of the weight the
    layer computes with, the same as a float Linear holding the dequantised weight."""
    model = tiny_llama()
    dt.quantize(model, "nf4")
    reference = copy.deepcopy(model)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        q = reference.get_submodule(name)
        lin = nn.Linear(q.in_features, q.out_features, bias=False)
        lin.weight.data.copy_(q.weight)
        parent, attr = name.rsplit(".", 1)
        setattr(reference.get_submodule(parent), attr, lin)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    reference.eval()
    reference(input_ids=ids, labels=ids).loss.backward()
    targets = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    dt.attach(model, dt.config("lora_sb", r=4, targets=targets))
    dt.calibrate(model, [{"input_ids": ids, "labels": ids}])
    for name in targets:
        G = reference.get_submodule(name).weight.grad.double()
        U, S, Vh = torch.linalg.svd(-2e-3 * torch.sign(G), full_matrices=False)
        d = delta(model, name)
        torch.testing.assert_close(d.lora_B.double() @ d.lora_R.double() @ d.lora_A.double(),
                                   U[:, :4] @ torch.diag(S[:4]) @ Vh[:4], rtol=0, atol=1e-7)


def test_lora_sb_raises_until_calibrated_and_calibration_restarts_it():
    plain, batches = mlp(), make_batches()
    model = lora_sb(plain).eval()
    x = torch.randn(4, 12)
    torch.testing.assert_close(model(x), plain(x))        # uncalibrated: B = A = 0, the frozen layers
    model.train()
    with pytest.raises(DeltatuneError, match=r"lora_sb .*dt\.calibrate\(model, batches\) before training"):
        model(x)
    dt.calibrate(model, batches, loss_fn=loss_fn)
    first = {t: delta(model, t).lora_R.detach().clone() for t in TARGETS}
    perturb(model)
    dt.calibrate(model, batches, loss_fn=loss_fn)          # the same start again, not the trained R's
    assert all(torch.equal(delta(model, t).lora_R, first[t]) for t in TARGETS)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(getattr(delta(model, t), "probe") is None for t in TARGETS)


def r_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for n, p in dt.trainable_parameters(model) if n.endswith("lora_R"))


def saved_bytes(model: nn.Module) -> tuple[int, int, set[str]]:
    """The adapter file's size, its tensor bytes (the size less safetensors' length-prefixed JSON
    header), and the names of the tensors it holds."""
    with tempfile.TemporaryDirectory() as tmp:
        dt.save_adapter(model, tmp)
        path = os.path.join(tmp, "adapter.safetensors")
        with open(path, "rb") as f:
            header = 8 + int.from_bytes(f.read(8), "little")
        size = os.path.getsize(path)
        return size, size - header, {k.rsplit(".", 1)[1] for k in file_tensors(tmp)}


def test_lora_sb_file_bytes_against_r_bytes():
    """The paper's init (the default) takes B and A from data, so the file holds them with R:
    ``(r^2 + r (out + in)) / r^2`` times R's bytes (9x on the tiny BERT's 32 x 32 query/value, 97x
    on MiniLM's 384 x 384). The seeded ``init="random"`` regenerates B and A: the file's tensors are
    R alone, and on MiniLM the whole file is within 10 % of R's bytes once R outweighs the
    per-tensor header (r = 32 here)."""
    model = tiny_bert_classifier().eval()
    dt.attach(model, dt.config("lora_sb", targets=["query", "value"]))
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dt.calibrate(model, [batch], loss_fn=lambda m, b: m(**b).square().mean())
    _, tensors, keys = saved_bytes(model)
    assert r_bytes(model) == 4 * 8 * 8 * 4 and keys == {"lora_R", "lora_A", "lora_B"}
    assert tensors == 4 * (8 * 8 + 8 * (32 + 32)) * 4 == 9 * r_bytes(model)
    model = minilm_classifier().eval()
    dt.attach(model, dt.config("lora_sb", r=32, init="random", targets=["query", "value"]))
    size, tensors, keys = saved_bytes(model)
    assert keys == {"lora_R"} and tensors == r_bytes(model) == 12 * 32 * 32 * 4
    assert size <= 1.10 * r_bytes(model), (size, r_bytes(model))


def test_lora_sb_random_init_is_regenerated_from_the_seed_and_layer_and_starts_unchanged():
    plain = mlp()
    model = lora_sb(plain, init="random", seed=3)
    x = torch.randn(4, 12)
    torch.testing.assert_close(model(x), plain(x))         # R = 0
    assert dt.calibrate(model, make_batches(), loss_fn=loss_fn) == []
    d0 = delta(model, "0")
    torch.testing.assert_close(d0.lora_B.double().t() @ d0.lora_B.double(), torch.eye(R, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    twins = dt.attach(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), dt.config("lora_sb", r=2, init="random",
                                                                                  targets=["0", "1"]))
    assert not torch.equal(twins[0].deltas["default"].lora_A, twins[1].deltas["default"].lora_A)  # per layer
    assert not torch.equal(lora_sb(plain, init="random", seed=4)[0].deltas["default"].lora_A, d0.lora_A)
    perturb(model)
    model.train()
    loss_fn(model, make_batches(1)[0]).backward()
    assert all(p.grad.abs().sum() > 0 for _, p in dt.trainable_parameters(model))
    model.eval()
    with torch.no_grad():
        want = model(x)
    with tempfile.TemporaryDirectory() as tmp:
        dt.save_adapter(model, tmp)
        fresh = mlp()
        dt.load_adapter(fresh, tmp)
    with torch.no_grad():
        assert torch.equal(fresh(x), want)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name,kw,match", [
    ("corda", {"mode": "both"}, "mode='both' is not valid"),
    ("corda", {"ridge": 0.0}, "ridge=0.0 is out of range"),
    ("olora", {"r": 0}, "r=0 is out of range"),
    ("lora_sb", {"init": "random", "update_lr": 1e-2}, "update_lr=0.01 applies to init='gradient' only"),
    ("lora_sb", {"seed": 2}, "seed=2 applies to init='random' only"),
    ("lora_sb", {"update_lr": -1.0}, "update_lr=-1.0 is out of range"),
])
def test_bad_config_values_raise_at_construction(name, kw, match):
    with pytest.raises(DeltatuneError, match=match):
        dt.config(name, **kw)


@pytest.mark.parametrize("name", ["corda", "olora", "lora_sb"])
def test_layers_that_cannot_be_adapted_are_refused_at_attach_by_name(name):
    model = nn.Sequential(nn.Linear(12, 3), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(DeltatuneError, match=r"r=8 does not fit layer 0 .*lower r"):
        dt.attach(copy.deepcopy(model), dt.config(name, targets=["0"]))
    with pytest.raises(DeltatuneError, match=f"{name} supports convolutions with groups=1 only"):
        dt.attach(copy.deepcopy(model), dt.config(name, r=1, targets=["1"]))
    assert not any(hasattr(m, "deltas") for m in model.modules())


def test_corda_refuses_a_conv3d_and_a_layer_the_batches_never_reach():
    with pytest.raises(DeltatuneError, match="0 is a Conv3d: exclude it"):
        dt.attach(nn.Sequential(nn.Conv3d(2, 4, 3)), dt.config("corda", r=2, targets=["0"]))
    model = nn.ModuleDict({"used": nn.Linear(6, 6), "unused": nn.Linear(6, 6)})
    model.forward = lambda x: model["used"](x)
    dt.attach(model, dt.config("corda", r=2, targets=["used", "unused"]))
    with pytest.raises(DeltatuneError, match="unused was not called by the model on the calibration batches"):
        dt.calibrate(model, [torch.randn(3, 6)])
