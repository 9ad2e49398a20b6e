"""The parallel adapter against its definition, h = F(x) + s * up(f(down(x))), through the block hook:
a reference model is the same frozen model with the sub-layer's forward patched by hand to add
the adapter (with the same adapter weights), written from the paper, not through the engine."""

from __future__ import annotations

import copy
import tempfile
import types

import pytest
import torch

import deltatune as dt
from deltatune.core.engine import wrappers
from models import tiny_bert_classifier, tiny_llama


def _perturbed(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in dt.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _adapter(delta, s):
    return lambda x: s * delta.up(torch.relu(delta.down(x)))


def test_llama_feedforward_and_attention_match_a_hand_patched_reference():
    model = tiny_llama().eval()
    reference = copy.deepcopy(model)
    dt.attach(model, dt.config("parallel_adapter", sublayers=["attention", "feedforward"], scaling=2.0))
    _perturbed(model)
    layers = dict(wrappers(model))
    assert sorted(layers) == [f"model.layers.{i}.{m}" for i in range(2) for m in ("mlp", "self_attn")]
    for i, layer in enumerate(reference.model.layers):
        mlp_delta = layers[f"model.layers.{i}.mlp"].deltas["default"]
        attn_delta = layers[f"model.layers.{i}.self_attn"].deltas["default"]

        def mlp_forward(self, x, orig=layer.mlp.forward, pa=_adapter(mlp_delta, 2.0)):
            return orig(x) + pa(x)

        def attn_forward(self, *args, orig=layer.self_attn.forward, pa=_adapter(attn_delta, 2.0), **kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            out, weights = orig(*args, **kwargs)       # the attention block returns a tuple
            return out + pa(x), weights

        layer.mlp.forward = types.MethodType(mlp_forward, layer.mlp)
        layer.self_attn.forward = types.MethodType(attn_forward, layer.self_attn)
    ids = torch.randint(0, 512, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
        plain = dt.disabled(model)
        with plain:
            base = model(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    assert (got - base).abs().max() > 1e-3          # the adapter is not a no-op


def test_bert_post_norm_adds_beside_the_feedforward_inside_the_layernorm():
    """BERT's feed-forward ends in LayerNorm(dense(h) + x): the adapter goes inside, on x."""
    model = tiny_bert_classifier().eval()
    reference = copy.deepcopy(model)
    dt.attach(model, dt.config("parallel_adapter", trainable_modules=["classifier"], exclude=["pooler"]))
    _perturbed(model)
    layers = dict(wrappers(model))
    assert sorted(layers) == [f"encoder.encoder.layer.{i}.output" for i in range(2)]
    for i, layer in enumerate(reference.encoder.encoder.layer):
        delta = layers[f"encoder.encoder.layer.{i}.output"].deltas["default"]
        out = layer.output

        def forward(self, hidden_states, input_tensor, pa=_adapter(delta, 4.0)):
            return self.LayerNorm(self.dense(hidden_states) + input_tensor + pa(input_tensor))

        out.forward = types.MethodType(forward, out)
    reference.classifier.load_state_dict(model.classifier.copies["default"].state_dict())
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(1, 512, (4, 12), generator=g), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch), reference(**batch))


def test_starts_as_identity_trains_saves_and_refuses_to_merge():
    model = tiny_llama().eval()
    pristine = copy.deepcopy(model)
    dt.attach(model, dt.config("parallel_adapter"))
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, pristine(input_ids=ids).logits)
    model.train()
    opt = torch.optim.AdamW([p for _, p in dt.trainable_parameters(model)], lr=1e-2)
    losses = []
    for step in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        # W_up starts at zero, so W_down's first gradient is zero too; from the second step on, all reach
        assert all(p.grad is not None and (step == 0 or p.grad.abs().sum() > 0) for _, p in dt.trainable_parameters(model))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with pytest.raises(dt.DeltatuneError, match="cannot be merged"):
        dt.merge(model)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        dt.save_adapter(model, tmp)
        fresh = copy.deepcopy(pristine)
        dt.load_adapter(fresh, tmp)
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_mixed_batch_splits_every_block_argument_by_rows():
    """Per-sample adapters on a block: rotary tables and masks are split with the hidden states."""
    model = tiny_llama().eval()
    dt.attach(model, dt.config("parallel_adapter", sublayers=["attention", "feedforward"]), name="a")
    dt.attach(model, dt.config("parallel_adapter", sublayers=["attention", "feedforward"]), name="b")
    _perturbed(model)
    ids = torch.randint(0, 512, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        alone = {}
        for n in ("a", "b"):
            dt.set_active(model, [n])
            alone[n] = model(input_ids=ids).logits
        dt.set_active(model, [])
        alone[None] = model(input_ids=ids).logits
        with dt.per_sample_adapters(model, ["b", None, "a"]):
            mixed = model(input_ids=ids).logits
    for i, n in enumerate(["b", None, "a"]):
        torch.testing.assert_close(mixed[i], alone[n][i])


def test_errors_name_the_problem():
    with pytest.raises(dt.DeltatuneError, match="sublayers"):
        dt.config("parallel_adapter", sublayers=["ffn"])
    model = tiny_llama()
    with pytest.raises(dt.DeltatuneError, match="cannot wrap"):      # a leaf Linear is not a sub-layer block
        dt.attach(model, dt.config("parallel_adapter", targets=["q_proj"]))
    with pytest.raises(dt.DeltatuneError, match="no sub-layer map"):
        dt.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)), dt.config("parallel_adapter"))


def test_mixed_batch_on_a_post_norm_block_runs_each_adapter_on_its_rows():
    model = tiny_bert_classifier().eval()
    for n in ("a", "b"):
        dt.attach(model, dt.config("parallel_adapter", exclude=["pooler"]), name=n)
    _perturbed(model)
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(1, 512, (3, 12), generator=g), "attention_mask": torch.ones(3, 12, dtype=torch.long)}
    batch["attention_mask"][1, 7:] = 0      # a padded sample: the mask is split with the rows
    with torch.no_grad():
        alone = {}
        for n in ("a", "b", None):
            dt.set_active(model, [n] if n else [])
            alone[n] = model(**batch)
        with dt.per_sample_adapters(model, ["a", "b", None]):
            mixed = model(**batch)
    for i, n in enumerate(["a", "b", None]):
        torch.testing.assert_close(mixed[i], alone[n][i])
