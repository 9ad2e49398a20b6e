"""Engine behaviour: matching, config validation, several adapters, merge/unmerge/unload."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.core.engine import wrappers
from deltatune.core.wrapper import DeltaLayer, ModuleCopies
from models import Classifier, bbc_texts, minilm_classifier, minilm_tokenizer, small_cnn, tiny_llama


def tiny_bert(hidden=32, layers=2):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=2 * hidden, max_position_embeddings=64)
    torch.manual_seed(0)
    return Classifier(transformers.BertModel(cfg), 3).eval()


def batch(n=4, t=12, vocab=200):
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(1, vocab, (n, t), generator=g), "attention_mask": torch.ones(n, t, dtype=torch.long)}


def wrapped_names(model):
    return sorted(n for n, _ in wrappers(model))


# ------------------------------------------------------------------ matching

def test_target_by_suffix_exact_regex_type_and_all_linear():
    m = tiny_bert()
    dt.attach(m, dt.config("lora", targets=["query"]))
    assert wrapped_names(m) == [f"encoder.encoder.layer.{i}.attention.self.query" for i in range(2)]
    m = tiny_bert()
    dt.attach(m, dt.config("lora", targets=["encoder.encoder.layer.1.attention.self.value"]))
    assert wrapped_names(m) == ["encoder.encoder.layer.1.attention.self.value"]
    m = tiny_bert()
    dt.attach(m, dt.config("lora", targets=[r"re:.*layer\.0\..*(key|value)"]))
    assert wrapped_names(m) == ["encoder.encoder.layer.0.attention.self.key", "encoder.encoder.layer.0.attention.self.value"]
    m = small_cnn()
    dt.attach(m, dt.config("lora", targets=[nn.Conv2d]))
    assert wrapped_names(m) == ["conv1", "conv2"]
    m = tiny_bert()
    dt.attach(m, dt.config("lora", targets=["all-linear"], exclude=["pooler"]))
    names = wrapped_names(m)
    assert len(names) == 2 * 6 and "classifier" not in names and not any("pooler" in n for n in names)


def test_all_linear_skips_the_output_head():
    m = tiny_llama()
    dt.attach(m, dt.config("lora", targets="all-linear"))
    names = wrapped_names(m)
    assert "lm_head" not in names and len(names) == 2 * 7


def test_layers_and_rank_pattern():
    m = tiny_bert()
    cfg = dt.config("lora", r=4, targets=["query", "value"], layers=[1], rank_pattern={"value": 2},
                    alpha_pattern={"value": 8})
    dt.attach(m, cfg)
    layers = dict(wrappers(m))
    assert sorted(layers) == ["encoder.encoder.layer.1.attention.self.query", "encoder.encoder.layer.1.attention.self.value"]
    v = layers["encoder.encoder.layer.1.attention.self.value"].deltas["default"]
    q = layers["encoder.encoder.layer.1.attention.self.query"].deltas["default"]
    assert v.lora_A.shape[0] == 2 and q.lora_A.shape[0] == 4
    assert v.scale == 8 / 2 and q.scale == cfg.alpha / 4


def test_no_match_lists_closest_names_and_changes_nothing():
    m = tiny_bert()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(dt.DeltatuneError, match="query") as e:
        dt.attach(m, dt.config("lora", targets=["querry"]))
    assert "matched no module" in str(e.value)
    assert not wrappers(m) and all(p.requires_grad for p in m.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_wrong_layer_type_is_a_clear_error():
    m = tiny_llama()
    with pytest.raises(dt.DeltatuneError, match="dora cannot wrap model.embed_tokens"):
        dt.attach(m, dt.config("dora", targets=["embed_tokens"]))
    with pytest.raises(dt.DeltatuneError, match="input embedding"):
        dt.attach(small_cnn(), dt.config("prompt_tuning"))


# ------------------------------------------------------------------ config validation

@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 8}, "unknown field.*'rank'.*did you mean 'r'"),
    ({"r": 0}, "r=0 is out of range"),
    ({"r": 2.5}, "r must be an int"),
    ({"alpha": -1}, "alpha=-1 is out of range"),
    ({"dropout": 1.0}, "dropout=1.0 is out of range"),
    ({"dropout": -0.1}, "dropout=-0.1 is out of range"),
    ({"bias": "some"}, "bias='some' is not valid"),
    ({"init": "svd"}, "init='svd' is not valid"),
    ({"targets": []}, "targets is an empty list"),
    ({"targets": ["re:("]}, "not a valid regular expression"),
    ({"layers": [-1]}, "layers must be a list of non-negative ints"),
    ({"rank_pattern": {"query": 0}}, "rank_pattern"),
])
def test_configs_validate_at_construction(kwargs, match):
    with pytest.raises(dt.DeltatuneError, match=match):
        dt.config("lora", **kwargs)
    with pytest.raises(dt.DeltatuneError, match=match):
        dt.LoraConfig(**kwargs)


def test_other_configs_validate():
    with pytest.raises(dt.DeltatuneError, match="num_virtual_tokens=0"):
        dt.config("prompt_tuning", num_virtual_tokens=0)
    with pytest.raises(dt.DeltatuneError, match="init_token_ids"):
        dt.config("prompt_tuning", init="text")
    with pytest.raises(dt.DeltatuneError, match="unknown method 'lorra'.*'lora'"):
        dt.config("lorra")
    with pytest.raises(dt.DeltatuneError, match="unknown field"):
        dt.IA3Config(r=4)
    assert dt.config("lora", r=4).r == 4 and dt.available_methods() == sorted(dt.available_methods())


# ------------------------------------------------------------------ several adapters

def _train(model, steps=3, lr=1e-2, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for _, p in dt.trainable_parameters(model)], lr=lr)
    b = batch()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(**b), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()


def test_named_adapters_activate_disable_delete():
    m = tiny_bert()
    base = copy.deepcopy(m)
    b = batch()
    with torch.no_grad():
        ref = m(**b)
    dt.attach(m, dt.config("lora", targets=["query", "value"], trainable_modules=["classifier"]), name="a")
    _train(m, seed=1)
    dt.attach(m, dt.config("lora", targets=["query", "key"], trainable_modules=["classifier"]), name="b")
    trainable = {n for n, _ in dt.trainable_parameters(m)}
    assert trainable and all(".b." in n or n.endswith(".b") for n in trainable), "only the new adapter trains"
    _train(m, seed=2)
    m.eval()
    with torch.no_grad():
        out_b = m(**b)
        dt.set_active(m, ["a"])
        out_a = m(**b)
        with dt.disabled(m):
            out_none = m(**b)
        assert dt.active_adapters(m) == ["a"]
    assert not torch.allclose(out_a, out_b, atol=1e-4)
    torch.testing.assert_close(out_none, ref, rtol=0, atol=1e-6)
    assert isinstance(m.classifier, ModuleCopies) and set(m.classifier.copies) == {"a", "b"}
    dt.delete_adapter(m, "a")
    with pytest.raises(dt.DeltatuneError, match="no adapter named 'a'"):
        dt.set_active(m, ["a"])
    dt.set_active(m, ["b"])
    with torch.no_grad():
        torch.testing.assert_close(m(**b), out_b, rtol=0, atol=1e-6)
    dt.delete_adapter(m, "b")
    assert not any(isinstance(x, (DeltaLayer, ModuleCopies)) for x in m.modules())
    assert m.state_dict().keys() == base.state_dict().keys()


def test_attach_twice_with_same_name_is_refused():
    m = tiny_bert()
    dt.attach(m, dt.config("lora", targets=["query"]))
    with pytest.raises(dt.DeltatuneError, match="already attached"):
        dt.attach(m, dt.config("ia3", targets=["key"]))


# ------------------------------------------------------------------ merge / unmerge / unload

def test_new_deltas_follow_the_model_mode():
    m = tiny_bert()                               # in eval mode
    dt.attach(m, dt.config("lora", targets=["query"], dropout=0.5))
    x = batch()
    assert torch.equal(m(**x), m(**x)), "dropout stayed on after attach to a model in eval mode"
    assert not any(mod.training for mod in m.modules())
    m.train()
    dt.attach(m, dt.config("lora", targets=["value"], dropout=0.5), name="second")
    assert all(mod.training for mod in m.modules())


def test_merge_after_20_steps_matches_and_unmerge_is_exact():
    """Acceptance: after 20 training steps merged and unmerged outputs agree to 1e-5 (float32),
    and unmerge restores every base weight exactly."""
    model = minilm_classifier(5)
    texts, labels = bbc_texts(2)
    enc = minilm_tokenizer()(texts, truncation=True, max_length=48, padding=True, return_tensors="pt")
    b = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    y = torch.tensor(labels)
    dt.attach(model, dt.config("lora", r=8, alpha=16, dropout=0.1, targets=["query", "value"],
                               trainable_modules=["classifier"]))
    opt = torch.optim.AdamW([p for _, p in dt.trainable_parameters(model)], lr=2e-3)
    model.train()
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(**b), y).backward()
        opt.step()
    model.eval()
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        unmerged = model(**b)
        dt.merge(model)
        merged = model(**b)
    assert (merged - unmerged).abs().max().item() <= 1e-5
    assert any(not torch.equal(p, snapshot[n]) for n, p in model.named_parameters())
    dt.unmerge(model)
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())


def test_unload_merge_and_restore():
    m = tiny_bert()
    original = copy.deepcopy(m)
    dt.attach(m, dt.config("lora", targets=["query", "value"], trainable_modules=["classifier"]))
    _train(m)
    m.eval()
    b = batch()
    with torch.no_grad():
        adapted = m(**b)
    plain = dt.unload(copy.deepcopy(m), merge=True)
    assert not any(isinstance(x, (DeltaLayer, ModuleCopies)) for x in plain.modules())
    assert plain.state_dict().keys() == original.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(plain(**b), adapted, rtol=0, atol=1e-5)
    restored = dt.unload(m, merge=False)
    for (n, p), (_, q) in zip(restored.state_dict().items(), original.state_dict().items()):
        assert torch.equal(p, q), n


def test_disabled_refuses_while_merged():
    m = tiny_bert()
    dt.attach(m, dt.config("lora", targets=["query"]))
    dt.merge(m)
    with pytest.raises(dt.DeltatuneError, match="unmerge"):
        with dt.disabled(m):
            pass


def test_summary_lists_wrapped_modules(capsys):
    m = tiny_bert()
    dt.attach(m, dt.config("ia3", targets=["key"]))
    text = dt.summary(m)
    assert "encoder.encoder.layer.0.attention.self.key" in text and "ia3" in text
    assert "trainable parameters: 64 of" in text
    assert text in capsys.readouterr().out


# ------------------------------------------------------------------ method-specific definitions

def test_dora_fast_path_equals_plain_definition():
    """DoRA's forward (norm from low-rank terms, frozen matmul once) equals the paper's
    definition computed by materialising W' = m (W + s B A) / ||W + s B A||_c."""
    torch.manual_seed(0)
    lin = nn.Linear(24, 16)
    model = nn.Sequential(lin)
    dt.attach(model, dt.config("dora", r=4, targets=["0"]))
    d = model[0].deltas["default"]
    with torch.no_grad():
        d.lora_B.normal_()
        d.magnitude.mul_(torch.rand(16) + 0.5)
    x = torch.randn(5, 24)
    W = lin.weight + d.scale * d.lora_B @ d.lora_A
    W = d.magnitude[:, None] * W / W.norm(dim=1, keepdim=True)
    torch.testing.assert_close(model(x), F.linear(x, W, lin.bias), rtol=1e-5, atol=1e-5)


def test_ia3_feedforward_scales_the_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    dt.attach(model, dt.config("ia3", targets=["0", "1"], feedforward=["1"]))
    l0, l1 = model[0].deltas["default"].ia3_l, model[1].deltas["default"].ia3_l
    assert l0.shape == (4,) and l1.shape == (4,)
    with torch.no_grad():
        l0.uniform_(0.5, 1.5)
        l1.uniform_(0.5, 1.5)
    x = torch.randn(2, 6)
    h = l0 * model[0].base(x)
    torch.testing.assert_close(model(x), model[1].base(l1 * h))


def test_pissa_factors_are_the_principal_components():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    dt.attach(model, dt.config("lora", r=3, init="pissa", targets=["0"]))
    d = model[0].deltas["default"]
    U, S, Vh = torch.linalg.svd(model[0].base.weight.double(), full_matrices=False)
    principal = (U[:, :3] * S[:3]) @ Vh[:3]
    torch.testing.assert_close(d.scale * (d.lora_B.double() @ d.lora_A.double()), principal, rtol=1e-5, atol=1e-5)
    dt.delete_adapter(model, "default")
    model2 = nn.Sequential(nn.Linear(12, 10))
    dt.attach(model2, dt.config("lora", r=3, init="milora", targets=["0"]))
    d = model2[0].deltas["default"]
    U, S, Vh = torch.linalg.svd(model2[0].base.weight.double(), full_matrices=False)
    minor = (U[:, -3:] * S[-3:]) @ Vh[-3:]
    torch.testing.assert_close(d.scale * (d.lora_B.double() @ d.lora_A.double()), minor, rtol=1e-5, atol=1e-5)


def test_prompt_tuning_extends_mask_and_keeps_output_aligned():
    m = tiny_llama()
    ids = torch.randint(0, 512, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    dt.attach(m, dt.config("prompt_tuning", num_virtual_tokens=5))
    seen = {}
    m.model.register_forward_pre_hook(lambda mod, a, kw: seen.update(kw), with_kwargs=True)
    out = m(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.logits.shape == (2, 10, 512)
    assert seen["inputs_embeds"].shape[1] == 15 and seen["attention_mask"].shape == (2, 15)
    assert seen["attention_mask"][:, :5].eq(1).all() and torch.equal(seen["attention_mask"][:, 5:], mask)
    assert torch.isfinite(out.loss)
    with dt.disabled(m):
        assert m(input_ids=ids).logits.shape == (2, 10, 512)
    dt.delete_adapter(m, "default")
    assert not m._forward_pre_hooks and not m._forward_hooks, "deleting the last prompt adapter removes its hooks"


def test_lora_dropout_mask_has_rate_p_and_independent_elements():
    from deltatune.kernels import dropout_mask
    torch.manual_seed(0)
    x = torch.zeros(512, 384)
    for p in (0.05, 0.1, 0.5):
        m = dropout_mask(x, p).float()
        assert m.shape == x.shape
        assert abs(m.mean().item() - p) < 0.005, (p, m.mean().item())
        # neighbours (which share a 64-bit random word) are uncorrelated
        a, b = m.flatten()[0::2], m.flatten()[1::2]
        corr = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
        assert abs(corr.item()) < 0.01
    assert not torch.equal(dropout_mask(x, 0.1), dropout_mask(x, 0.1))
    odd = dropout_mask(torch.zeros(3, 7), 0.3)        # sizes not a multiple of 4
    assert odd.shape == (3, 7) and odd.dtype == torch.bool


class _Siblings(nn.Module):
    """q/k/v siblings; ``k`` reads another tensor than q and v when ``split`` is set."""

    def __init__(self, split: bool):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(8, 8)
        self.split = split

    def forward(self, x):
        k_in = x * 2 if self.split else x
        return self.query(x).sum() + self.key(k_in).sum() * 0.5 + self.value(x).pow(2).sum()


@pytest.mark.parametrize("split", [False, True], ids=["shared-input", "k-reads-another-tensor"])
def test_shared_input_group_equals_separate_layers(split, monkeypatch):
    from deltatune import kernels
    from deltatune.core import wrapper
    computed = []
    original = kernels.SharedInput.compute
    monkeypatch.setattr(kernels.SharedInput, "compute",
                        lambda self, layer, x: computed.append(layer) or original(self, layer, x))
    results = []
    for fast in (True, False):
        monkeypatch.setattr(wrapper, "FAST_PATHS", fast)
        torch.manual_seed(0)
        m = _Siblings(split)
        dt.attach(m, dt.config("lora", r=2, targets=["query", "key", "value"], bias="lora_only"))
        assert m.query.shared is m.key.shared is m.value.shared is not None
        with torch.no_grad():
            for _, p in dt.trainable_parameters(m):
                p.add_(torch.randn(p.shape) * 0.1)
        x = torch.randn(3, 5, 8, requires_grad=True)
        out = m(x)
        out.backward()
        results.append((out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in dt.trainable_parameters(m)}, m))
    (o1, gx1, g1, m), (o2, gx2, g2, _) = results
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(gx1, gx2)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], msg=n)
    # one grouped computation; when k reads another tensor it computes alone and leaves the group
    assert len(computed) == 1
    assert m.key.shared.left == ({id(m.key)} if split else set())


def test_shared_input_group_is_dropped_when_siblings_go():
    m = _Siblings(False)
    dt.attach(m, dt.config("lora", targets=["query", "value"]))
    assert m.query.shared is m.value.shared is not None
    dt.attach(m, dt.config("lora", targets=["query"]), name="other")
    dt.delete_adapter(m, "default")
    assert m.query.shared is None                       # value is unwrapped: no group left


def test_shared_input_group_under_inference_mode():
    m = _Siblings(False)
    dt.attach(m, dt.config("lora", r=4, targets=["query", "key", "value"]))
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        expected = m(x)
    with torch.inference_mode():
        torch.testing.assert_close(m(x), expected)


def test_shared_input_group_keeps_no_model_or_graph_alive():
    """The group remembers the last input only weakly and its members without a reference cycle:
    a model deleted after a forward is freed at once (no wait for the garbage collector), and a
    forward whose result is dropped does not keep its graph (and the saved activations) alive."""
    import gc
    import weakref
    gc.disable()
    try:
        m = _Siblings(False)
        dt.attach(m, dt.config("lora", r=2, targets=["query", "key", "value"]))
        assert m.query.shared is not None
        x = torch.randn(3, 5, 8, requires_grad=True)
        h = x * 1.0                          # a non-leaf input, as inside a model
        out = m(h)
        graph_input = weakref.ref(h)
        del out, h
        assert graph_input() is None, "the group keeps the last input (and its graph) alive"
        model_ref = weakref.ref(m)
        del m
        assert model_ref() is None, "a model with a q/k/v group is only freed by the garbage collector"
    finally:
        gc.enable()


def test_a_deep_copy_of_an_adapted_model_runs_like_the_original():
    """q and v read one input and share a fused pass; a deep copy must not reach into the
    original's layers for it."""
    model = tiny_llama().eval()
    dt.attach(model, dt.config("lora", r=4, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, p in dt.trainable_parameters(model):
            p.add_(0.1)
        ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(0))
        want = model(input_ids=ids).logits
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(input_ids=ids).logits, want)
