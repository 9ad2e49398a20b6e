"""The models of the conformance suite, their batches, and the cases: every registered method x
every variant x every model it applies to.

CI tier: tiny models built from transformers configs (seconds per case). Slow tier
(``@pytest.mark.slow``): the packaged MiniLM and SmolLM2-135M with their real weights.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from expected_targets import NoSemantics, expected_targets
from models import (bbc_texts, minilm_classifier, minilm_tokenizer, small_cnn, smollm2, tiny_ast,
                    tiny_bert_classifier, tiny_gpt2, tiny_llama, tiny_vit)


def _tokens(n: int, length: int, vocab: int, pad_last: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    mask = torch.ones_like(ids)
    if pad_last:        # the second sample is shorter: padding must not leak into the outputs
        mask[1, -pad_last:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def bert_batch():
    return _tokens(4, 16, 512, pad_last=5), torch.tensor([0, 1, 2, 3])


def lm_batch():
    batch = _tokens(4, 24, 512)
    return batch, batch["input_ids"]


def smollm2_batch():
    batch = _tokens(2, 16, 49152)
    return batch, batch["input_ids"]


def minilm_batch():
    texts, labels = bbc_texts(1)
    enc = minilm_tokenizer()(texts, truncation=True, max_length=48, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, torch.tensor(labels)


def _class_batch(key: str, shape: tuple[int, ...], n: int = 4):
    g = torch.Generator().manual_seed(0)
    return {key: torch.randn(n, *shape, generator=g)}, torch.arange(n) % 4


def vit_batch():
    return _class_batch("pixel_values", (3, 32, 32))


def ast_batch():
    return _class_batch("input_values", (64, 32))


def cnn_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 12, 12, generator=g) * 0.1
    y = torch.arange(8) % 4
    for i, c in enumerate(y.tolist()):      # each class lights one quadrant: a learnable task
        r, q = divmod(c, 2)
        x[i, :, r * 6:(r + 1) * 6, q * 6:(q + 1) * 6] += 1.0
    return {"x": x}, y


def _quantized_llama():
    model = tiny_llama()
    dt.quantize(model, "nf4")
    return model


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """One model of the suite. ``family`` names its layout (expected_targets.LAYOUTS); ``output``
    how its outputs are read (``logits``: a transformers output; ``tensor``: a plain module);
    ``patterns``: explicit targets by layer kind for methods with named default targets (None: the
    method's defaults, the product); ``extra``: config fields every method that has them gets."""
    build: Callable[[], nn.Module]
    batch: Callable[[], tuple[dict, torch.Tensor]]
    family: str
    output: str
    causal_lm: bool = False
    patterns: dict[str, list[str]] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    slow: bool = False
    needs: str | None = None        # a dt attribute the model needs (dt.quantize), else skipped
    # what dt.merge / dt.unload must be told (a quantised base: keep merged weights in float32)
    merge_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    only_named_defaults: bool = False   # run only methods whose default targets are named patterns
    variants: bool = True           # False: each method's defaults only (SmolLM2: minutes per case)


_HEAD = {"trainable_modules": ["classifier"]}
# (method, variant field=value, model): why the pair is refused by design (tested where refused)
NOT_APPLICABLE = {
    ("lora", "init=lora_ga", "llama_nf4"): "LoRA-GA needs the gradient of a float weight; a quantised base has "
                                           "none, so attach refuses it (tests/test_lora_ga.py)",
}

# method -> config fields for the stacking suite's small host layers (test_stacking.Host: 16-24
# features), for methods whose defaults need larger layers (a block size, a coefficient count)
STACK_OPTIONS: dict[str, dict[str, Any]] = {}

MODELS: dict[str, ModelCase] = {
    "bert": ModelCase(tiny_bert_classifier, bert_batch, "bert", "tensor", extra={**_HEAD, "exclude": ["pooler"]}),
    "llama": ModelCase(tiny_llama, lm_batch, "llama", "logits", causal_lm=True),
    # every weight layer kind of a causal LM at once (the token embedding included), explicit targets
    "llama_wide": ModelCase(tiny_llama, lm_batch, "llama", "logits", causal_lm=True,
                            patterns={"linear": ["q_proj", "v_proj", "down_proj"], "embedding": ["embed_tokens"]},
                            extra={"feedforward": ["down_proj"]}, only_named_defaults=True),
    "gpt2": ModelCase(tiny_gpt2, lm_batch, "gpt2", "logits", causal_lm=True),
    "vit": ModelCase(tiny_vit, vit_batch, "vit", "logits", extra=_HEAD),
    "ast": ModelCase(tiny_ast, ast_batch, "ast", "logits", extra=_HEAD),
    "cnn": ModelCase(small_cnn, cnn_batch, "cnn", "tensor", patterns={"conv": ["conv1", "conv2"]},
                     extra={"trainable_modules": ["fc"], "feedforward": ["conv2"]}),
    "llama_nf4": ModelCase(_quantized_llama, lm_batch, "llama", "logits", causal_lm=True, needs="quantize",
                           merge_options={"quantized": "dequantize"}),
    "minilm": ModelCase(minilm_classifier, minilm_batch, "bert", "tensor", extra={**_HEAD, "exclude": ["pooler"]},
                        slow=True),
    "smollm2": ModelCase(smollm2, smollm2_batch, "llama", "logits", causal_lm=True, slow=True, variants=False),
}
# the tiny model of each family: what decides at collection whether a method applies to a slow model
PROXY = {"minilm": "bert", "smollm2": "llama"}


@functools.lru_cache(maxsize=None)
def _prototype(key: str) -> nn.Module:
    return MODELS[key].build().eval()


def fresh_model(key: str) -> nn.Module:
    """A new copy of the case's model (built once per session, then copied)."""
    return copy.deepcopy(_prototype(key)).eval()


def output(model: nn.Module, key: str, batch: dict) -> torch.Tensor:
    if MODELS[key].output == "tensor":
        return model(batch["x"]) if "x" in batch else model(**batch)
    return model(**batch).logits


def loss(model: nn.Module, key: str, batch: dict, target: torch.Tensor) -> torch.Tensor:
    if MODELS[key].causal_lm:
        return model(**batch, labels=target).loss
    return F.cross_entropy(output(model, key, batch), target)


def model_input(key: str, batch: dict):
    """What ``model(**b)`` or ``model(b)`` takes (dt.calibrate's batches)."""
    return batch["x"] if "x" in batch else batch


STEPS = 6     # training steps per case
# config fields a training run decides rather than the method (AdaLoRA's rank schedule length)
RUN_FIELDS = {"total_step": STEPS}


def config_kwargs(name: str, variant: dict, key: str) -> dict:
    method = dt.get_method(name)
    case = MODELS[key]
    fields = set(method.config_cls.__dataclass_fields__)
    kw = {k: v for k, v in {**RUN_FIELDS, **case.extra}.items() if k in fields}
    if case.patterns is not None and not callable(method.default_targets) and method.hook != "input":
        kw["targets"] = [p for kind in method.kinds for p in case.patterns.get(kind, [])] or None
    kw.update(variant)
    return kw


@dataclasses.dataclass(frozen=True)
class Applicability:
    applies: bool
    reason: str = ""


def applicability(name: str, variant: dict, key: str) -> Applicability:
    """Whether the method has anything to wrap in this model, by the test's own statement of its
    targets (expected_targets); computed on the family's tiny model for the slow tier."""
    case = MODELS[key]
    method = dt.get_method(name)
    if case.patterns is not None and not callable(method.default_targets) and method.hook != "input":
        if not any(case.patterns.get(k) for k in method.kinds):
            return Applicability(False, f"{name} wraps {', '.join(method.kinds)}; {key} targets none of those")
    cfg = dt.config(name, **config_kwargs(name, variant, key))
    proxy = PROXY.get(key, key)
    if MODELS[proxy].needs and not hasattr(dt, MODELS[proxy].needs):
        return Applicability(True)
    try:
        found = expected_targets(name, cfg, case.family, _prototype(proxy))
    except NoSemantics:
        return Applicability(True)      # the cases then fail, asking for the statement
    if not found:
        return Applicability(False, f"{name}'s targets select nothing in a {case.family} model")
    return Applicability(True)


@dataclasses.dataclass(frozen=True)
class Case:
    method: str
    variant: tuple      # sorted (field, value) pairs, hashable for the lifecycle cache
    key: str

    @property
    def variant_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.variant}


def _freeze(variant: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in variant.items()))


def all_cases() -> tuple[list, list]:
    """(lifecycle cases, not-applicable cases) as pytest params."""
    run, refused = [], []
    for name in dt.available_methods():
        method = dt.get_method(name)
        for variant in [{}] + list(method.variants):
            for key, case in MODELS.items():
                if (case.only_named_defaults and callable(method.default_targets)) or (variant and not case.variants):
                    continue
                vid = ",".join(f"{k}={v}" for k, v in variant.items() if k != "init_token_ids") or "defaults"
                marks = [pytest.mark.slow] if case.slow else []
                where = applicability(name, variant, key)
                param = pytest.param(Case(name, _freeze(variant), key), id=f"{name}[{vid}]-{key}", marks=marks)
                (run if where.applies else refused).append(param)
    return run, refused


def _collect() -> tuple[list, list]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)        # building the tiny prototypes (see conftest.py)
    try:
        return all_cases()
    finally:
        torch.set_num_threads(previous)


RUN_CASES, REFUSED_CASES = _collect()
