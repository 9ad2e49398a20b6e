"""AdaLoRA against its definition ("Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"):
the SVD-form update W + s P diag(Λ ⊙ m) Q, the importance (sensitivity smoothed with uncertainty),
the cubic budget schedule and masking, recomputed here from the paper's formulas; the
orthogonality term; ranks saved and restored; the optimiser unable to bring a masked entry back."""

from __future__ import annotations

import copy
import math
import tempfile

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import deltatune as dt
from deltatune.core.engine import wrappers
from deltatune.methods.lowrank.adalora import check_budget, ranks
from models import bbc_texts, minilm_classifier, minilm_tokenizer

PARAMS = ("adalora_P", "adalora_Lambda", "adalora_Q")


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 12)
        self.b = nn.Linear(12, 6)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def toy(**kw):
    torch.manual_seed(0)
    model = Toy()
    dt.attach(model, dt.config("adalora", targets=["a", "b"], **kw))
    return model


def toy_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 16, generator=g), torch.randn(32, 6, generator=g)


def deltas(model, name="default"):
    return {n: w.deltas[name] for n, w in wrappers(model) if name in w.deltas}


def budget_reference(t, T, tinit, tfinal, b0, bT):
    """The paper's Eq. 12, rounded down."""
    if t <= tinit:
        return b0
    if t >= T - tfinal:
        return bT
    return math.floor(bT + (b0 - bT) * (1 - (t - tinit) / (T - tinit - tfinal)) ** 3)


def test_forward_and_merge_are_the_svd_form():
    model = toy(init_r=4, target_r=2).eval()
    g = torch.Generator().manual_seed(2)
    layer = dict(wrappers(model))["a"]
    d = layer.deltas["default"]
    with torch.no_grad():
        d.adalora_Lambda.copy_(torch.randn(4, generator=g))
        d.adalora_mask.copy_(torch.tensor([True, False, True, False]))
    x = torch.randn(5, 16, generator=g)
    P, L, Q, W = d.adalora_P, d.adalora_Lambda, d.adalora_Q, layer.base.weight
    kept = L * torch.tensor([1.0, 0.0, 1.0, 0.0])
    want = x @ W.T + layer.base.bias + (8.0 / 4) * (x @ Q.T * kept) @ P.T      # s = alpha / init_r
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)
        xs = torch.randn(7, 16, generator=g)
        unmerged = model(xs)
        before = W.clone()
        dt.merge(model)
        torch.testing.assert_close(W - before, (8.0 / 4) * P @ torch.diag(kept) @ Q, rtol=0, atol=1e-6)
        assert (model(xs) - unmerged).abs().max() <= 1e-5
    dt.unmerge(model)
    assert torch.equal(W, before)


def test_importance_and_masking_match_the_papers_formulas():
    T, tinit, tfinal, deltaT, beta1, beta2 = 14, 2, 3, 3, 0.85, 0.7
    attached = toy(init_r=4, target_r=2, total_step=T, tinit=tinit, tfinal=tfinal, deltaT=deltaT,
                   beta1=beta1, beta2=beta2, orth_reg_weight=0.1)
    model = copy.deepcopy(attached)         # the gradient records must survive a deep copy
    layers = deltas(model)
    opt = torch.optim.AdamW([p for _, p in dt.trainable_parameters(model)], lr=3e-2)
    x, y = toy_batch()
    ema = {(n, p): torch.zeros_like(getattr(d, p)) for n, d in layers.items() for p in PARAMS}
    unc = {k: torch.zeros_like(v) for k, v in ema.items()}
    model.train()
    masked_steps = 0
    for t in range(1, T + 1):
        loss = F.mse_loss(model(x), y) + dt.auxiliary_loss(model)
        loss.backward()
        if t <= T - tfinal:
            for (n, p) in ema:
                w = getattr(layers[n], p)
                sensitivity = (w * w.grad).abs().detach()
                ema[n, p] = beta1 * ema[n, p] + (1 - beta1) * sensitivity
                unc[n, p] = beta2 * unc[n, p] + (1 - beta2) * (sensitivity - ema[n, p]).abs()
        before = {n: d.adalora_mask.clone() for n, d in layers.items()}
        opt.step()
        opt.zero_grad()
        dt.step_hook(model, t)
        s = {k: ema[k] * unc[k] for k in ema}
        scores = torch.cat([s[n, "adalora_Lambda"] + s[n, "adalora_P"].mean(0) + s[n, "adalora_Q"].mean(1)
                            for n in layers])
        torch.testing.assert_close(torch.cat([d.triplet_scores() for d in layers.values()]), scores)
        reallocates = t == T - tfinal or (tinit < t < T - tfinal and (t - tinit) % deltaT == 0)
        if reallocates:
            b = budget_reference(t, T, tinit, tfinal, 4 * 2, 2 * 2)
            want = torch.zeros(8, dtype=torch.bool)
            want[scores.argsort(descending=True)[:b]] = True
            got = torch.cat([d.adalora_mask for d in layers.values()])
            assert torch.equal(got, want), (t, got, want)
            assert int(got.sum()) == b
            masked_steps += 1
        else:
            for n, d in layers.items():
                assert torch.equal(d.adalora_mask, before[n]), t
        for d in layers.values():
            assert torch.all(d.adalora_Lambda[~d.adalora_mask] == 0)
    assert masked_steps == 3            # steps 5, 8 and 11 (= T - tfinal)
    assert sum(ranks(model).values()) == 4 == sum(check_budget(model).values())
    # the untouched original has no steps and all its ranks: over budget, and the check says why
    with pytest.raises(dt.DeltatuneError, match="never called"):
        check_budget(attached)


def test_the_optimiser_cannot_bring_a_masked_triplet_back():
    model = toy(init_r=4, target_r=1, total_step=6, tfinal=3, deltaT=1)
    layers = deltas(model)
    opt = torch.optim.AdamW([p for _, p in dt.trainable_parameters(model)], lr=5e-2)
    x, y = toy_batch()
    model.train()
    for t in range(1, 7):
        F.mse_loss(model(x), y).backward()
        if t > 3:       # the mask is fixed from T - tfinal = 3 on: masked triplets get no gradient
            for d in layers.values():
                off = ~d.adalora_mask
                assert off.any()
                assert torch.all(d.adalora_Lambda.grad[off] == 0) and torch.all(d.adalora_P.grad[:, off] == 0)
                assert torch.all(d.adalora_Q.grad[off] == 0)
        opt.step()
        if t > 4:       # Adam's old moments do move the stored value of a masked entry...
            assert any(torch.any(d.adalora_Lambda[~d.adalora_mask] != 0) for d in layers.values())
        opt.zero_grad()
        dt.step_hook(model, t)
        for d in layers.values():       # ...and the step hook puts it back to zero
            assert torch.all(d.adalora_Lambda[~d.adalora_mask] == 0)
    # the outputs are those of the kept triplets alone
    with torch.no_grad():
        for name, w in wrappers(model):
            d = w.deltas["default"]
            keep = d.adalora_mask
            want = w.base.weight + (8.0 / 4) * d.adalora_P[:, keep] @ torch.diag(d.adalora_Lambda[keep]) \
                @ d.adalora_Q[keep]
            torch.testing.assert_close(w(torch.eye(w.base.in_features)) - w.base.bias, want.T)


def test_a_readmitted_triplet_restarts_at_zero():
    model = toy(init_r=4, target_r=1, total_step=40, deltaT=2)       # b(2) = floor(2 + 6 * 0.95^3) = 7
    layers = deltas(model)
    d = layers["a"]
    with torch.no_grad():
        d.adalora_Lambda.copy_(torch.tensor([0.5, -0.4, 0.3, 0.7]))
        d.adalora_mask.copy_(torch.tensor([True, True, True, False]))
    # smoothed importance that ranks a's masked triplet 3 first among a's, its triplet 0 last, b's in between
    for layer, lam in ((d, [0.0, 1.0, 1.0, 9.0]), (layers["b"], [5.0] * 4)):
        for p in PARAMS:
            layer.importance[p] = torch.ones_like(getattr(layer, p))
            layer.uncertainty[p] = torch.zeros_like(getattr(layer, p))
        layer.uncertainty["adalora_Lambda"] = torch.tensor(lam)
    dt.step_hook(model, 2)          # a reallocation step (no backward ran, so the scores stay as set)
    assert d.adalora_mask.tolist() == [False, True, True, True]
    assert d.adalora_Lambda.tolist() == [0.0, pytest.approx(-0.4), pytest.approx(0.3), 0.0]
    x, _ = toy_batch()
    with torch.no_grad():
        layer = dict(wrappers(model))["a"]
        kept = torch.tensor([0.0, -0.4, 0.3, 0.0])     # triplet 3 came back at zero: it adds nothing yet
        want = x @ layer.base.weight.T + layer.base.bias + (8.0 / 4) * (x @ d.adalora_Q.T * kept) @ d.adalora_P.T
        torch.testing.assert_close(layer(x), want)


def test_orthogonality_term_is_the_papers_regulariser_and_training_lowers_it():
    model = toy(init_r=4, target_r=2, orth_reg_weight=0.5, total_step=10)

    def terms():
        out = {}
        for n, d in deltas(model).items():
            P, Q, eye = d.adalora_P, d.adalora_Q, torch.eye(4)
            out[n] = ((P.T @ P - eye) ** 2).sum() + ((Q @ Q.T - eye) ** 2).sum()
        return out

    start = terms()
    aux = dt.auxiliary_loss(model)
    torch.testing.assert_close(aux, 0.5 * sum(start.values()))
    assert all(v > 0 for v in start.values())
    opt = torch.optim.SGD([p for _, p in dt.trainable_parameters(model)], lr=0.02)
    for _ in range(20):
        opt.zero_grad()
        dt.auxiliary_loss(model).backward()
        opt.step()
    end = terms()
    assert all(end[n] < 0.5 * start[n] for n in start), (start, end)
    assert dt.auxiliary_loss(toy(init_r=4, target_r=2, orth_reg_weight=0.0)) == 0.0


def test_minilm_training_ends_within_budget_and_the_ranks_reload():
    texts, labels = bbc_texts(1)
    enc = minilm_tokenizer()(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    batch, target = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, torch.tensor(labels)
    model = minilm_classifier()
    pristine = copy.deepcopy(model)
    T, layers = 8, 12           # query and value of 6 layers
    dt.attach(model, dt.config("adalora", init_r=4, target_r=2, total_step=T, tinit=2, tfinal=2, deltaT=2,
                               targets=["query", "value"], trainable_modules=["classifier"]))
    assert dt.count_parameters(model)[0] == layers * 4 * (384 + 384 + 1) + 384 * 5 + 5
    opt = torch.optim.AdamW(dt.parameter_groups(model, lr=1e-2))
    model.train()
    losses = []
    for t in range(1, T + 1):
        loss = F.cross_entropy(model(**batch), target) + dt.auxiliary_loss(model)
        loss.backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
        dt.step_hook(model, t)
    assert losses[-1] < losses[0]
    kept = check_budget(model)
    assert len(kept) == layers and sum(kept.values()) == 2 * layers
    model.eval()
    with torch.no_grad():
        unmerged = model(**batch)
    with tempfile.TemporaryDirectory() as tmp:
        dt.save_adapter(model, tmp)
        with safe_open(f"{tmp}/adapter.safetensors", framework="pt") as f:
            masks = {k: f.get_tensor(k) for k in f.keys() if k.endswith("adalora_mask")}
        assert len(masks) == layers and all(m.dtype == torch.bool for m in masks.values())
        fresh = copy.deepcopy(pristine).eval()
        dt.load_adapter(fresh, tmp)
    assert ranks(fresh) == kept
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch), unmerged, rtol=0, atol=1e-6)
        dt.step_hook(fresh, T - 2)      # a reallocation step: a frozen, loaded adapter keeps its ranks
        assert ranks(fresh) == kept
        assert torch.equal(fresh(**batch), unmerged)
        dt.merge(model)
        assert (model(**batch) - unmerged).abs().max() <= 1e-5


def test_invalid_configs_and_schedules_are_refused():
    with pytest.raises(dt.DeltatuneError, match="target_r=9 must be at most init_r=8"):
        dt.config("adalora", init_r=8, target_r=9)
    with pytest.raises(dt.DeltatuneError, match="tinit \\+ tfinal = 60 \\+ 40 must be less than total_step=100"):
        dt.config("adalora", tinit=60, tfinal=40, total_step=100)
    for field, value in (("deltaT", 0), ("beta1", 1.0), ("beta2", -0.1), ("total_step", 0), ("init_r", 0),
                         ("orth_reg_weight", -1.0), ("alpha", 0.0), ("tinit", -1)):
        with pytest.raises(dt.DeltatuneError, match=field):
            dt.config("adalora", **{field: value})
    with pytest.raises(dt.DeltatuneError, match="init_r=7 does not fit b "):
        toy(init_r=7, target_r=2)
    with pytest.raises(dt.DeltatuneError, match="needs total_step"):
        dt.step_hook(toy(init_r=4, target_r=2), 1)
    model = toy(init_r=4, target_r=2, total_step=3)
    dt.step_hook(model, 1)
    for bad in (1, 4):
        with pytest.raises(dt.DeltatuneError, match=f"got step {bad} after step 1"):
            dt.step_hook(model, bad)
    with pytest.raises(dt.DeltatuneError, match="no adalora adapter named 'other'; attached: default"):
        ranks(model, "other")
