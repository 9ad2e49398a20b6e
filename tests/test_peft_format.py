"""Hugging Face PEFT format, both directions, checked against the real ``peft`` package."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import deltatune as dt
from models import minilm_classifier, tiny_gpt2, tiny_llama
from test_engine import batch, tiny_bert

peft = pytest.importorskip("peft")


def _perturb(model, scale=0.05):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in dt.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _llm_batch(vocab=512):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (2, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _out(model, b):
    out = model(**b)
    return out if isinstance(out, torch.Tensor) else out.logits


CASES = {
    "bert-lora": (tiny_bert, batch, "lora", dict(r=4, alpha=8, targets=["query", "value"], trainable_modules=["classifier"])),
    "bert-lora-rslora-patterns": (tiny_bert, batch, "lora", dict(r=4, alpha=8, rslora=True, targets=["query", "key", "value"],
                                                                 rank_pattern={"key": 2}, alpha_pattern={"value": 3})),
    "bert-lora-bias": (tiny_bert, batch, "lora", dict(r=4, targets=["query", "value"], bias="lora_only")),
    "bert-lora-pissa": (tiny_bert, batch, "lora", dict(r=4, targets=["query"], init="pissa")),
    "bert-dora": (tiny_bert, batch, "dora", dict(r=4, targets=["query", "value"], trainable_modules=["classifier"])),
    "bert-ia3": (tiny_bert, batch, "ia3", dict(targets=["key", "value", r"re:.*layer\.\d+\.output\.dense"],
                                               feedforward=[r"re:.*layer\.\d+\.output\.dense"])),
    "llama-lora": (tiny_llama, _llm_batch, "lora", dict(r=4, targets=["q_proj", "v_proj", "down_proj", "embed_tokens"])),
    "llama-dora": (tiny_llama, _llm_batch, "dora", dict(r=4, targets=["q_proj", "v_proj"])),
    "llama-ia3": (tiny_llama, _llm_batch, "ia3", dict(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"])),
    "llama-prompt": (tiny_llama, _llm_batch, "prompt_tuning", dict(num_virtual_tokens=4)),
    "gpt2-lora": (tiny_gpt2, _llm_batch, "lora", dict(r=4, targets=["c_attn", "mlp.c_proj"])),
    "minilm-lora": (minilm_classifier, lambda: batch(vocab=30000), "lora",
                    dict(r=8, targets=["query", "value"], trainable_modules=["classifier"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_peft_with_same_outputs(tmp_path, case):
    build, make_batch, method, kw = CASES[case]
    model = build().eval()
    base = copy.deepcopy(model)
    dt.attach(model, dt.config(method, **kw))
    _perturb(model)
    model.eval()
    dt.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    b = make_batch()
    with torch.no_grad():
        ours_out, theirs_out = _out(model, b), _out(theirs, b)
    if method == "prompt_tuning":   # PEFT keeps the virtual-token positions in its logits
        theirs_out = theirs_out[:, kw["num_virtual_tokens"]:]
    torch.testing.assert_close(ours_out, theirs_out, rtol=1e-5, atol=1e-5)


PEFT_CASES = {
    "bert-lora": (tiny_bert, batch, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                    modules_to_save=["classifier"], init_lora_weights=False)),
    "bert-lora-patterns": (tiny_bert, batch, peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["query", "key"],
                                                             rank_pattern={"key": 2}, alpha_pattern={"query": 5},
                                                             init_lora_weights=False)),
    "bert-lora-bias": (tiny_bert, batch, peft.LoraConfig(r=4, target_modules=["query"], bias="lora_only", init_lora_weights=False)),
    "bert-dora": (tiny_bert, batch, peft.LoraConfig(r=4, target_modules=["query", "value"], use_dora=True, init_lora_weights=False)),
    "bert-ia3": (tiny_bert, batch, peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                                  feedforward_modules=["output.dense"], init_ia3_weights=False)),
    "llama-lora": (tiny_llama, _llm_batch, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                                           init_lora_weights=False)),
    "llama-dora": (tiny_llama, _llm_batch, peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True,
                                                           init_lora_weights=False)),
    "llama-ia3": (tiny_llama, _llm_batch, peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                                         init_ia3_weights=False)),
    "minilm-lora": (minilm_classifier, lambda: batch(vocab=30000),
                    peft.LoraConfig(r=8, target_modules=["query", "value"], init_lora_weights=False)),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_import_of_peft_files_gives_peft_outputs(tmp_path, case):
    build, make_batch, peft_cfg = PEFT_CASES[case]
    torch.manual_seed(0)
    base = build().eval()
    fresh = copy.deepcopy(base)
    theirs = peft.get_peft_model(base, peft_cfg)
    with torch.no_grad():   # move what PEFT initialises to identity so the check is not trivial
        for n, p in theirs.named_parameters():
            trained_bias = getattr(peft_cfg, "bias", "none") != "none" and n.endswith("base_layer.bias")
            if "ia3_l" in n or "magnitude" in n or "modules_to_save" in n or trained_bias:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.eval()
    theirs.save_pretrained(str(tmp_path))
    dt.import_peft(fresh, tmp_path, name="imported")
    b = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(_out(fresh.eval(), b), _out(theirs, b), rtol=1e-5, atol=1e-5)


def test_import_refuses_pickle_and_unknown_types(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    model = tiny_bert()
    with pytest.raises(dt.AdapterFileError, match="never loads"):
        dt.import_peft(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "VBLORA"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(dt.AdapterFileError, match="VBLORA.*not supported"):
        dt.import_peft(model, tmp_path)
    assert not dt.core.engine.adapters(model)


def test_import_of_peft_prompt_tuning(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama().eval()
    fresh = copy.deepcopy(base)
    theirs = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    theirs.save_pretrained(str(tmp_path))
    dt.import_peft(fresh, tmp_path)
    b = _llm_batch()
    with torch.no_grad():
        torch.testing.assert_close(_out(fresh.eval(), b), _out(theirs, b)[:, 4:], rtol=1e-5, atol=1e-5)
