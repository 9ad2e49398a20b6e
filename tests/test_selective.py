"""The parameter-subset hook (BitFit, LN tuning): counts from the model's own tensors, outputs
against the same model with its parameters edited by hand, stacking with weight deltas, and an
unload that gives the base back exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.engine import wrappers
from models import tiny_gpt2, tiny_llama


def perturb(model, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".deltas." in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


def test_bitfit_trains_exactly_the_biases_and_equals_editing_them():
    model = tiny_gpt2().eval()
    reference = copy.deepcopy(model)
    expected = sum(m.bias.numel() for m in reference.modules()
                   if isinstance(getattr(m, "bias", None), nn.Parameter))
    dt.attach(model, dt.config("bitfit"))
    assert dt.count_parameters(model)[0] == expected
    assert all(n.endswith("diffs.bias") for n, _ in dt.trainable_parameters(model))
    perturb(model)
    with torch.no_grad():           # the same edit, by hand, on the plain model
        for name, w in wrappers(model):
            reference.get_submodule(name).bias.add_(w.deltas["default"].diffs["bias"])
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_ln_tuning_equals_layer_norm_with_shifted_parameters():
    model = tiny_llama()
    dt.attach(model, dt.config("ln_tuning"))
    norms = [m for m in tiny_llama().modules() if "RMSNorm" in type(m).__name__]
    assert dt.count_parameters(model)[0] == sum(m.weight.numel() for m in norms)

    ln = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6))
    plain = copy.deepcopy(ln)
    dt.attach(ln, dt.config("ln_tuning"))
    perturb(ln)
    d = ln[1].deltas["default"].diffs
    x = torch.randn(4, 6)
    with torch.no_grad():
        want = nn.functional.layer_norm(plain[0](x), (6,), plain[1].weight + d["weight"], plain[1].bias + d["bias"])
        torch.testing.assert_close(ln(x), want)


def test_batchnorm_is_not_a_norm_to_tune():
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(dt.DeltatuneError, match="BatchNorm is left out"):
        dt.attach(cnn, dt.config("ln_tuning"))


def test_bitfit_stacked_with_lora_merges_exactly_in_both_orders():
    for order in (("bitfit", "lora"), ("lora", "bitfit")):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        for n in order:
            cfg = dt.config("bitfit") if n == "bitfit" else dt.config("lora", r=2, targets=["0", "2"])
            dt.attach(model, cfg, name=n)
        perturb(model)
        dt.set_active(model, list(order))
        x = torch.randn(5, 8)
        with torch.no_grad():
            before = model(x)
            dt.merge(model)
            assert (model(x) - before).abs().max() < 1e-5, order


def test_unload_without_merge_gives_the_base_back_exactly():
    model = tiny_gpt2()
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    dt.attach(model, dt.config("bitfit"))
    perturb(model)
    plain = dt.unload(model, merge=False)
    assert plain.state_dict().keys() == pristine.keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in pristine.items())
