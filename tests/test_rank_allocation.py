"""Rank allocation against the papers' definitions, written here from the formulas:

- DyLoRA ("Dynamic Search-Free Low-Rank Adaptation"): at a training step with sampled rank b the
  layer is ``W x + (alpha / b) B[:, :b] A[:b] x``, only component b moves (frozen mode), b is uniform
  and reproducible from the seed; in eval the full rank with alpha / r (equal to PEFT's LoRA given the
  same factors); ``truncate_rank`` keeps the first r components: the file, the config and the outputs
  of the first r components alone, and every truncated rank of a trained adapter beats the base.
- IncreLoRA ("Incremental Parameter Allocation"): ``W x + (alpha / k) P diag(λ ⊙ m) Q x`` with the
  reserve at λ = 1e-5; ranks grow to the budget, never beyond, in the layers the paper's importance
  (computed here from ΔW and its gradient) ranks first; inactive components contribute nothing and
  get no gradient; restart warmup scales a joining parameter's update by j / restart_warmup; the
  file keeps the mask.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import deltatune as dt
from deltatune.core.engine import adapters, wrappers
from deltatune.methods.lowrank.increlora import ranks
from deltatune.methods.lowrank._nested_rank import truncate_rank
from models import tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 12)
        self.b = nn.Linear(12, 12)
        self.c = nn.Linear(12, 6)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def batch(n: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g), torch.randn(n, 6, generator=g)


def deltas(model, name="default"):
    return {n: w.deltas[name] for n, w in wrappers(model) if name in w.deltas}


def perturb(model, scale=0.3, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in dt.trainable_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- DyLoRA

def dylora_toy(**kw):
    model = Toy()
    dt.attach(model, dt.config("dylora", targets=["a", "b"], **{"r": 4, "alpha": 8.0, **kw}))
    return model


def truncated_lora(x, layer, A, B, alpha, b):
    """The paper's truncated update on the wrapped Linear ``layer``: W x + bias + (alpha / b) B[:, :b] A[:b] x."""
    return F.linear(x, layer.base.weight, layer.base.bias) + (alpha / b) * x @ A[:b].T @ B[:, :b].T


@pytest.mark.parametrize("frozen", [True, False])
def test_dylora_trains_the_truncated_factors_at_a_uniform_reproducible_rank(frozen):
    def run(seed, steps):
        model = dylora_toy(frozen=frozen, seed=seed)
        perturb(model)
        layer = dict(wrappers(model))["a"]
        d = layer.deltas["default"]
        model.train()
        opt = torch.optim.SGD(dt.parameter_groups(model, lr=1e-5))
        x, _ = batch(8)
        drawn = []
        for step in range(1, steps + 1):
            opt.zero_grad()
            out = layer(x)
            out.pow(2).sum().backward()
            moved = (d.lora_B.grad.abs().sum(0) > 0).nonzero().flatten().tolist()
            b = moved[-1] + 1                # the highest component with a gradient is the sampled one
            assert moved == ([b - 1] if frozen else list(range(b))), moved
            assert ((d.lora_A.grad.abs().sum(1) > 0).nonzero().flatten().tolist() == moved)
            with torch.no_grad():
                torch.testing.assert_close(out, truncated_lora(x, layer, d.lora_A, d.lora_B, 8.0, b))
            drawn.append(b)
            opt.step()
            dt.step_hook(model, step)
        return drawn

    drawn = run(0, 240)
    counts = torch.bincount(torch.tensor(drawn), minlength=5)[1:]
    assert counts.min() > 35 and counts.max() < 85, counts       # uniform on {1..4}: 60 each
    assert drawn[:40] == run(0, 40) and drawn[:40] != run(1, 40)


def test_dylora_frozen_mode_holds_the_other_components_under_adamw():
    model = dylora_toy(frozen=True)
    perturb(model)
    model.train()
    opt = torch.optim.AdamW(dt.parameter_groups(model, lr=1e-2), weight_decay=0.1)
    x, y = batch()
    d = deltas(model)["a"]
    changed_any = set()
    for step in range(1, 13):
        before = d.lora_A.detach().clone(), d.lora_B.detach().clone()
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        b = (d.lora_B.grad.abs().sum(0) > 0).nonzero().flatten().tolist()
        opt.step()
        dt.step_hook(model, step)
        rows = (d.lora_A != before[0]).any(1).nonzero().flatten().tolist()
        cols = (d.lora_B != before[1]).any(0).nonzero().flatten().tolist()
        assert rows == b and cols == b, (step, b, rows, cols)      # momentum and decay moved nothing else
        changed_any.update(b)
    assert len(changed_any) > 1


def test_dylora_training_without_the_step_hook_is_refused():
    model = dylora_toy()
    model.train()
    opt = torch.optim.AdamW(dt.parameter_groups(model, lr=1e-2))
    x, y = batch()
    F.mse_loss(model(x), y).backward()
    opt.step()
    with pytest.raises(dt.DeltatuneError, match="step_hook"):
        model(x)


def test_dylora_eval_is_peft_lora_at_the_full_and_at_the_truncated_rank():
    peft = pytest.importorskip("peft")
    model = dylora_toy(r=4, alpha=8.0)
    perturb(model)
    model.eval()
    x, _ = batch(5)
    for r in (4, 2):
        truncate_rank(model, r)
        theirs = peft.get_peft_model(Toy(), peft.LoraConfig(r=r, lora_alpha=8, target_modules=["a", "b"],
                                                            init_lora_weights=False)).eval()
        with torch.no_grad():
            for name, d in deltas(model).items():
                layer = theirs.base_model.model.get_submodule(name)
                layer.lora_A["default"].weight.copy_(d.lora_A)
                layer.lora_B["default"].weight.copy_(d.lora_B)
            torch.testing.assert_close(model(x), theirs(x), rtol=1e-5, atol=1e-6)


def lm_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (4, 24), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def with_first_components(model, A_B: dict, alpha: float, r: int):
    """The base model with each target's first ``r`` components added by a forward hook (independent of
    the engine): y = W x + b + (alpha / r) x A[:r]ᵀ B[:, :r]ᵀ."""
    for name, (A, B) in A_B.items():
        model.get_submodule(name).register_forward_hook(
            lambda m, args, y, A=A, B=B: y + (alpha / r) * args[0] @ A[:r].T @ B[:, :r].T)
    return model


def test_dylora_every_truncated_rank_of_a_trained_adapter_beats_the_base_and_the_file_is_rank_r(tmp_path):
    base = tiny_llama().eval()
    data = lm_batch()
    with torch.no_grad():
        untrained = base(**data).loss.item()
    model = copy.deepcopy(base)          # copies of the plain model only: the adapter travels by file
    dt.attach(model, dt.config("dylora", r=8))
    model.train()
    opt = torch.optim.AdamW(dt.parameter_groups(model, lr=dt.get_method("dylora").default_lr))
    for step in range(1, 31):
        opt.zero_grad()
        model(**data).loss.backward()
        opt.step()
        dt.step_hook(model, step)
    trained = {n: (d.lora_A.detach().clone(), d.lora_B.detach().clone()) for n, d in deltas(model).items()}
    dt.save_adapter(model, tmp_path / "r8")
    for r in (1, 2, 4, 8):
        cut = copy.deepcopy(base)
        dt.load_adapter(cut, tmp_path / "r8")
        assert truncate_rank(cut, r) == ["default"] and adapters(cut)["default"].r == r
        dt.save_adapter(cut, tmp_path / f"r{r}")
        with safe_open(tmp_path / f"r{r}" / "adapter.safetensors", framework="pt") as f:
            shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
        assert len(shapes) == 8 and all(s == (r, 64) for k, s in shapes.items() if k.endswith("lora_A"))
        assert all(s[1] == r and s[0] in (64, 32) for k, s in shapes.items() if k.endswith("lora_B"))
        assert json.loads((tmp_path / f"r{r}" / "adapter_config.json").read_text())["config"]["r"] == r
        loaded = copy.deepcopy(base)
        dt.load_adapter(loaded, tmp_path / f"r{r}")
        reference = with_first_components(copy.deepcopy(base), trained, 16.0, r)
        with torch.no_grad():
            logits = cut(**data).logits
            torch.testing.assert_close(logits, reference(**data).logits, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(loaded(**data).logits, logits, rtol=0, atol=1e-6)
            assert cut(**data).loss.item() < untrained - 1e-3, r


def test_truncate_rank_refuses_what_it_cannot_do():
    model = Toy()
    dt.attach(model, dt.config("lora", targets=["a"]), name="plain")
    with pytest.raises(dt.DeltatuneError, match=r"lora's components are not ordered; truncate_rank applies to "
                                                r"nested-rank methods \(dylora\)"):
        truncate_rank(model, 2)
    with pytest.raises(dt.DeltatuneError, match="lora's components are not ordered"):
        truncate_rank(model, 2, name="plain")
    dt.attach(model, dt.config("dylora", targets=["b"], r=4), name="nested")
    with pytest.raises(dt.DeltatuneError, match="larger than adapter 'nested'"):
        truncate_rank(model, 5)
    with pytest.raises(dt.DeltatuneError, match="r=0 is out of range"):
        truncate_rank(model, 0)
    with pytest.raises(dt.DeltatuneError, match="no adapter named 'missing'"):
        truncate_rank(model, 2, name="missing")
    dt.merge(model, "nested")
    with pytest.raises(dt.DeltatuneError, match="unmerge"):
        truncate_rank(model, 2)
    dt.unmerge(model)
    assert truncate_rank(model, 2) == ["nested"]                 # only the nested adapter
    assert deltas(model, "nested")["b"].lora_A.shape == (2, 12)
    assert deltas(model, "plain")["a"].lora_A.shape == (8, 16)
    with pytest.raises(dt.DeltatuneError, match="larger than adapter 'nested'.s rank 2"):
        truncate_rank(model, 3)


# ----------------------------------------------------------------------------- IncreLoRA

def increlora_toy(**kw):
    model = Toy()
    options = {"targets": ["a", "b", "c"], "init_r": 1, "target_rank": 3, "max_r": 4, "tinit": 2, "deltaT": 2,
               "restart_warmup": 1, **kw}
    dt.attach(model, dt.config("increlora", **options))
    return model


def increlora_update(d, alpha):
    """The paper's ΔW: (alpha / k) P diag(λ_eff) Q, λ_eff = λ where active, 1e-5 on the reserve, else 0."""
    m, res = d.increlora_mask, d.increlora_reserve
    lam = torch.where(m, d.increlora_Lambda, torch.where(res, torch.tensor(1e-5), torch.tensor(0.0)))
    return alpha / int(m.sum()) * (d.increlora_P * lam) @ d.increlora_Q


def test_increlora_forward_and_merge_are_the_masked_svd_form():
    model = increlora_toy(alpha=16.0)
    perturb(model)
    d = deltas(model)["a"]
    with torch.no_grad():
        d.increlora_mask.copy_(torch.tensor([True, True, False, False]))
        d.increlora_reserve.copy_(torch.tensor([False, False, True, False]))
    x, _ = batch(5)
    layer = dict(wrappers(model))["a"]
    with torch.no_grad():
        want = F.linear(x, layer.base.weight + increlora_update(d, 16.0), layer.base.bias)
        torch.testing.assert_close(layer(x), want)
        unmerged = model(x)
        dt.merge(model)
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)


def test_increlora_inactive_components_contribute_nothing_and_get_no_gradient():
    model = increlora_toy()
    x, y = batch()
    with torch.no_grad():
        before = model(x)
        for d in deltas(model).values():       # slots 2, 3 are neither active (0) nor the reserve (1)
            for p in (d.increlora_P[:, 2:], d.increlora_Q[2:], d.increlora_Lambda[1:]):
                p.add_(torch.randn(p.shape) * 10)
        assert (model(x) - before).abs().max() == 0
        for d in deltas(model).values():
            d.increlora_Lambda[0] = 0.5          # the active component away from its zero start
    model.train()
    F.mse_loss(model(x), y).backward()
    for d in deltas(model).values():
        assert d.increlora_P.grad[:, 2:].abs().max() == 0 and d.increlora_Q.grad[2:].abs().max() == 0
        assert d.increlora_Lambda.grad[1:].abs().max() == 0          # the reserve's λ is fixed
        assert d.increlora_P.grad[:, :2].abs().sum(0).min() > 0 and d.increlora_Q.grad[:2].abs().sum(1).min() > 0
        assert d.increlora_Lambda.grad[0] != 0


def reference_importance(model, x, y):
    """Per layer, I = Σ |ΔW ⊙ ∂L/∂ΔW| / sqrt(n), by a functional forward of the toy on W + ΔW."""
    layers, updates = dict(wrappers(model)), {}
    for n, d in deltas(model).items():
        updates[n] = increlora_update(d, 16.0).detach().requires_grad_(True)

    def lin(n, h):
        return F.linear(h, layers[n].base.weight + updates[n], layers[n].base.bias)

    F.mse_loss(lin("c", torch.tanh(lin("b", torch.tanh(lin("a", x))))), y).backward()
    return {n: float((u.detach() * u.grad).abs().sum() / math.sqrt(u.numel())) for n, u in updates.items()}


@pytest.mark.parametrize("incre_rank_num,target_rank", [(1, 3), (2, 3), (2, 2)])
def test_increlora_ranks_grow_where_the_papers_importance_says_up_to_the_budget(incre_rank_num, target_rank):
    model = increlora_toy(incre_rank_num=incre_rank_num, target_rank=target_rank)
    budget, beta, max_r = target_rank * 3, 0.85, 4
    model.train()
    opt = torch.optim.AdamW(dt.parameter_groups(model, lr=1e-2))
    x, y = batch()
    expected = {"a": 1, "b": 1, "c": 1}
    ema, unc = dict.fromkeys(expected, 0.0), dict.fromkeys(expected, 0.0)
    history = []
    for step in range(1, 15):
        importance = reference_importance(model, x, y)
        opt.zero_grad()
        (F.mse_loss(model(x), y) + dt.auxiliary_loss(model)).backward()
        opt.step()
        room = budget - sum(expected.values())
        if room > 0:
            for n, i in importance.items():
                ema[n] = beta * ema[n] + (1 - beta) * i
                unc[n] = beta * unc[n] + (1 - beta) * abs(i - ema[n])
            if step > 2 and (step - 2) % 2 == 0:
                open_layers = [n for n in expected if expected[n] < max_r]
                for n in sorted(open_layers, key=lambda n: -ema[n] * unc[n])[:2]:
                    add = min(incre_rank_num, room, max_r - expected[n])
                    expected[n] += add
                    room -= add
        dt.step_hook(model, step)
        for n, d in deltas(model).items():          # Ī and Ū as the paper's formulas give them
            assert math.isclose(float(d.importance), ema[n], rel_tol=1e-4, abs_tol=1e-12), (step, n)
            assert math.isclose(float(d.uncertainty), unc[n], rel_tol=1e-4, abs_tol=1e-12), (step, n)
        got = ranks(model)
        assert got == expected, (step, got, expected)
        assert sum(got.values()) <= budget and max(got.values()) <= max_r
        history.append(sum(got.values()))
    assert history[0] == 3 and history[-1] == budget and history == sorted(history)
    assert all(not d.increlora_reserve.any() for d in deltas(model).values())      # dropped at the budget


def test_increlora_restart_warmup_scales_a_joining_parameters_update():
    model = increlora_toy(tinit=1, deltaT=2, restart_warmup=4, top_h=1, orth_reg_weight=0.0)
    model.train()
    lr = 0.1
    opt = torch.optim.SGD(dt.parameter_groups(model, lr=lr))
    x, y = batch()
    joined = None
    for step in range(1, 9):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        snap = {n: {k: (getattr(d, k).detach().clone(), getattr(d, k).grad.clone())
                    for k in ("increlora_P", "increlora_Lambda", "increlora_Q")} for n, d in deltas(model).items()}
        opt.step()
        old = ranks(model)
        dt.step_hook(model, step)
        if joined is not None:
            n, slot, t = joined
            w = min(1.0, (step - t) / 4)
            d, (lam0, glam), (p0, gp) = deltas(model)[n], snap[n]["increlora_Lambda"], snap[n]["increlora_P"]
            torch.testing.assert_close(d.increlora_Lambda[slot], lam0[slot] - lr * w * glam[slot])
            torch.testing.assert_close(d.increlora_P[:, slot + 1], p0[:, slot + 1] - lr * w * gp[:, slot + 1])
            torch.testing.assert_close(d.increlora_P[:, 0], p0[:, 0] - lr * gp[:, 0])     # an old one: full rate
        grown = [n for n, k in ranks(model).items() if k > old[n]]
        if grown and joined is None:
            assert step == 3                                   # tinit 1, deltaT 2
            joined = (grown[0], old[grown[0]], step)           # its λ joins now, the next slot's P, Q too
    assert joined is not None


def test_increlora_save_and_load_keep_the_mask():
    model = increlora_toy()
    model.train()
    opt = torch.optim.AdamW(dt.parameter_groups(model, lr=1e-2))
    x, y = batch()
    for step in range(1, 6):             # allocations at steps 4 only: mid-schedule, reserves present
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        dt.step_hook(model, step)
    model.eval()
    grown = ranks(model)
    assert sum(grown.values()) == 5
    with tempfile.TemporaryDirectory() as tmp:
        dt.save_adapter(model, tmp)
        with safe_open(f"{tmp}/adapter.safetensors", framework="pt") as f:
            saved = {k: f.get_tensor(k) for k in f.keys()}
        fresh = Toy()
        dt.load_adapter(fresh, tmp)
    for n, d in deltas(model).items():
        assert int(saved[f"deltas.{n}.increlora_mask"].sum()) == grown[n]
        assert torch.equal(saved[f"deltas.{n}.increlora_reserve"], d.increlora_reserve)
        assert saved[f"deltas.{n}.increlora_Lambda"][~d.increlora_mask].abs().max() == 0
    assert ranks(fresh) == grown
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-7)
    dt.step_hook(fresh, 6)               # a frozen, loaded adapter keeps its ranks
    assert ranks(fresh) == grown


def test_increlora_orthogonality_term_is_the_mean_of_the_papers_regulariser():
    model = increlora_toy(orth_reg_weight=0.1)
    perturb(model)
    want = 0.0
    for d in deltas(model).values():
        keep = d.increlora_mask | d.increlora_reserve
        P, Q = d.increlora_P[:, keep], d.increlora_Q[keep]
        want += (P.T @ P - torch.eye(P.shape[1])).pow(2).sum() + (Q @ Q.T - torch.eye(Q.shape[0])).pow(2).sum()
    torch.testing.assert_close(dt.auxiliary_loss(model), 0.1 * want / 3)


def test_increlora_invalid_configs_and_layers_are_refused():
    for kw, field in (({"init_r": 3, "target_rank": 2}, "init_r=3"), ({"max_r": 1}, "max_r=1"),
                      ({"top_h": 0}, "top_h"), ({"beta1": 1.0}, "beta1"), ({"deltaT": 0}, "deltaT")):
        with pytest.raises(dt.DeltatuneError, match=field):
            dt.config("increlora", **kw)
    with pytest.raises(dt.DeltatuneError, match=r"max_r=16 .* does not fit c .*at most min\(out, fan_in\) = 6"):
        dt.attach(Toy(), dt.config("increlora", targets=["c"], target_rank=4))
    model = Toy()
    dt.attach(model, dt.config("increlora", targets=["a"]))       # no total_step, no deltaT
    with pytest.raises(dt.DeltatuneError, match="total_step"):
        dt.step_hook(model, 1)
    model = increlora_toy()
    dt.step_hook(model, 1)
    with pytest.raises(dt.DeltatuneError, match="got step 1 after step 1"):
        dt.step_hook(model, 1)
