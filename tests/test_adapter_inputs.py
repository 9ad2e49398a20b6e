"""Bad adapter files, PEFT folders, checkpoints and config values: each is refused with one
``DeltatuneError`` naming the file and the field, and the model is left exactly as it was
(its state_dict and its module tree). One test per hole found in the readers."""

from __future__ import annotations

import copy
import functools
import json
import math
import struct
import typing
import warnings

import pytest
import torch
from safetensors.torch import load_file, save, save_file
from torch import nn

import deltatune as dt
from deltatune.train.checkpoint import (CHECKPOINT_FILE, CheckpointError, _digest, load_checkpoint, restore,
                                        save_checkpoint)
from test_engine import tiny_bert

Q = "encoder.encoder.layer.0.attention.self.query"
PEFT_Q = f"base_model.model.{Q}"


@functools.lru_cache(maxsize=1)
def _bert():
    return tiny_bert()


def bert():
    return copy.deepcopy(_bert())


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m).__name__) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()], dict(dt.core.engine.adapters(model)))


def assert_unchanged(model, snap):
    sd, tree, grads, names = snapshot(model)
    assert tree == snap[1], "the module tree changed"
    assert grads == snap[2] and names == snap[3]
    assert sd.keys() == snap[0].keys() and all(torch.equal(sd[k], snap[0][k]) for k in sd)


def refused(load, model, match, error=dt.DeltatuneError):
    """``load(model)`` raises ``error`` matching ``match`` and leaves ``model`` as it was."""
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        load(model)
    assert_unchanged(model, snap)


def _perturbed(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in dt.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture
def ours(tmp_path):
    """A saved LoRA adapter (query, value; trained classifier) in our format."""
    m = bert()
    dt.attach(m, dt.config("lora", r=4, targets=["query", "value"], trainable_modules=["classifier"]))
    dt.save_adapter(_perturbed(m), tmp_path / "ours")
    return tmp_path / "ours"


def _peft_dir(tmp_path, method, **kw):
    m = bert()
    dt.attach(m, dt.config(method, **kw))
    d = tmp_path / f"peft_{method}_{len(list(tmp_path.iterdir()))}"
    dt.export_peft(_perturbed(m), d)
    return d


@pytest.fixture
def peft_lora(tmp_path):
    return _peft_dir(tmp_path, "lora", r=4, targets=["query", "value"], trainable_modules=["classifier"])


@pytest.fixture
def peft_ia3(tmp_path):
    return _peft_dir(tmp_path, "ia3", targets=["key", "value"], trainable_modules=["classifier"])


def edit_json(path, change):
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def edit_tensors(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def load_ours(d):
    return lambda m: dt.load_adapter(m, d)


def load_peft(d):
    return lambda m: dt.import_peft(m, d)


# ------------------------------------------------------------------ 1. NaN / Inf, finite numbers

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_in_adapter_tensor_is_refused(ours, bad):
    key = f"deltas.{Q}.lora_B"
    edit_tensors(ours / "adapter.safetensors", lambda t: t[key].view(-1).__setitem__(3, bad))
    refused(load_ours(ours), bert(), f"tensor {key} holds NaN or Inf", dt.AdapterFileError)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_in_peft_tensor_is_refused(peft_lora, bad):
    key = f"{PEFT_Q}.lora_A.weight"
    edit_tensors(peft_lora / "adapter_model.safetensors", lambda t: t[key].view(-1).__setitem__(0, bad))
    refused(load_peft(peft_lora), bert(), f"tensor {key} holds NaN or Inf", dt.AdapterFileError)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_or_inf_alpha_in_stored_config_is_refused(ours, literal):
    text = (ours / "adapter_config.json").read_text()
    (ours / "adapter_config.json").write_text(text.replace('"alpha": 16.0', f'"alpha": {literal}'))
    refused(load_ours(ours), bert(), "adapter_config.json.*alpha must be a finite number", dt.AdapterFileError)


@pytest.mark.parametrize("field,value,match", [
    ("lora_alpha", "NaN", "lora_alpha must be a finite number"),
    ("lora_alpha", "Infinity", "lora_alpha must be a finite number"),
    ("lora_alpha", '"16"', "lora_alpha must be a finite number"),
    ("alpha_pattern", '{"query": Infinity}', "alpha_pattern must be an object mapping module patterns to positive"),
    ("alpha_pattern", '{"query": NaN}', "alpha_pattern must be an object"),
])
def test_nan_alpha_in_peft_config_is_refused(peft_lora, field, value, match):
    meta = json.loads((peft_lora / "adapter_config.json").read_text())
    meta[field] = "@@"
    (peft_lora / "adapter_config.json").write_text(json.dumps(meta).replace('"@@"', value))
    refused(load_peft(peft_lora), bert(), f"adapter_config.json: {match}", dt.AdapterFileError)


def _numeric_fields():
    """Every float / int field of every registered method's config (generic over the registry)."""
    cases = []
    for name in dt.available_methods():
        hints = typing.get_type_hints(dt.get_method(name).config_cls)
        for field in dt.get_method(name).config_cls.__dataclass_fields__:
            base = typing.get_args(hints[field]) or (hints[field],)
            if float in base or int in base:
                cases.append(pytest.param(name, field, float in base, type(None) in base, id=f"{name}.{field}"))
    return cases


@pytest.mark.parametrize("method,field,is_float,optional", _numeric_fields())
def test_every_numeric_config_field_is_checked(method, field, is_float, optional):
    bad = [math.nan, math.inf, -math.inf, "1", True] if is_float else [True, 2.0, "2", 2 ** 70, math.nan]
    if not optional:
        bad.append(None)
    for value in bad:
        with pytest.raises(dt.DeltatuneError, match=field):
            dt.config(method, **{field: value})


def test_pattern_values_and_token_ids_are_checked():
    for kw in [dict(rank_pattern={"query": True}), dict(rank_pattern={"query": 2.0}), dict(alpha_pattern={"q": math.nan}),
               dict(alpha_pattern={"q": "8"}), dict(rank_pattern={"re:(": 2}), dict(rank_pattern="query")]:
        with pytest.raises(dt.DeltatuneError, match="rank_pattern|alpha_pattern"):
            dt.config("lora", **kw)
    with pytest.raises(dt.DeltatuneError, match="init_token_ids"):
        dt.config("prompt_tuning", init="text", init_token_ids=[True, 3])


# ------------------------------------------------------------------ 2. dtypes

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_float_adapter_tensor_is_refused(ours, peft_lora, dtype):
    key = f"deltas.{Q}.lora_A"
    edit_tensors(ours / "adapter.safetensors", lambda t: t.__setitem__(key, t[key].to(dtype)))
    name = str(dtype).replace("torch.", "")
    refused(load_ours(ours), bert(), f"tensor {key} has dtype {name}", dt.AdapterFileError)
    key = f"{PEFT_Q}.lora_B.weight"
    edit_tensors(peft_lora / "adapter_model.safetensors", lambda t: t.__setitem__(key, t[key].to(dtype)))
    refused(load_peft(peft_lora), bert(), f"tensor {key} has dtype {name}", dt.AdapterFileError)


def test_int_bias_in_peft_file_is_refused_not_promoted(tmp_path):
    d = _peft_dir(tmp_path, "lora", r=4, targets=["query"], bias="lora_only")
    key = f"{PEFT_Q}.base_layer.bias"
    edit_tensors(d / "adapter_model.safetensors", lambda t: t.__setitem__(key, t[key].round().to(torch.int64)))
    refused(load_peft(d), bert(), f"tensor {key} has dtype int64", dt.AdapterFileError)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_load_with_one_notice(ours, peft_lora, dtype):
    stored = load_file(ours / "adapter.safetensors")
    save_file({k: v.to(dtype) for k, v in stored.items()}, ours / "adapter.safetensors")
    m = bert()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dt.load_adapter(m, ours)
    notes = [w for w in caught if "to match the model's dtype" in str(w.message)]
    assert len(notes) == 1, [str(w.message) for w in caught]
    name = str(dtype).replace("torch.", "")
    assert f"from {name} to float32" in str(notes[0].message) and "deltas." in str(notes[0].message)
    state = dt.core.io.adapter_state(m, "default")
    assert all(torch.equal(state[k], stored[k].to(dtype).float()) for k in stored)

    stored = load_file(peft_lora / "adapter_model.safetensors")
    save_file({k: v.to(dtype) for k, v in stored.items()}, peft_lora / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match=f"adapter_model.safetensors: cast .* from {name} to float32 .*lora_A"):
        dt.import_peft(bert(), peft_lora)


def test_packed_float4_tensor_is_refused(ours):
    # safetensors' F4 comes back as torch's packed float4, which has no conversion to float32
    key = f"deltas.{Q}.lora_A"
    tensors = load_file(ours / "adapter.safetensors")
    header = {k: {"dtype": "F32", "shape": list(v.shape)} for k, v in tensors.items()}
    blobs, offset = [], 0
    for k in sorted(tensors):
        data = tensors[k].numpy().tobytes() if k != key else bytes(tensors[k].numel())
        if k == key:      # two float4 values a byte: torch's (4, 32) float4_e2m1fn_x2 is F4 of shape (4, 64)
            header[k] = {"dtype": "F4", "shape": [tensors[k].shape[0], 2 * tensors[k].shape[1]]}
        header[k]["data_offsets"] = [offset, offset + len(data)]
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    (ours / "adapter.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    refused(load_ours(ours), bert(), f"tensor {key} has dtype float4", dt.AdapterFileError)


# ------------------------------------------------------------------ 3. adapters that would do nothing

def test_empty_peft_safetensors_is_refused(tmp_path):
    for method, kw in (("lora", dict(r=4, targets=["query"])), ("ia3", dict(targets=["key"]))):
        d = _peft_dir(tmp_path, method, **kw)
        save_file({}, d / "adapter_model.safetensors")
        refused(load_peft(d), bert(), "adapter_model.safetensors: holds no tensors", dt.AdapterFileError)


def test_ia3_file_without_ia3_l_is_refused(tmp_path, peft_ia3):
    d = _peft_dir(tmp_path, "ia3", targets=["key"])
    edit_tensors(d / "adapter_model.safetensors", lambda t: [t.pop(k) for k in list(t) if k.endswith("ia3_l")]
                 and t.__setitem__("base_model.model.classifier.weight", torch.ones(3, 32)))
    refused(load_peft(d), bert(), "unexpected tensor base_model.model.classifier.weight for a PEFT IA3",
            dt.AdapterFileError)
    # with modules_to_save, only the head is left: still no IA3
    edit_tensors(peft_ia3 / "adapter_model.safetensors",
                 lambda t: [t.pop(k) for k in list(t) if k.endswith("ia3_l")])
    refused(load_peft(peft_ia3), bert(), "holds no ia3_l tensors", dt.AdapterFileError)


def test_peft_ia3_with_modules_to_save_round_trips(peft_ia3):
    # the IA3 importer used to drop every tensor but ia3_l, so a saved head never loaded
    m = bert()
    dt.import_peft(m, peft_ia3)
    stored = load_file(peft_ia3 / "adapter_model.safetensors")
    assert torch.equal(m.classifier.copies["default"].weight, stored["base_model.model.classifier.weight"])


def test_lora_file_with_only_saved_modules_is_refused(peft_lora):
    edit_tensors(peft_lora / "adapter_model.safetensors", lambda t: [t.pop(k) for k in list(t) if "lora_" in k])
    refused(load_peft(peft_lora), bert(), "holds no LoRA tensors", dt.AdapterFileError)


def test_our_empty_tensor_file_is_refused(ours):
    save_file({}, ours / "adapter.safetensors")            # was already caught: missing tensors
    refused(load_ours(ours), bert(), "missing tensors", dt.AdapterFileError)
    edit_json(ours / "adapter_config.json", lambda m: (m.__setitem__("targets", {}),
                                                       m["config"].__setitem__("trainable_modules", [])))
    refused(load_ours(ours), bert(), "the adapter wraps no module", dt.AdapterFileError)


# ------------------------------------------------------------------ 4. malformed configs, foreign tensors

@pytest.mark.parametrize("content,match", [
    (b"\xff\xfe{\x00}\x00", "not UTF-8 text"),
    (b'{"library": "deltatune", "x": "\xe9t\xe9"}', "not UTF-8 text"),
    (b"[1, 2]", "holds an array, not a JSON object"),
    (b"7", "holds a number, not a JSON object"),
    (b'"adapter"', "holds a string, not a JSON object"),
    (b"[" * 100_000, "not valid JSON"),
])
@pytest.mark.parametrize("reader", ["ours", "peft"])
def test_config_that_is_not_a_json_object_is_refused(ours, peft_lora, reader, content, match):
    d = ours if reader == "ours" else peft_lora
    (d / "adapter_config.json").write_bytes(content)
    load = load_ours(d) if reader == "ours" else load_peft(d)
    refused(load, bert(), f"adapter_config.json: {match}", dt.AdapterFileError)


@pytest.mark.parametrize("reader", ["ours", "peft"])
def test_config_that_is_a_directory_is_refused(ours, peft_lora, reader):
    d = ours if reader == "ours" else peft_lora
    (d / "adapter_config.json").unlink()
    (d / "adapter_config.json").mkdir()
    load = load_ours(d) if reader == "ours" else load_peft(d)
    refused(load, bert(), "adapter_config.json: is not a regular file", dt.AdapterFileError)


@pytest.mark.parametrize("change,match", [
    (lambda m: m["config"].__setitem__("targets", [1, 2]), "targets entries must be non-empty strings"),
    (lambda m: m["config"].__setitem__("targets", ["query", None]), "targets entries must be non-empty strings"),
    (lambda m: m["config"].__setitem__("targets", 5), "targets must be a list of patterns"),
    (lambda m: m["config"].__setitem__("r", True), "r must be an int"),
    (lambda m: m["config"].__setitem__("r", 2 ** 80), "r=.* is out of range"),
    (lambda m: m.__setitem__("targets", [1, 2]), "targets must be an object, got an array"),
    (lambda m: m.__setitem__("targets", 5), "targets must be an object, got a number"),
    (lambda m: m["targets"].__setitem__(Q, 5), "must be an object"),
    (lambda m: m["targets"][Q].__setitem__("weight_shape", "32x32"), "weight_shape must be a list"),
    (lambda m: m.__setitem__("method", ["lora"]), "method must be a method name"),
    (lambda m: m.__setitem__("config", [1]), "config must be an object"),
    (lambda m: m.__setitem__("format_version", True), "format_version True is not supported"),
    (lambda m: m.__setitem__("name", 5), "name must be a string"),
    (lambda m: m.__setitem__("name", "no spaces allowed"), "stored name 'no spaces allowed' is not a valid"),
    (lambda m: m.__setitem__("method", "no_such_method"), "adapter_config.json: unknown method 'no_such_method'"),
])
def test_malformed_config_fields_are_refused(ours, change, match):
    edit_json(ours / "adapter_config.json", change)
    refused(load_ours(ours), bert(), match, dt.AdapterFileError)


@pytest.mark.parametrize("change,match", [
    (lambda c: c.pop("r"), "missing 'r'"),
    (lambda c: c.__setitem__("r", 0), "r must be a positive int"),
    (lambda c: c.__setitem__("r", -4), "r must be a positive int"),
    (lambda c: c.__setitem__("r", 4.0), "r must be a positive int"),
    (lambda c: c.__setitem__("r", True), "r must be a positive int"),
    (lambda c: c.__setitem__("r", "4"), "r must be a positive int"),
    (lambda c: c.__setitem__("target_modules", 5), "target_modules must be a list of module names"),
    (lambda c: c.__setitem__("target_modules", ["query", 3]), "target_modules must be a list"),
    (lambda c: c.__setitem__("lora_alpha", "16"), "lora_alpha must be a finite number"),
    (lambda c: c.__setitem__("lora_alpha", [16]), "lora_alpha must be a finite number"),
    (lambda c: c.__setitem__("lora_dropout", 1.5), "lora_dropout must be a finite number"),
    (lambda c: c.__setitem__("modules_to_save", "classifier"), "modules_to_save must be a list of module names"),
    (lambda c: c.__setitem__("modules_to_save", [1]), "modules_to_save must be a list"),
    (lambda c: c.__setitem__("layers_to_transform", "0"), "layers_to_transform must be a non-negative int"),
    (lambda c: c.__setitem__("layers_to_transform", [0.5]), "layers_to_transform must be"),
    (lambda c: c.__setitem__("layers_to_transform", [-1]), "layers_to_transform must be"),
    (lambda c: c.__setitem__("rank_pattern", ["query"]), "rank_pattern must be an object"),
    (lambda c: c.__setitem__("rank_pattern", {"query": "2"}), "rank_pattern must be an object mapping"),
    (lambda c: c.__setitem__("alpha_pattern", {"query": None}), "alpha_pattern must be an object mapping"),
    (lambda c: c.__setitem__("use_dora", "false"), "use_dora must be true or false"),
    (lambda c: c.__setitem__("bias", 1), "bias must be 'none'"),
    (lambda c: c.__setitem__("peft_type", ["LORA"]), "peft_type .* is not supported"),
    (lambda c: c.__setitem__("lora_bias", True), "lora_bias=True .* is not supported"),
    (lambda c: c.__setitem__("init_lora_weights", "pissa"), "init_lora_weights='pissa': PEFT replaced the base weights"),
])
def test_malformed_peft_config_is_refused(peft_lora, change, match):
    edit_json(peft_lora / "adapter_config.json", change)
    refused(load_peft(peft_lora), bert(), f"adapter_config.json: {match}", dt.AdapterFileError)


def test_peft_tensor_for_a_module_without_weight_is_refused(peft_lora):
    container = "base_model.model.encoder.encoder.layer.0.attention"
    edit_tensors(peft_lora / "adapter_model.safetensors",
                 lambda t: t.update({f"{container}.lora_A.weight": torch.zeros(4, 32),
                                     f"{container}.lora_B.weight": torch.zeros(32, 4)}))
    refused(load_peft(peft_lora), bert(), r"attention \(BertAttention\), which is not a layer with a weight",
            dt.AdapterFileError)


def test_peft_tensor_for_a_missing_module_is_refused(peft_lora):
    edit_tensors(peft_lora / "adapter_model.safetensors",
                 lambda t: t.update({"base_model.model.nowhere.lora_A.weight": torch.zeros(4, 32)}))
    refused(load_peft(peft_lora), bert(), "module 'nowhere', which does not exist", dt.AdapterFileError)


def test_peft_bias_for_a_layer_without_bias_is_refused(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 4))
    dt.attach(model, dt.config("lora", r=2, targets=["1"], bias="lora_only"))
    dt.export_peft(model, tmp_path)
    edit_tensors(tmp_path / "adapter_model.safetensors",
                 lambda t: t.update({"base_model.model.0.lora_A.weight": torch.zeros(2, 8),
                                     "base_model.model.0.lora_B.weight": torch.zeros(8, 2),
                                     "base_model.model.0.base_layer.bias": torch.zeros(8)}))
    fresh = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 4))
    refused(load_peft(tmp_path), fresh, r"base_layer.bias is a trained bias for 0, which has no bias",
            dt.AdapterFileError)


def test_peft_bias_of_the_wrong_shape_is_refused(tmp_path):
    d = _peft_dir(tmp_path, "lora", r=4, targets=["query"], bias="lora_only")
    key = f"{PEFT_Q}.base_layer.bias"
    edit_tensors(d / "adapter_model.safetensors", lambda t: t.__setitem__(key, t[key][:1].clone()))
    refused(load_peft(d), bert(), rf"{key} has shape \(1,\) but the bias of .* has shape \(32,\)",
            dt.AdapterFileError)


@pytest.mark.parametrize("shape", [(), (4,), (0, 32)])
def test_peft_lora_factor_that_is_not_a_matrix_is_refused(peft_lora, shape):
    key = f"{PEFT_Q}.lora_A.weight"
    edit_tensors(peft_lora / "adapter_model.safetensors", lambda t: t.__setitem__(key, torch.zeros(shape)))
    refused(load_peft(peft_lora), bert(), f"tensor {key} has shape", dt.AdapterFileError)


def test_peft_key_without_a_dot_is_refused(peft_lora):
    edit_tensors(peft_lora / "adapter_model.safetensors", lambda t: t.__setitem__("stray", torch.zeros(2)))
    refused(load_peft(peft_lora), bert(), "unexpected tensor stray", dt.AdapterFileError)


def test_failing_attach_hook_leaves_the_model_unchanged(tmp_path):
    """A prompt-tuning file loaded into a model whose embedding has no host (no
    get_input_embeddings): the method's attach hook refuses after the wrapper went in; the
    load undoes it."""
    host = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 2))
    meta = {"format_version": 1, "library": "deltatune", "method": "prompt_tuning", "name": "p",
            "config": {"num_virtual_tokens": 3}, "targets": {"0": {"weight_shape": [20, 8], "delta": "method"}},
            "tensors": {"deltas.0.prompt": [3, 8]}}
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    save_file({"deltas.0.prompt": torch.randn(3, 8)}, tmp_path / "adapter.safetensors")
    refused(load_ours(tmp_path), host, "needs a model with an input embedding", dt.AdapterFileError)


def test_huge_size_field_in_stored_config_is_refused_before_allocating(tmp_path):
    class Host(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)

        def get_input_embeddings(self):
            return self.emb

    meta = {"format_version": 1, "library": "deltatune", "method": "prompt_tuning", "name": "p",
            "config": {"num_virtual_tokens": 10 ** 15}, "targets": {"emb": {"weight_shape": [20, 8]}},
            "tensors": {}}
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    save_file({"deltas.emb.prompt": torch.randn(3, 8)}, tmp_path / "adapter.safetensors")
    refused(load_ours(tmp_path), Host(), "needs 8,000,000,000,000,000 parameters for emb but the file holds 24",
            dt.AdapterFileError)


# ------------------------------------------------------------------ 5. ranks that cannot fit

@pytest.mark.parametrize("method", ["lora", "dora"])
def test_rank_larger_than_the_layer_is_refused_before_allocation(method):
    m = bert()
    for r in (10 ** 12, 33):
        refused(lambda m: dt.attach(m, dt.config(method, r=r, targets=["query"])), m,
                rf"r={r} does not fit layer {Q} \(Linear, weight shape \(32, 32\)\): r must be at most "
                rf"min\(out, fan_in\) = 32")
    refused(lambda m: dt.attach(m, dt.config(method, r=4, targets=["query"], rank_pattern={"layer.1.attention.self.query": 10 ** 12})),
            m, r"r=1000000000000 does not fit layer encoder.encoder.layer.1")
    dt.attach(m, dt.config(method, r=32, targets=["query"]))      # the limit itself is fine


def test_rank_limit_for_embeddings_and_convolutions():
    emb = nn.Sequential(nn.Embedding(100, 6))
    refused(lambda m: dt.attach(m, dt.config("lora", r=7, targets=["0"])), emb,
            r"r=7 does not fit layer 0 \(Embedding, weight shape \(100, 6\)\): .* = 6")
    conv = nn.Sequential(nn.Conv2d(3, 8, 3))
    refused(lambda m: dt.attach(m, dt.config("lora", r=9, targets=["0"])), conv, r"at most min\(out, fan_in\) = 8")
    dt.attach(conv, dt.config("lora", r=8, targets=["0"]))


def test_stored_rank_larger_than_the_layer_is_refused(ours):
    edit_json(ours / "adapter_config.json", lambda m: m["config"].__setitem__("r", 40))
    refused(load_ours(ours), bert(), rf"r=40 does not fit layer {Q}", dt.AdapterFileError)
    # a rank the file could never back is refused before plan builds (allocates) anything
    edit_json(ours / "adapter_config.json", lambda m: m["config"].__setitem__("r", 10 ** 12))
    refused(load_ours(ours), bert(), f"lora config needs 64,000,000,000,000 parameters for {Q} but the file holds 256",
            dt.AdapterFileError)


# ------------------------------------------------------------------ 6. checkpoints

from test_checkpoint import Toy  # noqa: E402  (the same small model as the checkpoint tests)


def make_run():
    torch.manual_seed(0)
    model = Toy()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


@pytest.fixture
def ckpt_parts(tmp_path):
    model, opt, sched = make_run()
    model.head(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, model, opt, sched, epoch=1, step=1, metrics=[{"epoch": 1}], args={"lr": 0.1})
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    return path, load_file(path), meta


def rewrite(path, tensors, meta):
    """A hostile checkpoint: any content, with a correct digest (which only proves integrity)."""
    meta = dict(meta, sha256=_digest(tensors))
    path.write_bytes(save(tensors, metadata=meta))


def _opt(meta, change):
    o = json.loads(meta["optimizer"])
    change(o)
    return json.dumps(o)


@pytest.mark.parametrize("change,match", [
    (lambda t, m: m.__setitem__("epoch", "-1"), "epoch '-1' is not a non-negative int"),
    (lambda t, m: m.__setitem__("step", "1.5"), "step '1.5' is not a non-negative int"),
    (lambda t, m: m.__setitem__("step", "9" * 5000), "is not a non-negative int"),
    (lambda t, m: m.__setitem__("metrics", "{}"), "metrics must be a list of objects"),
    (lambda t, m: m.__setitem__("metrics", "[1]"), "metrics must be a list of objects"),
    (lambda t, m: m.__setitem__("args", "[]"), "args must be an object"),
    (lambda t, m: m.__setitem__("scheduler", "3"), "scheduler must be an object"),
    (lambda t, m: m.__setitem__("args", "{"), "invalid metadata"),
    (lambda t, m: m.__setitem__("args", "[" * 100_000), "invalid metadata"),
    (lambda t, m: m.pop("optimizer"), "metadata lacks optimizer"),
    (lambda t, m: m.__setitem__("optimizer", "[]"), "optimizer must be an object"),
    (lambda t, m: m.__setitem__("optimizer", _opt(m, lambda o: o.pop("class"))), "optimizer.class"),
    (lambda t, m: m.__setitem__("optimizer", _opt(m, lambda o: o.__setitem__("param_groups", {}))), "param_groups"),
    (lambda t, m: m.__setitem__("optimizer", _opt(m, lambda o: o["param_groups"][0].__setitem__("params", [1]))),
     "param_groups"),
    (lambda t, m: m.__setitem__("optimizer", _opt(m, lambda o: o.__setitem__("state", {"nope": {"x": 1}}))),
     "optimizer.state"),
    (lambda t, m: t.__setitem__("param/head.weight", t["param/head.weight"].to(torch.int64)),
     "param/head.weight has dtype torch.int64"),
    (lambda t, m: t.__setitem__("optim/head.bias/exp_avg", t["optim/head.bias/exp_avg"].bool()),
     "optim/head.bias/exp_avg has dtype torch.bool"),
    (lambda t, m: t.__setitem__("optim/ghost/exp_avg", torch.zeros(2)), "optimizer state for 'ghost'"),
    (lambda t, m: t.__setitem__("weights/head.bias", torch.zeros(2)), "unexpected tensor 'weights/head.bias'"),
    (lambda t, m: t.__setitem__("rng/torch", t["rng/torch"][:100].clone()), "RNG state has 100 bytes"),
    (lambda t, m: t.__setitem__("rng/torch", torch.zeros_like(t["rng/torch"])), "RNG state is invalid"),
    (lambda t, m: t.__setitem__("rng/torch", t["rng/torch"].float()), "1-D uint8 RNG state"),
    (lambda t, m: t.pop("rng/torch"), "no torch RNG state"),
])
def test_hostile_checkpoint_is_refused_on_load(ckpt_parts, change, match):
    path, tensors, meta = ckpt_parts
    change(tensors, meta)
    rewrite(path, tensors, meta)
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("change,match", [
    (lambda t, m: t.__setitem__("optim/head.weight/exp_avg", torch.zeros(3)),
     r"optimizer state head.weight/exp_avg has shape \(3,\)"),
    (lambda t, m: m.__setitem__("optimizer", _opt(m, lambda o: o["param_groups"][0].__setitem__("lr", "fast"))),
     "param group's lr is 'fast'"),
    (lambda t, m: m.__setitem__("optimizer", _opt(m, lambda o: o["param_groups"][0].__setitem__("betas", [0.9]))),
     "param group's betas"),
    (lambda t, m: m.__setitem__("optimizer", _opt(m, lambda o: o["param_groups"][0].__setitem__("evil", 1))),
     r"holds fields \['evil'\]"),
    (lambda t, m: m.__setitem__("scheduler", json.dumps({"optimizer": 5})), r"holds fields \['optimizer'\]"),
    (lambda t, m: m.__setitem__("scheduler", json.dumps({"last_epoch": "x"})), "scheduler state's last_epoch"),
    (lambda t, m: m.__setitem__("scheduler", json.dumps({"last_epoch": 1.5})), "scheduler state's last_epoch"),
    (lambda t, m: [t.pop(k) for k in list(t) if k.endswith("/exp_avg_sq")], "but AdamW keeps"),
    (lambda t, m: t.__setitem__("optim/head.bias/step", torch.ones(2)), r"head.bias/step has shape \(2,\)"),
    (lambda t, m: t.__setitem__("optim/head.bias/step", torch.tensor(-1e30)), "head.bias/step is .*not a step count"),
    (lambda t, m: t.__setitem__("optim/head.bias/step", torch.tensor(math.nan)), "head.bias/step is .*not a step count"),
    (lambda t, m: t.__setitem__("optim/head.bias/exp_avg", torch.tensor(0.0)), r"head.bias/exp_avg has shape \(\)"),
    (lambda t, m: m.__setitem__("optimizer", _opt(m, lambda o: o["param_groups"][0].__setitem__("capturable", True))),
     "AdamW cannot step with the checkpoint's hyperparameters"),
    (lambda t, m: m.__setitem__("optimizer", _opt(m, lambda o: o["param_groups"][0].__setitem__("amsgrad", True))),
     r"holds \['exp_avg', 'exp_avg_sq', 'step'\], but AdamW keeps \['exp_avg', 'exp_avg_sq', 'max_exp_avg_sq', 'step'\]"),
])
def test_hostile_checkpoint_is_refused_on_restore_and_the_run_is_unchanged(ckpt_parts, change, match):
    path, tensors, meta = ckpt_parts
    change(tensors, meta)
    rewrite(path, tensors, meta)
    ckpt = load_checkpoint(path)
    model, opt, sched = make_run()
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), sched.state_dict())
    with pytest.raises(CheckpointError, match=match):
        restore(ckpt, model, opt, sched)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], before[0][k]) for k in sd)
    assert opt.state_dict() == before[1] and sched.state_dict() == before[2]


@pytest.mark.parametrize("dtype", [torch.float8_e5m2, torch.float16, torch.float64])
def test_step_count_in_another_float_dtype_restores_and_steps(ckpt_parts, dtype):
    # torch keeps a step count's dtype on load, and AdamW's kernels fail on float8 at the next step
    path, tensors, meta = ckpt_parts
    for k in [k for k in tensors if k.endswith("/step")]:
        tensors[k] = tensors[k].to(dtype)
    rewrite(path, tensors, meta)
    model, opt, sched = make_run()
    restore(load_checkpoint(path), model, opt, sched)
    model.head(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert all(s["step"].dtype == torch.float32 and s["step"] == 2 for s in opt.state.values())


def test_float4_tensor_in_checkpoint_is_a_checkpoint_error(ckpt_parts):
    path, _, _ = ckpt_parts
    h = json.dumps({"param/x": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"\0")
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(path)


# ------------------------------------------------------------------ 7. damaged safetensors

def _damaged(kind: str, good: bytes) -> bytes:
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "header past end":
        return struct.pack("<Q", len(good) * 10) + good[8:]
    if kind == "header not json":
        n = int.from_bytes(good[:8], "little")
        return good[:8] + b"{" + b"x" * (n - 1) + good[8 + n:]
    if kind == "huge shape":
        h = json.dumps({"t": {"dtype": "F32", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 16]}}).encode()
        return struct.pack("<Q", len(h)) + h + bytes(16)
    if kind == "garbage":
        return bytes(range(256)) * 4
    return b""


DAMAGE = ["truncated", "header past end", "header not json", "huge shape", "garbage", "empty"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_safetensors_are_adapter_file_errors(ours, peft_lora, kind):
    for d, weights, load in ((ours, "adapter.safetensors", load_ours(ours)),
                             (peft_lora, "adapter_model.safetensors", load_peft(peft_lora))):
        f = d / weights
        f.write_bytes(_damaged(kind, f.read_bytes()))
        refused(load, bert(), f"{weights}: cannot be read as safetensors", dt.AdapterFileError)


@pytest.mark.parametrize("reader", ["ours", "peft"])
def test_weights_file_that_is_a_directory_is_refused(ours, peft_lora, reader):
    d, weights = (ours, "adapter.safetensors") if reader == "ours" else (peft_lora, "adapter_model.safetensors")
    (d / weights).unlink()
    (d / weights).mkdir()
    load = load_ours(d) if reader == "ours" else load_peft(d)
    refused(load, bert(), f"{weights}: is not a regular file", dt.AdapterFileError)
