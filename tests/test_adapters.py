"""Bottleneck adapters (houlsby, pfeiffer): the modules they wrap on each known architecture
(names written here), counts from the formula 2 d m + m + d, the output against the definition
h + W_up f(W_down h), a clear refusal to merge, and mixed batches."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.core.engine import wrappers
from models import tiny_gpt2, tiny_llama

transformers = pytest.importorskip("transformers")


def tiny(kind):
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(vocab_size=100, **common))
    if kind == "vit":
        return transformers.ViTModel(transformers.ViTConfig(image_size=16, patch_size=8, **common))
    if kind == "ast":
        return transformers.ASTModel(transformers.ASTConfig(num_mel_bins=16, max_length=16, **common))
    return {"llama": tiny_llama, "gpt2": tiny_gpt2}[kind]()


SUBLAYERS = {   # the module ending each sub-layer in layer 0, by architecture
    "bert": ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"],
    "vit": ["layers.0.attention.o_proj", "layers.0.mlp.fc2"],      # transformers 5's ViT layout
    "ast": ["layers.0.attention.o_proj", "layers.0.mlp.fc2"],
    "llama": ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"],
    "gpt2": ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"],
}


@pytest.mark.parametrize("kind", list(SUBLAYERS))
def test_houlsby_wraps_both_sublayer_ends_and_pfeiffer_the_feedforward(kind):
    for method, expect in (("houlsby", SUBLAYERS[kind]), ("pfeiffer", SUBLAYERS[kind][1:])):
        model = tiny(kind)
        dt.attach(model, dt.config(method))
        names = sorted(n for n, _ in wrappers(model))
        layer1 = [n.replace(".0.", ".1.") for n in expect]
        assert names == sorted(expect + layer1), (method, names)
        d = {"gpt2": 64, "llama": 64}.get(kind, 32)       # the models' hidden sizes
        m = max(1, d // 16)
        assert dt.count_parameters(model)[0] == len(names) * (2 * d * m + m + d)


def test_output_is_the_bottleneck_definition_and_merge_is_refused():
    model = tiny_llama().eval()
    dt.attach(model, dt.config("houlsby", reduction_factor=8, activation="gelu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in dt.trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    layer = dict(wrappers(model))["model.layers.0.mlp.down_proj"]
    d = layer.deltas["default"]
    x = torch.randn(2, 5, 128, generator=g)
    with torch.no_grad():
        h = x @ layer.base.weight.T
        want = h + torch.nn.functional.gelu(h @ d.down.weight.T + d.down.bias) @ d.up.weight.T + d.up.bias
        torch.testing.assert_close(layer(x), want)
    with pytest.raises(dt.DeltatuneError, match="cannot be merged into weights: its delta is not a function"):
        dt.merge(model)


def test_unknown_layout_asks_for_targets_and_mixed_batches_work():
    with pytest.raises(dt.DeltatuneError, match="has no sub-layer map here .* pass targets"):
        dt.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)), dt.config("houlsby"))
    model = tiny_llama().eval()
    for name in ("a", "b"):
        dt.attach(model, dt.config("pfeiffer"), name=name)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f".{name}." in n:
                    p.add_(0.1 * torch.randn(p.shape))
    ids = torch.randint(0, 512, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        alone = []
        for name in ("a", "b", None):
            dt.set_active(model, [name] if name else [])
            alone.append(model(ids).logits)
        with dt.per_sample_adapters(model, ["a", "b", None]):
            mixed = model(ids).logits
    for i in range(3):
        torch.testing.assert_close(mixed[i], alone[i][i], rtol=1e-5, atol=1e-5)
