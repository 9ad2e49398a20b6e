"""The input / sequence hook (deltatune/sequence.py) with prompt_tuning and prefix_tuning,
checked against their definitions written here:

- a prompt equal to the embeddings of real tokens ``t`` must give, for the caller's tokens ``x``,
  what the base model gives for ``[t; x]`` at the positions of ``x``;
- a prefix equal to the keys and values the base model computes for ``t`` (in every layer, at
  positions ``0..k-1``) must give the same: attending to a cached ``t`` is attending to ``t``
  (the "prefix from real words" of Li and Liang);

then generation with a key/value cache against recomputation without one (tiny models and the
packaged SmolLM2-135M), explicit position ids, left padding, training, and the saved file.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from safetensors import safe_open

import deltatune as dt
from models import small_cnn, tiny_gpt2, tiny_llama

transformers = pytest.importorskip("transformers")

METHODS = ["prompt_tuning", "prefix_tuning"]
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
K = 4


def _ids(n: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 512, (n, length), generator=torch.Generator().manual_seed(seed))


def _perturb(model, seed: int, scale: float = 0.5) -> None:
    """Move every trainable tensor off its initial value (the checks must not pass at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in dt.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _delta(model, name: str = "default"):
    from deltatune.core.engine import wrappers
    return next(w.deltas[name] for _, w in wrappers(model) if name in w.deltas)


def _real_token_kv(base, tokens: torch.Tensor) -> torch.Tensor:
    """Keys and values of ``tokens`` (1, k) in every layer of the plain model, (layers, 2, heads, k, dim)."""
    with torch.no_grad():
        out = base(input_ids=tokens, use_cache=True)
    cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
    return torch.stack([torch.stack([layer[0][0], layer[1][0]]) for layer in cache])


def _with_real_tokens(method: str, arch: str, tokens: torch.Tensor):
    """(adapted model, plain twin) with the prompt / prefix set to what ``tokens`` give."""
    model = BUILDERS[arch]().eval()
    plain = copy.deepcopy(model)
    dt.attach(model, dt.config(method, num_virtual_tokens=tokens.shape[1]))
    with torch.no_grad():
        if method == "prompt_tuning":
            _delta(model).prompt.copy_(plain.get_input_embeddings()(tokens)[0])
        else:
            _delta(model).prefix.copy_(_real_token_kv(plain, tokens))
    return model, plain


def _greedy(model, ids, mask=None, cache=True, n=20):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, use_cache=cache,
                          pad_token_id=0)


# ----------------------------------------------------------------------------- against the definitions

@pytest.mark.parametrize("arch", BUILDERS)
@pytest.mark.parametrize("method", METHODS)
def test_equals_the_plain_model_on_real_tokens_in_front(method, arch):
    tokens, x = _ids(1, K, seed=7), _ids(3, 9)
    model, plain = _with_real_tokens(method, arch, tokens)
    with torch.no_grad():
        got = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        want = plain(input_ids=torch.cat([tokens.expand(3, -1), x], dim=1)).logits[:, K:]
        base = plain(input_ids=x).logits
    assert got.shape == (3, 9, 512)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - base).abs().max() > 1e-2, "the prompt / prefix must change the output"
    # greedy continuation too: the adapted model continues x as the plain model continues [t; x]
    torch.testing.assert_close(_greedy(model, x, n=8)[:, 9:],
                               _greedy(plain, torch.cat([tokens.expand(3, -1), x], dim=1), n=8)[:, K + 9:])


def test_prompt_and_prefix_together_in_one_order():
    """Both active: the prefix comes first, then the prompt, then the caller's tokens."""
    t_prefix, t_prompt, x = _ids(1, 3, seed=5), _ids(1, 2, seed=6), _ids(2, 6)
    model = tiny_llama().eval()
    plain = copy.deepcopy(model)
    dt.attach(model, dt.config("prefix_tuning", num_virtual_tokens=3), name="pre")
    dt.attach(model, dt.config("prompt_tuning", num_virtual_tokens=2), name="pro")
    with torch.no_grad():
        _delta(model, "pre").prefix.copy_(_real_token_kv(plain, t_prefix))
        _delta(model, "pro").prompt.copy_(plain.get_input_embeddings()(t_prompt)[0])
    dt.set_active(model, ["pre", "pro"])
    full = torch.cat([t_prefix.expand(2, -1), t_prompt.expand(2, -1), x], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, plain(input_ids=full).logits[:, 5:], rtol=1e-4, atol=1e-5)
        explicit = model(input_ids=x, position_ids=torch.arange(6).unsqueeze(0)).logits
        torch.testing.assert_close(explicit, plain(input_ids=full).logits[:, 5:], rtol=1e-4, atol=1e-5)
    assert torch.equal(_greedy(model, x, n=6), _greedy(model, x, n=6, cache=False))


# ----------------------------------------------------------------------------- generation with a cache

@pytest.mark.parametrize("arch", BUILDERS)
@pytest.mark.parametrize("method", METHODS)
def test_generate_with_cache_equals_recomputation(method, arch, tmp_path):
    model = BUILDERS[arch]().eval()
    pristine = copy.deepcopy(model)
    dt.attach(model, dt.config(method, num_virtual_tokens=K))
    _perturb(model, seed=3)
    x = _ids(2, 7)
    cached, recomputed = _greedy(model, x), _greedy(model, x, cache=False)
    assert cached.shape == (2, 27)
    assert torch.equal(cached, recomputed)
    with torch.no_grad():       # (a random tiny model repeats one token whatever comes first)
        assert (model(input_ids=x).logits - pristine(input_ids=x).logits).abs().max() > 1e-2
    dt.save_adapter(model, tmp_path)
    fresh = copy.deepcopy(pristine)
    dt.load_adapter(fresh, tmp_path)
    assert torch.equal(_greedy(fresh, x), cached)


@pytest.mark.parametrize("arch", BUILDERS)
@pytest.mark.parametrize("method", METHODS)
def test_explicit_position_ids_equal_the_default(method, arch):
    model = BUILDERS[arch]().eval()
    dt.attach(model, dt.config(method, num_virtual_tokens=K))
    _perturb(model, seed=4)
    x = _ids(2, 8)
    with torch.no_grad():
        default = model(input_ids=x).logits
        explicit = model(input_ids=x, position_ids=torch.arange(8).unsqueeze(0).expand(2, -1)).logits
        shifted = model(input_ids=x, position_ids=torch.arange(1, 9).unsqueeze(0).expand(2, -1)).logits
    torch.testing.assert_close(explicit, default, rtol=0, atol=0)
    assert (shifted - default).abs().max() > 1e-3, "positions given must be used"


@pytest.mark.parametrize("arch", BUILDERS)
@pytest.mark.parametrize("method", METHODS)
def test_left_padding_equals_each_sequence_alone(method, arch):
    model = BUILDERS[arch]().eval()
    dt.attach(model, dt.config(method, num_virtual_tokens=K))
    _perturb(model, seed=5)
    short, long = _ids(1, 5, seed=8), _ids(1, 8, seed=9)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)      # what generate() computes for left padding
    with torch.no_grad():
        both = model(input_ids=batch, attention_mask=mask, position_ids=positions).logits
        alone = [model(input_ids=short).logits, model(input_ids=long).logits]
    torch.testing.assert_close(both[0, 3:], alone[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[1], alone[1][0], rtol=1e-4, atol=1e-5)
    together = _greedy(model, batch, mask, n=10)
    assert torch.equal(together[0, 8:], _greedy(model, short, n=10)[0, 5:])
    assert torch.equal(together[1], _greedy(model, long, n=10)[0])


# ----------------------------------------------------------------------------- training and the file

@pytest.mark.parametrize("projection", [False, True])
def test_training_the_prefix_lowers_the_loss(projection):
    model = tiny_llama()
    dt.attach(model, dt.config("prefix_tuning", num_virtual_tokens=K, prefix_projection=projection))
    x = _ids(4, 16)
    # a randomly initialised model predicts near-uniformly and moves slowly: a large rate for 8 steps
    opt = torch.optim.AdamW([p for _, p in dt.trainable_parameters(model)], lr=0.1)
    losses = []
    for _ in range(8):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def _geometry(model):
    cfg = model.config
    heads = cfg.num_attention_heads
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads, cfg.hidden_size // heads


@pytest.mark.parametrize("arch", BUILDERS)
def test_projection_is_folded_away_at_save(arch, tmp_path):
    model = BUILDERS[arch]().eval()
    pristine = copy.deepcopy(model)
    layers, kv_heads, head_dim = _geometry(model)
    dim, width, hidden = model.config.hidden_size, layers * 2 * kv_heads * head_dim, 32
    dt.attach(model, dt.config("prefix_tuning", num_virtual_tokens=K, prefix_projection=True,
                               encoder_hidden_size=hidden))
    # training holds P' (k x dim) and the MLP dim -> hidden -> layers*2*kv_heads*head_dim
    assert dt.count_parameters(model)[0] == K * dim + dim * hidden + hidden + hidden * width + width
    _perturb(model, seed=6, scale=0.1)
    x = _ids(2, 6)
    with torch.no_grad():
        out = model(input_ids=x).logits
    dt.save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / "adapter.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
    embedding = "model.embed_tokens" if arch == "llama" else "transformer.wte"
    assert shapes == {f"deltas.{embedding}.prefix": (layers, 2, kv_heads, K, head_dim)}
    fresh = copy.deepcopy(pristine)
    dt.load_adapter(fresh, tmp_path, trainable=True)
    assert dt.count_parameters(fresh)[0] == layers * 2 * kv_heads * head_dim * K      # the plain table
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).logits, out, rtol=1e-5, atol=1e-6)


def test_plain_prefix_parameter_count():
    for build in BUILDERS.values():
        model = build()
        layers, kv_heads, head_dim = _geometry(model)
        dt.attach(model, dt.config("prefix_tuning"))
        assert dt.count_parameters(model)[0] == layers * 2 * kv_heads * head_dim * 20


def test_unload_removes_the_hooks():
    model = tiny_llama().eval()
    x = _ids(1, 5)
    with torch.no_grad():
        before = model(input_ids=x).logits
    dt.attach(model, dt.config("prefix_tuning", num_virtual_tokens=K), name="a")
    dt.attach(model, dt.config("prompt_tuning", num_virtual_tokens=K), name="b")
    dt.unload(model, merge=False)
    assert not model._forward_pre_hooks and not model._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, before, rtol=0, atol=0)


# ----------------------------------------------------------------------------- encoders and refusals

def _tiny_bert():
    cfg = transformers.BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


@pytest.mark.parametrize("method", METHODS)
def test_bert_encoder_padding_and_positions(method):
    """P-tuning v2's setting: an encoder with a prefix. Right padding leaves the real positions as
    they are alone; explicit positions equal the default."""
    model = _tiny_bert()
    dt.attach(model, dt.config(method, num_virtual_tokens=K))
    _perturb(model, seed=7, scale=0.2)
    short, long = _ids(1, 5, seed=10), _ids(1, 8, seed=11)
    batch = torch.cat([torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, 5:] = 0
    with torch.no_grad():
        both = model(input_ids=batch, attention_mask=mask).last_hidden_state
        alone = model(input_ids=short).last_hidden_state
        explicit = model(input_ids=long, position_ids=torch.arange(8).unsqueeze(0)).last_hidden_state
        plain = model(input_ids=long).last_hidden_state
    assert both.shape == (2, 8, 32)
    torch.testing.assert_close(both[0, :5], alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(explicit, plain, rtol=0, atol=0)
    with dt.disabled(model), torch.no_grad():
        assert (model(input_ids=long).last_hidden_state - plain).abs().max() > 1e-3


def test_models_without_a_cache_or_an_embedding_are_refused():
    distil = transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=128, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=32))
    with pytest.raises(dt.DeltatuneError, match="distilbert.*takes none"):
        dt.attach(distil, dt.config("prefix_tuning"))
    assert not hasattr(distil, "deltatune_shared")
    for method in METHODS:
        with pytest.raises(dt.DeltatuneError, match="needs a model with an input embedding"):
            dt.attach(small_cnn(), dt.config(method))


def test_config_is_validated():
    for bad in ({"num_virtual_tokens": 0}, {"encoder_hidden_size": 0}, {"init": "zeros"}):
        with pytest.raises((dt.DeltatuneError, ValueError)):
            dt.config("prefix_tuning", **bad)


def test_a_non_2d_mask_is_refused_clearly():
    model = tiny_llama().eval()
    dt.attach(model, dt.config("prefix_tuning", num_virtual_tokens=K))
    x = _ids(1, 5)
    with pytest.raises(dt.DeltatuneError, match="2-D attention_mask"):
        model(input_ids=x, attention_mask=torch.ones(1, 1, 5, 5 + K))


# ----------------------------------------------------------------------------- the real model

@functools.lru_cache(maxsize=1)
def _smollm2():
    from deltatune.core.errors import DeltatuneError
    from deltatune.train.model import load_causal_lm
    try:
        model, tokenizer = load_causal_lm("smollm2")
    except (DeltatuneError, ImportError, OSError) as e:
        pytest.skip(f"the packaged SmolLM2 is not available: {e}")
    return model.eval(), tokenizer


@pytest.mark.slow      # 30-45 s each on a shared 2-core CPU (load average 3; 170-215 s at load 9)
@pytest.mark.parametrize("method", METHODS)
def test_smollm2_greedy_with_cache_equals_recomputation_and_reload(method, tmp_path):
    base, tokenizer = _smollm2()
    model = copy.deepcopy(base)
    dt.attach(model, dt.config(method, num_virtual_tokens=8))
    _perturb(model, seed=11, scale=0.02 if method == "prompt_tuning" else 0.5)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    cached = _greedy(model, ids, n=20)
    assert cached.shape[1] == ids.shape[1] + 20
    assert torch.equal(cached, _greedy(model, ids, cache=False, n=20))
    with torch.no_grad():
        assert (model(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-1, "not a no-op"
    dt.save_adapter(model, tmp_path)
    del model
    fresh = copy.deepcopy(base)
    dt.load_adapter(fresh, tmp_path)
    assert torch.equal(_greedy(fresh, ids, n=20), cached)
