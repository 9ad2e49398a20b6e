"""dt.memory_report, the live-bytes tracker and ``deltatune plan``.

Expected sizes come from formulas over the tiny models' configs written here; measured peaks come
from the allocator (the profiler's allocation events), never from the tracker under test; the
training step the plans are held against is written out here as ``deltatune train`` runs it."""

from __future__ import annotations

import json
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import deltatune as dt  # noqa: E402
from deltatune.core.errors import DeltatuneError  # noqa: E402
from deltatune.measure import allocator_peak  # noqa: E402
from deltatune.memory import TensorTracker, memory_report, predict_state_bytes  # noqa: E402
from deltatune.optim import OPTIMIZERS, build_optimizer  # noqa: E402
from deltatune.plan import RunSpec, build_model, main, plan_for_train, plan_training  # noqa: E402
from deltatune.planner import plan_model  # noqa: E402
from deltatune.train.lm import CausalLMTask  # noqa: E402
from deltatune.train.model import TextClassifier  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

H, I, LAYERS, VOCAB, POS, LABELS = 32, 64, 2, 512, 64, 5      # the tiny BERT
LH, LI, LKV, HEAD_DIM = 64, 128, 2, 16                         # the tiny Llama (4 heads of 16, 2 kv heads)


def tiny_bert(labels: int = LABELS) -> TextClassifier:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4,
                                  intermediate_size=I, max_position_embeddings=POS)
    torch.manual_seed(0)
    return TextClassifier(transformers.BertModel(cfg), labels)


def tiny_llama(tied: bool = False) -> CausalLMTask:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=LH, intermediate_size=LI, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=LKV, max_position_embeddings=128,
                                   tie_word_embeddings=tied)
    torch.manual_seed(0)
    return CausalLMTask(transformers.LlamaForCausalLM(cfg))


def bert_params() -> int:
    embeddings = VOCAB * H + POS * H + 2 * H + 2 * H            # word, position, token type, LayerNorm
    layer = 4 * (H * H + H) + 2 * H + (H * I + I) + (I * H + H) + 2 * H
    return embeddings + LAYERS * layer          # TextClassifier drops BERT's unused pooler


def llama_params(tied: bool) -> int:
    kv = LKV * HEAD_DIM
    layer = 2 * LH * LH + 2 * LH * kv + 3 * LH * LI + 2 * LH    # q, o; k, v; gate, up, down; two RMSNorms
    return VOCAB * LH * (1 if tied else 2) + LAYERS * layer + LH


def lora_bert_params(r: int) -> int:
    return LAYERS * 2 * (r * H + H * r) + (H * LABELS + LABELS)    # query, value; the new head


def text_batch(b: int = 4, t: int = 32) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (b, t))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, LABELS, (b,))}


def lm_batch(b: int = 4, t: int = 32) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (b, t))
    return {"input_ids": ids, "labels": ids.clone()}


def lora(model: torch.nn.Module, r: int = 4, head: bool = True) -> torch.nn.Module:
    return dt.attach(model, dt.config("lora", r=r, trainable_modules=["classifier"] if head else []))


def full(model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------- memory_report

def test_memory_report_counts_frozen_trainable_and_gradients_from_the_shapes():
    model = lora(tiny_bert(), r=4)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    report = memory_report(model)
    assert report.trainable_bytes == 4 * lora_bert_params(4)
    # trainable_modules trains a copy of the head; the frozen original stays (dt.unload restores it)
    assert report.frozen_bytes == 4 * (bert_params() + H * LABELS + LABELS) + buffers
    assert report.gradient_bytes == 0 and report.expected_gradient_bytes == 4 * lora_bert_params(4)
    _, loss = model(**text_batch())
    loss.backward()
    assert memory_report(model).gradient_bytes == 4 * lora_bert_params(4)
    assert report.optimizer is None and "trainable weights" in str(report)


def test_memory_report_counts_tied_weights_once():
    tied = memory_report(full(tiny_llama(tied=True)))
    assert tied.trainable_bytes == 4 * llama_params(tied=True)
    assert memory_report(full(tiny_llama(tied=False))).trainable_bytes == 4 * llama_params(tied=False)


def test_adamw_state_predicted_before_the_first_step_and_counted_after():
    model = lora(tiny_bert(), r=4)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    before = memory_report(model, opt)
    assert before.optimizer_state_bytes == 0
    _, loss = model(**text_batch())
    loss.backward()
    opt.step()
    step_tensors = sum(opt.state[p]["step"].numel() * opt.state[p]["step"].element_size() for p in params)
    expected = 2 * 4 * lora_bert_params(4) + step_tensors
    assert memory_report(model, opt).optimizer_state_bytes == expected
    assert before.predicted_optimizer_state_bytes == expected
    assert before.expected_total_bytes == before.frozen_bytes + 2 * before.trainable_bytes + expected


@pytest.mark.parametrize("momentum, factor", [(0.9, 1), (0.0, 0)])
def test_sgd_state_is_one_buffer_per_parameter_with_momentum(momentum, factor):
    model = lora(tiny_bert(), r=4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2, momentum=momentum)
    assert predict_state_bytes(opt) == factor * 4 * lora_bert_params(4)
    _, loss = model(**text_batch())
    loss.backward()
    opt.step()
    assert memory_report(model, opt).optimizer_state_bytes == factor * 4 * lora_bert_params(4)


class _Codes:
    """A custom state object: quantised codes that report their own size."""
    nbytes = 1000


class _Blob:
    def state_bytes(self) -> int:
        return 24


def test_optimizer_state_recurses_into_containers_and_custom_objects():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = torch.optim.SGD([p], lr=0.1)
    shared = torch.zeros(5)
    opt.state[p] = {"m": torch.zeros(3, 4), "nested": [shared, {"again": shared}], "codes": _Codes(),
                    "blob": _Blob(), "count": 7, "odd": object()}
    report = memory_report(torch.nn.Linear(1, 1), opt)
    assert report.optimizer_state_bytes == 4 * 12 + 4 * 5 + 1000 + 24
    assert report.uncounted_state == ["object"] and "not counted: object" in str(report)


class _Own(torch.optim.SGD):
    def state_bytes(self) -> int:
        return 123

    @classmethod
    def predict_state_bytes(cls, param_groups: list[dict]) -> int:
        return sum(p.numel() * g["rank_bytes"] for g in param_groups for p in g["params"])


class _Planned(torch.optim.SGD):
    def planned_state_bytes(self) -> int:
        return 77


class _Unknown(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {})


def test_optimizer_hooks_are_asked_and_unknown_states_say_so():
    p = torch.nn.Parameter(torch.zeros(6))
    own = _Own([{"params": [p], "rank_bytes": 3}], lr=0.1)
    report = memory_report(torch.nn.Linear(1, 1), own)
    assert report.optimizer_state_bytes == 123 and report.predicted_optimizer_state_bytes == 18
    assert _Own.predict_state_bytes([{"params": [torch.empty(4, 5, device="meta")], "rank_bytes": 2}]) == 40
    assert memory_report(torch.nn.Linear(1, 1), _Planned([p], lr=0.1)).predicted_optimizer_state_bytes == 77
    unknown = memory_report(torch.nn.Linear(1, 1), _Unknown([p]))
    assert unknown.predicted_optimizer_state_bytes is None and unknown.expected_total_bytes is None
    assert "unknown" in str(unknown)


# ----------------------------------------------------------------------------- the tracker

def test_tracker_counts_each_storage_once_until_it_is_freed():
    x = torch.zeros(1000, 1000)                 # 4 MB, there before the tracker: adopted
    tracker = TensorTracker()
    tracker.adopt([x])
    with tracker:
        y = x * 2                               # + 4 MB
        v = y.view(-1)                          # a view: + 0
        z = v + 1                               # + 4 MB: 12 MB alive
        del y, v
        w = z * 3                               # y's storage is gone: 12 MB again
        del z, w
    assert tracker.peak == 3 * 4_000_000
    assert tracker.live == 4_000_000


def test_tracker_on_real_tensors_agrees_with_the_allocator():
    model = lora(tiny_bert(), r=4)
    batch = text_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tracker = TensorTracker()
    tracker.adopt(list(model.parameters()) + list(model.buffers()) + list(batch.values()))
    start = tracker.live

    def steps():
        with tracker:
            for _ in range(2):
                _, loss = model(**batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
    peak = allocator_peak(steps)
    assert tracker.peak == pytest.approx(start + peak, rel=0.01)


# ----------------------------------------------------------------------------- plans vs real steps

def measured_peak(model, batch, optimizer: str, checkpointing: bool) -> int:
    """Two steps as ``deltatune train`` runs them; the allocator's peak plus what was alive at the
    start (weights, buffers, the batch)."""
    if checkpointing:
        from deltatune.train.activations import enable_gradient_checkpointing
        enable_gradient_checkpointing(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(optimizer, dt.parameter_groups(model, 1e-3), 1e-3, 0.01)
    start = memory_report(model).total_bytes + sum(v.nbytes for v in batch.values())

    def loop():
        opt.zero_grad(set_to_none=True)
        for _ in range(2):
            _, loss = model(**batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return start + allocator_peak(loop)


def _checkpointing_available() -> bool:
    try:
        from deltatune.train.activations import enable_gradient_checkpointing  # noqa: F401
    except ImportError:
        return False
    return True


CASES = [("lora", "adamw"), ("full", "adamw"), ("full", "coap_adamw")]


@pytest.mark.parametrize("build, batch", [(tiny_bert, text_batch), (tiny_llama, lm_batch)], ids=["bert", "llama"])
@pytest.mark.parametrize("method, optimizer", CASES, ids=["-".join(c) for c in CASES])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointing"])
def test_plan_predicts_the_measured_peak_within_15_percent(build, batch, method, optimizer, checkpointing):
    if optimizer not in OPTIMIZERS:
        pytest.skip(f"{optimizer} is not registered yet")
    if checkpointing and not _checkpointing_available():
        pytest.skip("deltatune.train.activations.enable_gradient_checkpointing is not there yet")
    model = lora(build(), head=build is tiny_bert) if method == "lora" else full(build())
    b = batch()
    plan = plan_model(model, b, optimizer, gradient_checkpointing=checkpointing)
    assert all(p.device.type == "cpu" and type(p) is torch.nn.Parameter for p in model.parameters())   # untouched
    measured = measured_peak(model, b, optimizer, checkpointing)
    assert plan.peak_bytes == pytest.approx(measured, rel=0.15)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_chunked_lm_loss_is_planned_as_it_runs(method):
    """The lm task's default loss never forms the tokens x vocabulary logits: on fake tensors too
    (its exactness check and its label check cannot read values there), so its plan is below the
    plain loss's by at least the float32 logits and still within 15 % of two real steps."""
    def build(chunked: bool):
        model = tiny_llama()
        model.chunked_loss = chunked
        return lora(model, head=False) if method == "lora" else full(model)
    b = lm_batch(8, 64)
    plain = plan_model(build(False), b, "adamw")
    chunked_model = build(True)
    chunked = plan_model(chunked_model, b, "adamw")
    logits = 8 * 64 * VOCAB * 4
    assert chunked.peak_bytes <= plain.peak_bytes - logits
    assert chunked.peak_bytes == pytest.approx(measured_peak(chunked_model, b, "adamw", False), rel=0.15)


def test_checkpointing_and_zeroth_order_plans_keep_fewer_activations():
    model, b = full(tiny_llama()), lm_batch()
    plain = plan_model(model, b, "adamw")
    if _checkpointing_available():
        assert plan_model(model, b, "adamw", gradient_checkpointing=True).activation_bytes < plain.activation_bytes / 2
    if "mezo" in OPTIMIZERS:
        mezo = plan_model(model, b, "mezo")
        assert mezo.activation_bytes == 0 and mezo.gradient_bytes == 0 and mezo.peak_bytes < plain.peak_bytes


# ----------------------------------------------------------------------------- the built-in runs

def minilm_params() -> tuple[int, int]:
    """MiniLM-L6 (BERT: 6 layers, hidden 384, FFN 1536, vocabulary 30522, 512 positions; the pooler dropped)."""
    h, i, layers = 384, 1536, 6
    embeddings = 30522 * h + 512 * h + 2 * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    return embeddings + layers * layer, layers * 2 * (8 * h + h * 8) + (h * 5 + 5)


def test_plan_training_builds_minilm_on_meta_and_accounts_for_its_shapes():
    model = build_model(RunSpec(model="minilm", method="lora", method_options={"r": 8}))
    assert {p.device.type for p in model.parameters()} == {"meta"}        # no weights read
    plan = plan_training(model="minilm", method="lora", method_options={"r": 8}, batch_size=4, max_length=32)
    base, lora_params = minilm_params()
    assert plan.trainable_bytes == 4 * lora_params and plan.gradient_bytes == 4 * lora_params
    # + the frozen original of the trained head copy, the position and token type id buffers (int64)
    assert plan.frozen_bytes - 4 * base == 4 * (384 * 5 + 5) + 2 * 512 * 8
    adamw = 2 * 4 * lora_params + 4 * sum(1 for p in model.parameters() if p.requires_grad)
    assert plan.optimizer_state_bytes == adamw
    assert plan.peak_bytes > plan.frozen_bytes + plan.activation_bytes
    assert plan.process_peak_bytes == plan.runtime_bytes + plan.peak_bytes
    assert "tensor peak" in str(plan) and "activations" in str(plan)
    bigger = plan_training(model="minilm", method="lora", method_options={"r": 8}, batch_size=8, max_length=32)
    assert bigger.activation_bytes == pytest.approx(2 * plan.activation_bytes, rel=0.02)


def test_unknown_names_are_refused_with_the_valid_ones():
    with pytest.raises(DeltatuneError, match="minilm, smollm2"):
        plan_training(model="bert-large")
    with pytest.raises(DeltatuneError, match="baselines full, head and .*lora"):
        plan_training(method="lorra")
    with pytest.raises(DeltatuneError, match="adamw.*sgd"):
        plan_training(optimizer="adamx")
    with pytest.raises(DeltatuneError, match="smollm2 is for lm"):
        plan_training(model="smollm2", data="bbc")
    with pytest.raises(DeltatuneError, match="--batch-size"):
        plan_training(batch_size=0)


def test_checkpointing_without_the_activations_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "deltatune.train.activations", None)      # import now raises
    with pytest.raises(DeltatuneError, match="enable_gradient_checkpointing"):
        plan_model(lora(tiny_bert()), text_batch(), "adamw", gradient_checkpointing=True)


def test_command_line_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["--model", "minilm", "--method", "lora", "--r", "16", "--batch-size", "2", "--max-length", "16",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "memory plan: lora on minilm (bbc), batch 2 x 16 tokens" in text and "tensor peak" in text
    record = json.loads(out.read_text())
    _, lora8 = minilm_params()
    head = 384 * 5 + 5
    assert record["plan"]["trainable_bytes"] == 4 * (2 * (lora8 - head) + head)       # r=16: twice r=8's
    assert main(["--method", "lorra"]) == 2 and "unknown method 'lorra'" in capsys.readouterr().err


def test_value_dependent_operations_get_the_largest_stand_in_on_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(), TensorTracker(fake=True):
        x = torch.empty(6, 4)
        mask = torch.empty(4, dtype=torch.bool)
        assert x[:, mask].shape == (6, 4) and torch.nonzero(x).shape == (24, 2)
        assert bool(mask.any()) is True and x.sum().item() == 1.0


@pytest.mark.parametrize("method", ["svft", "increlora", "dylora"])
def test_methods_with_value_dependent_setup_or_schedules_can_be_planned(method):
    if method not in dt.available_methods():
        pytest.skip(f"{method} is not registered")
    plan = plan_training(model="minilm", method=method, batch_size=2, max_length=16)
    assert plan.trainable_bytes > 0 and plan.peak_bytes > plan.frozen_bytes


def test_the_plan_train_prints_and_its_refusals():
    from deltatune.train.loop import TrainArgs
    text = plan_for_train(TrainArgs(data="bbc", method="lora", method_options={"r": 8}, batch_size=2, max_length=16))
    assert text.startswith("memory plan: lora on minilm (bbc), batch 2 x 16 tokens") and "tensor peak" in text
    assert plan_for_train(TrainArgs(data="fashion")).startswith("memory plan: none for --data fashion")
    broken = plan_for_train(TrainArgs(data="bbc", method="lora", method_options={"r": 0}))
    assert broken.startswith("memory plan: could not be made (") and "\n" not in broken
