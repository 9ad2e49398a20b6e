"""Mixed batches: each sample runs its own adapter, equal to running it alone."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from models import tiny_llama
from test_engine import batch, tiny_bert


def _randomise(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in dt.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _alone(model, b, names):
    rows = []
    for i, n in enumerate(names):
        one = {k: v[i:i + 1] for k, v in b.items()}
        if n is None:
            with dt.disabled(model):
                rows.append(model(**one))
        else:
            dt.set_active(model, [n])
            rows.append(model(**one))
    return torch.cat([r if isinstance(r, torch.Tensor) else r.logits for r in rows])


@pytest.mark.parametrize("methods", [["lora", "lora", "lora"], ["lora", "dora", "ia3"]])
def test_mixed_batch_equals_each_sample_alone(methods):
    model = tiny_bert()
    for i, m in enumerate(methods):
        kw = {"targets": ["query", "value", "key"], "trainable_modules": ["classifier"]}
        if m != "ia3":
            kw["r"] = 2 + 2 * i            # different ranks are padded in the batched path
        dt.attach(model, dt.config(m, **kw), name=f"a{i}")
        _randomise(model)
    model.eval()
    names = ["a0", None, "a2", "a1", "a0", None, "a1", "a2"]
    b = batch(n=len(names))
    with torch.no_grad():
        with dt.per_sample_adapters(model, names):
            mixed = model(**b)
        expected = _alone(model, b, names)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)


def test_mixed_batch_with_and_without_lora_bias_and_its_gradients():
    """Adapters with a trained bias next to adapters without one: outputs and the gradients of
    every factor equal running each sample alone (eval mode: the base model's own dropout off)."""
    model = tiny_bert()
    for i, bias in enumerate(["lora_only", "none", "lora_only"]):
        dt.attach(model, dt.config("lora", r=2 + i, targets=["query", "value"], bias=bias), name=f"a{i}")
        _randomise(model)
    model.eval()
    names = ["a1", "a0", None, "a2", "a0"]
    b = batch(n=len(names))
    with dt.per_sample_adapters(model, names):
        mixed = model(**b)
    mixed = mixed if isinstance(mixed, torch.Tensor) else mixed.logits
    mixed.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    expected = _alone(model, b, names)
    expected.square().sum().backward()
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(grads)
    assert any("lora_bias" in n for n in grads)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_mixed_batch_on_a_causal_lm():
    model = tiny_llama().eval()
    for i in range(4):
        dt.attach(model, dt.config("lora", r=4, targets=["q_proj", "v_proj", "down_proj"]), name=f"t{i}")
        _randomise(model)
    names = ["t3", "t0", None, "t2", "t1", "t1"]
    ids = torch.randint(0, 512, (6, 7))
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        with dt.per_sample_adapters(model, names):
            mixed = model(**b).logits
        expected = _alone(model, b, names)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)


def test_mixed_batch_errors():
    model = tiny_bert()
    dt.attach(model, dt.config("lora", targets=["query"]), name="a")
    with pytest.raises(dt.DeltatuneError, match="no adapter named 'zz'"):
        with dt.per_sample_adapters(model, ["a", "zz"]):
            pass
    with pytest.raises(ValueError, match="2 names but the batch has 4"):
        with dt.per_sample_adapters(model, ["a", None]):
            model(**batch())
    dt.merge(model)
    with pytest.raises(dt.DeltatuneError, match="unmerge"):
        with dt.per_sample_adapters(model, ["a"] * 4):
            pass
