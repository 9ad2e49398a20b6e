"""Adapter files: round trips, and every kind of bad file refused with the model unchanged."""

from __future__ import annotations

import copy
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.core import io as dtio
from deltatune.core.engine import wrappers
from test_engine import batch, tiny_bert


def trained(method="lora", **kw):
    m = tiny_bert()
    dt.attach(m, dt.config(method, trainable_modules=["classifier"], **kw))
    with torch.no_grad():
        for _, p in dt.trainable_parameters(m):
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def assert_untouched(model, reference):
    assert not wrappers(model) and not dt.core.engine.adapters(model)
    sd, ref = model.state_dict(), reference.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)


def test_round_trip_and_file_contents(tmp_path):
    m = trained(targets=["query", "value"], r=4)
    dt.save_adapter(m, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["format_version"] == 1 and meta["method"] == "lora" and meta["config"]["r"] == 4
    assert meta["targets"]["encoder.encoder.layer.0.attention.self.query"]["weight_shape"] == [32, 32]
    tensors = load_file(tmp_path / "adapter.safetensors")
    assert sorted(tensors) == sorted(meta["tensors"])
    assert sum(t.numel() for t in tensors.values()) == dt.count_parameters(m)[0]
    fresh = tiny_bert()
    assert dt.load_adapter(fresh, tmp_path, name="x") == "x"
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**b), m(**b), rtol=0, atol=0)
    assert dt.count_parameters(fresh)[0] == 0, "a loaded adapter is frozen unless trainable=True"


def test_other_shapes_are_refused_and_model_unchanged(tmp_path):
    dt.save_adapter(trained(targets=["query"]), tmp_path)
    other = tiny_bert(hidden=48)
    reference = copy.deepcopy(other)
    with pytest.raises(dt.AdapterFileError, match="weight shape .*48.*32|shape"):
        dt.load_adapter(other, tmp_path)
    assert_untouched(other, reference)


def test_truncated_file_is_refused(tmp_path):
    dt.save_adapter(trained(targets=["query"]), tmp_path)
    f = tmp_path / "adapter.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) * 2 // 3])
    model = tiny_bert()
    reference = copy.deepcopy(model)
    with pytest.raises(dt.AdapterFileError, match="adapter.safetensors.*truncated or corrupted"):
        dt.load_adapter(model, tmp_path)
    assert_untouched(model, reference)


def test_corrupted_config_wrong_method_missing_and_extra_keys(tmp_path):
    dt.save_adapter(trained(targets=["query"]), tmp_path)
    cfg_path, st_path = tmp_path / "adapter_config.json", tmp_path / "adapter.safetensors"
    good_cfg, good = cfg_path.read_text(), load_file(st_path)
    model = tiny_bert()
    reference = copy.deepcopy(model)

    cfg_path.write_text(good_cfg[:50])
    with pytest.raises(dt.AdapterFileError, match="adapter_config.json: not valid JSON"):
        dt.load_adapter(model, tmp_path)

    meta = json.loads(good_cfg)
    meta["method"] = "ia3"
    meta["config"] = {k: v for k, v in meta["config"].items() if k in dt.IA3Config.__dataclass_fields__}
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(dt.AdapterFileError, match="missing tensors.*ia3_l.*unexpected tensors.*lora_A"):
        dt.load_adapter(model, tmp_path)

    meta["method"] = "no_such_method"
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(dt.DeltatuneError, match="unknown method 'no_such_method'"):
        dt.load_adapter(model, tmp_path)

    cfg_path.write_text(good_cfg)
    missing = dict(good)
    missing.pop(sorted(missing)[0])
    save_file(missing, st_path)
    with pytest.raises(dt.AdapterFileError, match="missing tensors"):
        dt.load_adapter(model, tmp_path)

    save_file({**good, "deltas.somewhere.lora_A": torch.zeros(1)}, st_path)
    with pytest.raises(dt.AdapterFileError, match="unexpected tensors.*somewhere"):
        dt.load_adapter(model, tmp_path)

    key = sorted(good)[0]
    save_file({**good, key: torch.zeros(3, 3)}, st_path)
    with pytest.raises(dt.AdapterFileError, match=f"tensor {key} has shape"):
        dt.load_adapter(model, tmp_path)
    assert_untouched(model, reference)


class _Exploit:
    def __reduce__(self):
        return (open, (os.environ["DT_PICKLE_MARKER"], "w"))


def test_pickle_directory_is_refused_without_unpickling(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("DT_PICKLE_MARKER", str(marker))
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_model.bin").write_bytes(pickle.dumps(_Exploit()))
    (adapter_dir / "adapter_config.json").write_text("{}")
    model = tiny_bert()
    with pytest.raises(dt.AdapterFileError, match="never unpickles"):
        dt.load_adapter(model, adapter_dir)
    assert not marker.exists()
    assert not wrappers(model)


def test_failed_save_keeps_the_previous_files(tmp_path, monkeypatch):
    m = trained(targets=["query"])
    dt.save_adapter(m, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        for _, p in dt.trainable_parameters(m):
            p.add_(1.0)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(dtio.os, "replace", crash)
    with pytest.raises(OSError):
        dt.save_adapter(m, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, "no temp files left, old files intact"
    dt.load_adapter(tiny_bert(), tmp_path)


@pytest.mark.parametrize("method,kw", [("ia3", {"targets": ["key", "value"]}), ("dora", {"targets": ["query"]}),
                                       ("prompt_tuning", {"num_virtual_tokens": 4}),
                                       ("lora", {"targets": ["query"], "bias": "all", "exclude": ["pooler"]})])
def test_round_trip_other_methods(tmp_path, method, kw):
    m = trained(method, **kw)
    dt.save_adapter(m, tmp_path, name="default")
    fresh = tiny_bert()
    dt.load_adapter(fresh, tmp_path)
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**b), m(**b), rtol=0, atol=1e-6)
