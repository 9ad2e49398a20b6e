"""The conformance suite: every registered method, with each of its variants, on a real
transformer (the packaged MiniLM), a Llama-layout causal LM built from a config, and a small
CNN. A method is covered here automatically by being registered (see DESIGN.md, Conformance).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import deltatune as dt
from deltatune.core.engine import adapter_parameters, wrappers
from deltatune.core.wrapper import BiasDelta
from models import bbc_texts, minilm_classifier, minilm_tokenizer, small_cnn, tiny_gpt2, tiny_llama

STEPS = 6


def _minilm_batch():
    texts, labels = bbc_texts(2)
    enc = minilm_tokenizer()(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, torch.tensor(labels)


def _llama_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (4, 24), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids


def _cnn_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 12, 12, generator=g) * 0.1
    y = torch.arange(16) % 4
    for i, c in enumerate(y.tolist()):
        r, q = divmod(c, 2)
        x[i, :, r * 6:(r + 1) * 6, q * 6:(q + 1) * 6] += 1.0
    return {"x": x}, y


def _out(model, key, batch):
    if key in ("llama", "gpt2"):
        return model(**batch).logits
    if key == "cnn":
        return model(batch["x"])
    return model(**batch)


def _loss(model, key, batch, target):
    if key in ("llama", "gpt2"):
        return model(**batch, labels=target).loss
    return F.cross_entropy(_out(model, key, batch), target)


MODELS = {
    # key: builder, batch, patterns by layer kind (None: the method's own defaults), extra config
    "minilm": (minilm_classifier, _minilm_batch, None, {"trainable_modules": ["classifier"], "exclude": ["pooler"]}),
    "llama": (tiny_llama, _llama_batch, {"linear": ["q_proj", "v_proj", "down_proj"], "embedding": ["embed_tokens"]},
              {"feedforward": ["down_proj"]}),
    "gpt2": (tiny_gpt2, _llama_batch, {"conv1d_gpt2": ["c_attn", "mlp.c_fc", "mlp.c_proj"]},
             {"feedforward": ["mlp.c_proj"]}),
    "cnn": (small_cnn, _cnn_batch, {"conv": ["conv1", "conv2"]}, {"trainable_modules": ["fc"], "feedforward": ["conv2"]}),
}


def _cases():
    cases = []
    for name in dt.available_methods():
        method = dt.get_method(name)
        for variant in [{}] + method.variants:
            for key in MODELS:
                vid = ",".join(f"{k}={v}" for k, v in variant.items() if k != "init_token_ids") or "defaults"
                cases.append(pytest.param(name, variant, key, id=f"{name}[{vid}]-{key}"))
    return cases


def _config(name, variant, key):
    method = dt.get_method(name)
    _, _, patterns, extra = MODELS[key]
    fields = {f for f in method.config_cls.__dataclass_fields__}
    kw = {k: v for k, v in extra.items() if k in fields}
    if patterns is not None and method.hook != "input" and not callable(method.default_targets):
        kw["targets"] = [p for kind in method.kinds for p in patterns.get(kind, [])] or None
    if patterns is not None and method.hook == "input" and key == "cnn":
        kw["targets"] = None
    kw.update(variant)
    return method, kw


def _applies(method, key):
    _, _, patterns, _ = MODELS[key]
    if method.hook == "input":
        return key != "cnn"
    if callable(method.default_targets):    # targets found in the model (bitfit: every layer with a bias)
        try:
            method.default_targets(MODELS[key][0]())
        except dt.DeltatuneError:
            return False
        return True
    return patterns is None or any(patterns.get(k) for k in method.kinds)


@functools.lru_cache(maxsize=None)
def run_case(name: str, variant_items: tuple, key: str) -> dict:
    """Attach, check init, train a few steps, merge, unmerge, save and reload; record it all."""
    variant = dict(variant_items)
    method, kw = _config(name, variant, key)
    build, make_batch, _, _ = MODELS[key]
    batch, target = make_batch()
    torch.manual_seed(0)
    model = build().eval()
    pristine = copy.deepcopy(model)
    with torch.no_grad():
        ref = _out(model, key, batch)
    r: dict = {}
    dt.attach(model, dt.config(name, **kw), name="a")
    cfg = dt.config(name, **kw)
    r["trainable"] = dt.count_parameters(model)[0]
    expected = 0
    for mod_name, w in wrappers(model):
        d = w.deltas["a"]
        if isinstance(d, BiasDelta):
            expected += w.base.bias.numel()
        else:
            expected += method.expected_parameters(w.base, w.kind, cfg, mod_name)
    head = sum(p.numel() for n, p in model.named_parameters() if ".copies.a." in f".{n}" or n.startswith("copies.a."))
    r["expected"] = expected + head
    r["adapter_params"] = {id(p) for p in adapter_parameters(model, "a")}
    r["trainable_ids"] = {id(p) for _, p in dt.trainable_parameters(model)}
    with torch.no_grad():
        r["init_diff"] = (_out(model, key, batch) - ref).abs().max().item()
    model.train()
    opt = torch.optim.AdamW([p for _, p in dt.trainable_parameters(model)], lr=method.default_lr)
    params = dt.trainable_parameters(model)
    got_grad = {n: False for n, _ in params}
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = _loss(model, key, batch, target)
        loss.backward()
        losses.append(loss.item())
        for n, p in params:
            if p.grad is not None and p.grad.abs().sum() > 0:
                got_grad[n] = True
        opt.step()
    with torch.no_grad():
        losses.append(_loss(model, key, batch, target).item())
    r["losses"] = losses
    r["no_grad"] = [n for n, ok in got_grad.items() if not ok]
    model.eval()
    with torch.no_grad():
        unmerged = _out(model, key, batch)
    r["trained_diff"] = (unmerged - ref).abs().max().item()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".base." in f".{n}"}
    if method.foldable:
        dt.merge(model)
        with torch.no_grad():
            r["merge_diff"] = (_out(model, key, batch) - unmerged).abs().max().item()
            r["merge_scale"] = unmerged.abs().max().item()
        r["weights_changed"] = any(not torch.equal(p, base_before[n]) for n, p in model.named_parameters()
                                   if n in base_before)
        dt.unmerge(model)
        r["unmerge_exact"] = all(torch.equal(p, base_before[n]) for n, p in model.named_parameters()
                                 if n in base_before)
    else:
        with pytest.raises(dt.DeltatuneError):
            dt.merge(model)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        dt.save_adapter(model, tmp, name="a")
        with safe_open(f"{tmp}/adapter.safetensors", framework="pt") as f:
            keys = list(f.keys())
            r["file_numel"] = sum(f.get_tensor(k).numel() for k in keys)
        r["file_keys_ok"] = all(k.startswith(("deltas.", "modules.")) for k in keys)
        r["state_numel"] = sum(t.numel() for _, w in wrappers(model) for t in w.deltas["a"].state_dict().values()) + head
        fresh = copy.deepcopy(pristine)
        dt.load_adapter(fresh, tmp, name="b")
        with torch.no_grad():
            r["reload_diff"] = (_out(fresh.eval(), key, batch) - unmerged).abs().max().item()
    return r


@pytest.mark.parametrize("name,variant,key", _cases())
def test_conformance(name, variant, key):
    method = dt.get_method(name)
    if not _applies(method, key):
        _, _, patterns, _ = MODELS[key]
        model = MODELS[key][0]()
        targets = None if callable(method.default_targets) else [p for ps in patterns.values() for p in ps]
        with pytest.raises(dt.DeltatuneError, match="cannot wrap|has none|has no|input embedding"):
            dt.attach(model, dt.config(name, targets=targets))
        assert not wrappers(model), "a failed attach must leave the model unchanged"
        return
    r = run_case(name, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in variant.items())), key)
    # only the delta parameters (and declared trainable modules) are trainable, as many as the formula says
    assert r["trainable_ids"] == r["adapter_params"]
    assert r["trainable"] == r["expected"], (r["trainable"], r["expected"])
    # the initial model is the base model where the paper says so (PiSSA/MiLoRA: W_res + B0 A0 = W)
    if method.identity_at_init:
        assert r["init_diff"] < 1e-4, r["init_diff"]
    else:
        assert r["init_diff"] > 1e-4, "an input method that changes nothing at init is not attached"
    # every delta parameter gets a gradient, and the loss goes down
    assert not r["no_grad"], f"no gradient reached {r['no_grad']}"
    assert r["losses"][-1] < r["losses"][0], r["losses"]
    assert r["trained_diff"] > 1e-4, "training did not change the output"
    if method.foldable:
        assert r["weights_changed"]
        assert r["merge_diff"] <= 1e-5 * max(1.0, r["merge_scale"]), (r["merge_diff"], r["merge_scale"])
        assert r["unmerge_exact"]
    # the file holds exactly the delta tensors; loading into a fresh model reproduces the outputs
    assert r["file_keys_ok"]
    assert r["file_numel"] == r["state_numel"]
    assert r["reload_diff"] < 1e-6, r["reload_diff"]


@pytest.mark.parametrize("name,variant", [pytest.param(n, v, id=f"{n}{v}") for n in dt.available_methods()
                                          for v in [{}, {"dropout": 0.2}, {"bias": "lora_only"}]
                                          if not set(v) - set(dt.get_method(n).config_cls.__dataclass_fields__)])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fast_paths_equal_the_plain_definition(name, variant, autocast, monkeypatch):
    """Outputs and gradients of every fused path equal the plain per-op computation, with the same
    dropout mask (same RNG state). The input gradients of fused layers are covered too: the
    layer-0 deltas get their gradients through every later layer's input gradient."""
    from deltatune.core import wrapper
    method, kw = _config(name, variant, "llama")
    if not _applies(method, "llama"):
        pytest.skip(f"{name} does not apply to the Llama layout")
    probe = tiny_llama()
    dt.attach(probe, dt.config(name, **kw))
    if not any(hasattr(type(w.deltas["default"]), attr) for _, w in wrappers(probe)
               for attr in ("fused_forward", "grouped_forward")):
        pytest.skip(f"{name} has no fast path: nothing to compare with its plain definition")
    results = []
    for fast in (True, False):
        monkeypatch.setattr(wrapper, "FAST_PATHS", fast)
        model = tiny_llama()
        dt.attach(model, dt.config(name, **kw))
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for _, p in dt.trainable_parameters(model):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.train()
        batch, target = _llama_batch()
        torch.manual_seed(11)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch, labels=target).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in dt.trainable_parameters(model)}
        results.append((loss.detach(), grads))
    (l1, g1), (l2, g2) = results
    assert g1.keys() == g2.keys()
    if not autocast:
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
        for n in g1:
            torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-6, msg=n)
        return
    # bfloat16 keeps 8 bits of mantissa: the two paths round in different places
    torch.testing.assert_close(l1, l2, rtol=2e-2, atol=1e-3)
    for n in g1:
        assert g1[n].dtype == torch.float32, n
        err = (g1[n] - g2[n]).norm() / g2[n].norm().clamp_min(1e-12)
        assert err < 0.05, (n, float(err))
