"""LoRA-GA ("LoRA-GA: Low-Rank Adaptation with Gradient Approximation"): LoRA's ``init="lora_ga"``
through ``dt.calibrate``, checked against the paper's definition written here (the gradient
estimated with plain autograd on an unwrapped copy of the model, its SVD, the stable scale) and
against the paper's claim (the first step follows the full fine-tuning gradient); calibration's
promises (output unchanged, nothing left behind, one backward per batch for all layers, clear
errors); the saved file; ``deltatune train`` calibrating by itself. Also DoRA as LoRA with a
magnitude term: one delta class, and mixed batches still exact."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.core.errors import DeltatuneError

R = 2
TARGETS = ["0", "2"]
GAMMA = 16.0


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 10), nn.Tanh(), nn.Linear(10, 3))


def make_batches(n: int = 3, size: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(size, 12, generator=g), "y": torch.randint(0, 3, (size,), generator=g)} for _ in range(n)]


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def reference_gradients(plain: nn.Module, batches) -> dict[str, torch.Tensor]:
    """dL/dW of each target's weight, averaged over the batches, by autograd on the plain model."""
    plain = copy.deepcopy(plain)
    for p in plain.parameters():
        p.requires_grad_(True)
        p.grad = None
    for b in batches:
        loss_fn(plain, b).backward()
    return {t: plain.get_submodule(t).weight.grad.double() / len(batches) for t in TARGETS}


def attach_lora_ga(model: nn.Module, **kwargs) -> nn.Module:
    return dt.attach(model, dt.config("lora", r=R, init="lora_ga", targets=TARGETS, **kwargs))


def update(model: nn.Module, target: str) -> torch.Tensor:
    """The layer's effective weight update, float64, from its factors (the function, not the code's
    own delta: ``s (B A - B0 A0)`` for LoRA-GA, ``s B A`` for default LoRA)."""
    d = model.get_submodule(target).deltas["default"]
    BA = d.lora_B.detach().double() @ d.lora_A.detach().double()
    if hasattr(d, "A0"):
        BA = BA - d.B0.double() @ d.A0.double()
    return d.scale * BA


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


# ------------------------------------------------------------------ the paper's definition

def test_factors_are_the_scaled_singular_vectors_of_the_mean_gradient():
    """A = c V_{1..r}^T, B = c U_{r+1..2r}, c = out^(1/4) / sqrt(gamma), from the SVD of the mean
    gradient; compared through A^T A and B B^T, which do not depend on the singular vectors' signs."""
    plain, batches = mlp(), make_batches()
    G = reference_gradients(plain, batches)
    model = attach_lora_ga(copy.deepcopy(plain))
    assert dt.calibrate(model, batches, loss_fn=loss_fn) == ["default"]
    for t in TARGETS:
        d = model.get_submodule(t).deltas["default"]
        U, S, Vh = torch.linalg.svd(G[t], full_matrices=False)
        c2 = G[t].shape[0] ** 0.5 / GAMMA
        A, B = d.lora_A.double(), d.lora_B.double()
        torch.testing.assert_close(A.t() @ A, c2 * Vh[:R].t() @ Vh[:R], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(B @ B.t(), c2 * U[:, R:2 * R] @ U[:, R:2 * R].t(), rtol=1e-4, atol=1e-6)
        # the frozen residual holds the same initial factors
        assert torch.equal(d.A0, d.lora_A) and torch.equal(d.B0, d.lora_B)


def test_gamma_sets_the_scale():
    plain, batches = mlp(), make_batches()
    model = attach_lora_ga(copy.deepcopy(plain), lora_ga_gamma=4.0)
    dt.calibrate(model, batches, loss_fn=loss_fn)
    d = model.get_submodule("0").deltas["default"]
    # rows of A are c times orthonormal vectors: each has norm c = 16^(1/4) / sqrt(4)
    torch.testing.assert_close(d.lora_A.double().norm(dim=1), torch.full((R,), 16 ** 0.25 / 2, dtype=torch.float64))


def test_first_step_follows_the_full_gradient_better_than_default_lora():
    """The paper's claim: one SGD step changes W by ~ -lr s^2 c^2 G_2r, the best rank-2r
    approximation of full fine-tuning's step, so its cosine with -G is ||G_2r|| / ||G||; default
    LoRA's first step (-lr s^2 G A^T A with a random A) is far less aligned."""
    plain, batches = mlp(), make_batches()
    G = reference_gradients(plain, batches)
    cos = {}
    for init in ("lora_ga", "default"):
        torch.manual_seed(3)
        model = dt.attach(copy.deepcopy(plain), dt.config("lora", r=R, init=init, targets=TARGETS))
        dt.calibrate(model, batches, loss_fn=loss_fn)
        before = {t: update(model, t) for t in TARGETS}
        opt = torch.optim.SGD([p for _, p in dt.trainable_parameters(model)], lr=1e-4)
        model.train()
        sum(loss_fn(model, b) for b in batches).div(len(batches)).backward()
        opt.step()
        cos[init] = {t: cosine(update(model, t) - before[t], -G[t]) for t in TARGETS}
    for t in TARGETS:
        S = torch.linalg.svdvals(G[t])
        best = float(S[:2 * R].norm() / S.norm())      # the cosine of G_2r with G
        assert cos["lora_ga"][t] == pytest.approx(best, abs=1e-3)
        assert cos["lora_ga"][t] > cos["default"][t] + 0.4, (t, cos)


# ------------------------------------------------------------------ what calibration promises

def test_calibration_keeps_the_output_and_leaves_nothing_behind():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 10), nn.Dropout(0.5),
                          nn.Linear(10, 3))
    targets = ["0", "3"]
    dt.attach(model, dt.config("lora", r=R, init="lora_ga", targets=targets, trainable_modules=["5"]))
    x = torch.randn(8, 12)
    model.eval()
    before = model(x)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    stats = model[1].running_mean.clone()
    model.train()
    model[4].eval()                     # a module in its own mode keeps it
    dt.calibrate(model, make_batches(), loss_fn=loss_fn)
    assert model.training and model[0].training and not model[4].training
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(model[1].running_mean, stats)      # BatchNorm statistics untouched
    for t in targets:
        d = model.get_submodule(t).deltas["default"]
        assert d.lora_A.abs().sum() > 0 and d.lora_B.abs().sum() > 0      # B A != 0 ...
    model.eval()
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)   # ... and yet the same function


def test_one_forward_and_backward_per_batch_for_all_layers():
    model = attach_lora_ga(mlp())
    calls = []

    def counting(m, b):
        calls.append(1)
        return loss_fn(m, b)

    dt.calibrate(model, make_batches(4), loss_fn=counting)
    assert len(calls) == 4
    assert all(model.get_submodule(t).deltas["default"].A0.abs().sum() > 0 for t in TARGETS)


def test_training_before_calibration_raises_and_the_frozen_model_runs_meanwhile():
    plain = mlp()
    model = attach_lora_ga(copy.deepcopy(plain))
    x = torch.randn(4, 12)
    model.eval()
    torch.testing.assert_close(model(x), plain(x))        # uncalibrated: the frozen layers
    model.train()
    with torch.no_grad():
        model(x)                                          # no gradients: nothing can train wrongly
    with pytest.raises(DeltatuneError, match=r"dt\.calibrate\(model, batches\) before training"):
        model(x)
    dt.calibrate(model, make_batches(), loss_fn=loss_fn)
    loss_fn(model, make_batches(1)[0]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in dt.trainable_parameters(model))


def test_methods_without_data_needs_are_not_calibrated():
    model = dt.attach(mlp(), dt.config("lora", r=R, targets=TARGETS))
    A = model[0].deltas["default"].lora_A.clone()
    assert dt.calibrate(model, make_batches(), loss_fn=loss_fn) == []
    assert torch.equal(model[0].deltas["default"].lora_A, A)


def test_default_loss_is_the_transformers_output_loss():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 50, (4, 6))
    batch = {"input_ids": ids, "labels": torch.tensor([0, 1, 2, 1])}
    before = model(input_ids=ids).logits
    dt.attach(model, dt.config("lora", r=R, init="lora_ga", targets=["query", "value"]))
    assert dt.calibrate(model, [batch]) == ["default"]
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-6)
    with pytest.raises(DeltatuneError, match=r"has no \.loss; pass batches with labels, or .*loss_fn="):
        dt.calibrate(model, [{"input_ids": ids}])


def test_clear_errors():
    batches = make_batches()
    with pytest.raises(DeltatuneError, match=r"has no \.loss.*loss_fn="):
        dt.calibrate(attach_lora_ga(mlp()), [b["x"] for b in batches])
    with pytest.raises(DeltatuneError, match="must be a scalar tensor"):
        dt.calibrate(attach_lora_ga(mlp()), batches, loss_fn=lambda m, b: m(b["x"]))
    with pytest.raises(DeltatuneError, match="the loss is nan"):
        dt.calibrate(attach_lora_ga(mlp()), batches, loss_fn=lambda m, b: loss_fn(m, b) * float("nan"))
    # a targeted layer the loss does not reach
    model = attach_lora_ga(mlp())
    with pytest.raises(DeltatuneError, match="2 got no gradient from the calibration loss.*exclude it"):
        dt.calibrate(model, batches, loss_fn=lambda m, b: m[0](b["x"]).sum())
    assert all(p.grad is None for p in model.parameters()) and not model[0].base.weight.requires_grad
    # LoRA-GA takes 2r singular vectors: r=6 does not fit the 10-unit layer
    with pytest.raises(DeltatuneError, match=r"r=6 does not fit layer 2 .* at most min\(out, fan_in\) = 10 halved"):
        dt.attach(mlp(), dt.config("lora", r=6, init="lora_ga", targets=["2"]))
    with pytest.raises(DeltatuneError, match="lora_ga_gamma=4.0 applies to init='lora_ga' only"):
        dt.config("lora", lora_ga_gamma=4.0)
    with pytest.raises(DeltatuneError, match="lora_ga_gamma=0 is out of range"):
        dt.config("lora", init="lora_ga", lora_ga_gamma=0)
    merged = attach_lora_ga(mlp())
    dt.merge(merged)
    with pytest.raises(DeltatuneError, match=r"merged into 0; dt\.unmerge\(model\) before dt\.calibrate"):
        dt.calibrate(merged, batches, loss_fn=loss_fn)


# ------------------------------------------------------------------ saved and reloaded

def test_file_holds_the_calibrated_residual_and_reloads_without_data(tmp_path):
    plain, batches = mlp(), make_batches()
    model = attach_lora_ga(copy.deepcopy(plain))
    dt.calibrate(model, batches, loss_fn=loss_fn)
    opt = torch.optim.AdamW([p for _, p in dt.trainable_parameters(model)], lr=1e-2)
    model.train()
    for b in batches:
        loss_fn(model, b).backward()
        opt.step()
        opt.zero_grad()
    dt.save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter.safetensors")
    want = {f"deltas.{t}.{k}" for t in TARGETS for k in ("lora_A", "lora_B", "A0", "B0")}
    assert set(saved) == want
    fresh = copy.deepcopy(plain)
    dt.load_adapter(fresh, tmp_path, trainable=True)
    x = torch.randn(5, 12)
    model.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    fresh.train()
    loss_fn(fresh, batches[0]).backward()     # a calibrated file trains without dt.calibrate


# ------------------------------------------------------------------ DoRA: LoRA with a magnitude term

def test_dora_is_lora_with_a_magnitude_term_and_calibrates_too():
    plain, batches = mlp(), make_batches()
    lora = dt.attach(copy.deepcopy(plain), dt.config("lora", r=R, targets=TARGETS))
    dora = dt.attach(copy.deepcopy(plain), dt.config("dora", r=R, init="lora_ga", targets=TARGETS))
    d_lora, d_dora = lora[0].deltas["default"], dora[0].deltas["default"]
    assert type(d_lora) is type(d_dora) and d_lora.magnitude is None
    torch.testing.assert_close(d_dora.magnitude, plain[0].weight.norm(dim=1))
    x = torch.randn(4, 12)
    dt.calibrate(dora, batches, loss_fn=loss_fn)
    dora.eval()
    torch.testing.assert_close(dora(x), plain(x), rtol=1e-5, atol=1e-6)


def test_mixed_batch_of_lora_and_dora_adapters_on_one_layer():
    """LoRA and DoRA share the delta class now, so the mixed-batch kernel itself must leave DoRA
    to the per-adapter path: each sample's output equals its adapter's own."""
    model = mlp()
    dt.attach(model, dt.config("lora", r=R, targets=TARGETS), name="a")
    dt.attach(model, dt.config("dora", r=R, targets=TARGETS), name="b")
    with torch.no_grad():
        for t in TARGETS:
            for name in ("a", "b"):
                model.get_submodule(t).deltas[name].lora_B.normal_()
            model.get_submodule(t).deltas["b"].magnitude.mul_(1.5)
    x = torch.randn(6, 12)
    names = ["a", "b", None, "b", "a", None]
    model.eval()
    alone = {}
    for name in ("a", "b"):
        dt.set_active(model, [name])
        alone[name] = model(x)
    with dt.disabled(model):
        alone[None] = model(x)
    with dt.per_sample_adapters(model, names):
        mixed = model(x)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[name][i], rtol=1e-5, atol=1e-6)
    assert not math.isclose(float((alone["a"] - alone["b"]).detach().abs().max()), 0.0)


# ------------------------------------------------------------------ deltatune train calibrates by itself

from test_train import one_thread, tiny_model, toy_csv  # noqa: E402,F401  (fixtures)


def test_deltatune_train_calibrates_and_resume_rebuilds_the_same_residual(tiny_model, toy_csv, tmp_path, capsys):
    from deltatune.train.loop import TrainArgs, train
    base = dict(model=str(tiny_model), data=str(toy_csv), method="lora", epochs=1, lr=1e-2, batch_size=16,
                max_length=24, out=str(tmp_path / "ga"), progress=False, device="cpu")
    train(TrainArgs(method_options={"r": 2, "init": "lora_ga"}, **base))
    assert "calibrated default on 8 batches of 16" in capsys.readouterr().out
    first = load_file(tmp_path / "ga" / "adapter.safetensors")
    residual = [k for k in first if k.endswith((".A0", ".B0"))]
    assert len(residual) == 2 * 2 * 2 and all(first[k].abs().sum() > 0 for k in residual)   # q, v of 2 layers
    # checkpoints hold trainable tensors only: resuming calibrates again, to the very same residual
    train(TrainArgs(method_options={"r": 2, "init": "lora_ga"}, resume=True, **base))
    assert "calibrated default" in capsys.readouterr().out
    again = load_file(tmp_path / "ga" / "adapter.safetensors")
    assert set(again) == set(first) and all(torch.equal(again[k], first[k]) for k in first)
    train(TrainArgs(method_options={"r": 2}, **{**base, "out": str(tmp_path / "plain")}))
    assert "calibrated" not in capsys.readouterr().out          # plain LoRA needs no data


def test_a_quantised_base_is_refused_by_name():
    """LoRA-GA needs dL/dW of a float weight; an nf4 layer's weight is rebuilt on each read."""
    from models import tiny_llama
    model = dt.quantize(tiny_llama(), "nf4")
    with pytest.raises(dt.DeltatuneError, match="stored quantised"):
        dt.attach(model, dt.config("lora", init="lora_ga", r=2))
    assert not dt.core.engine.wrappers(model)
