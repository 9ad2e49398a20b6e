"""The ``lm`` task (``deltatune.train.lm``): reading Moby Dick from the R lazy-load database,
packing and the split, the causal-LM wrapper's loss, token-weighted perplexity, methods with their
default targets on a Llama layout, and the training loop end to end. The mechanics use a tiny
Llama built from a config (random weights); the real SmolLM2 test is marked slow."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import deltatune as dt  # noqa: E402
from deltatune.core.errors import DeltatuneError  # noqa: E402
from deltatune.train import lm  # noqa: E402
from deltatune.train.loop import TrainArgs, train  # noqa: E402
from deltatune.train.tasks import TaskSetup  # noqa: E402

VOCAB = 97


def tiny_lm(seed: int = 0) -> lm.CausalLMTask:
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64)
    torch.manual_seed(seed)
    return lm.CausalLMTask(transformers.LlamaForCausalLM(cfg))


def hand_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Sum of -log p(ids[b, t + 1] | logits[b, t]) over every position, and the count."""
    total, n = 0.0, 0
    logp = torch.log_softmax(logits.double(), dim=-1)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            total -= float(logp[b, t, ids[b, t + 1]])
            n += 1
    return total, n


# ------------------------------------------------------------------------------ the wrapper


def test_loss_is_shifted_cross_entropy():
    model = tiny_lm().eval()
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, loss = model(ids, labels=ids)
        plain = model.lm(input_ids=ids).logits
    assert logits.shape == (3, 12, VOCAB)
    torch.testing.assert_close(logits, plain)
    total, n = hand_nll(logits, ids)
    assert n == 3 * 11
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(total / n, rel=1e-5)
    assert model(ids)[1] is None


def test_loss_ignores_masked_labels():
    model = tiny_lm().eval()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, 5:] = -100
    with torch.no_grad():
        logits, loss = model(ids, labels=labels)
    logp = torch.log_softmax(logits.double(), -1)
    want = -sum(float(logp[b, t, ids[b, t + 1]]) for b in range(2) for t in range(4)) / 8
    assert float(loss) == pytest.approx(want, rel=1e-5)


def test_config_is_the_inner_models():
    model = tiny_lm()
    assert model.config is model.lm.config
    assert model.config.model_type == "llama"


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prompt_tuning"])
def test_methods_attach_with_default_targets(method):
    model = tiny_lm()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    dt.attach(model, dt.config(method))
    trainable, total = dt.count_parameters(model)
    assert 0 < trainable < total
    logits, loss = model(ids, labels=ids)
    assert logits.shape == (2, 10, VOCAB)        # prompt tuning's virtual tokens are not in the output
    total_nll, n = hand_nll(logits.detach(), ids)
    assert float(loss.detach()) == pytest.approx(total_nll / n, rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for _, p in dt.trainable_parameters(model))


def test_prompt_tuning_changes_the_predictions():
    model = tiny_lm().eval()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(ids)[0]
        dt.attach(model, dt.config("prompt_tuning", num_virtual_tokens=4))
        after = model(ids)[0]
    assert after.shape == before.shape
    assert not torch.allclose(after, before)


def test_lora_training_lowers_the_loss_on_a_repeated_block():
    model = tiny_lm()
    dt.attach(model, dt.config("lora", r=4, alpha=8))
    block = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(5))
    batch = {"input_ids": block.repeat(4, 1), "labels": block.repeat(4, 1)}
    opt = torch.optim.AdamW([p for _, p in dt.trainable_parameters(model)], lr=3e-2)
    model.train()
    losses = []
    for _ in range(30):
        _, loss = model(**batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    # a random tiny Llama has small output weights: q/v deltas move its near-uniform logits slowly
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=0.1)
    assert losses[-1] < losses[0] - 0.25 and losses[-1] < min(losses[:20])


# ------------------------------------------------------------------------------ evaluation


def test_perplexity_is_token_weighted_over_uneven_batches():
    model = tiny_lm()
    model.train()
    blocks = torch.randint(0, VOCAB, (5, 9), generator=torch.Generator().manual_seed(6))
    split = lm.LMBlocks(blocks)
    out = lm.evaluate_lm(model, split, batch_size=2, device=torch.device("cpu"))    # batches of 2, 2, 1
    assert model.training                                                       # train mode restored
    with torch.no_grad():
        logits = model.eval()(blocks)[0]
    total, n = hand_nll(logits, blocks)
    assert out["test_loss"] == pytest.approx(total / n, rel=1e-5)
    assert out["test_perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)
    # the same whatever the batch size (a mean of batch means would weigh the last block double)
    out3 = lm.evaluate_lm(model, split, batch_size=3, device=torch.device("cpu"))
    assert out3["test_loss"] == pytest.approx(out["test_loss"], rel=1e-6)


# ------------------------------------------------------------------------------ packing and the split


def test_pack_cuts_consecutive_full_blocks():
    blocks = lm.pack(list(range(1003)), 10)
    assert blocks.shape == (100, 10) and blocks.dtype == torch.long
    for i in range(100):
        assert blocks[i].tolist() == list(range(10 * i, 10 * i + 10))
    with pytest.raises(DeltatuneError):
        lm.pack(list(range(10)), 1)


def test_pack_book_split_is_disjoint_complete_and_deterministic():
    ids = torch.arange(100_000)
    block = 64
    train_split, test_split = lm.pack_book(ids, block, train_tokens=None, test_tokens=None)
    train_tokens = set(train_split.blocks.flatten().tolist())
    test_tokens = set(test_split.blocks.flatten().tolist())
    assert not train_tokens & test_tokens
    # every token is in exactly one block, except the tail shorter than a block
    n_blocks = 100_000 // block
    assert len(train_split) + len(test_split) == n_blocks
    assert train_tokens | test_tokens == set(range(n_blocks * block))
    # whole segments of SEGMENT_TOKENS // block blocks, every TEST_EVERY-th one to test
    seg = lm.SEGMENT_TOKENS // block
    first_test = [int(b[0]) // block for b in test_split.blocks[:seg]]
    assert first_test == list(range(seg * (lm.TEST_EVERY - 1), seg * lm.TEST_EVERY))
    assert 0.08 < len(test_split) / n_blocks < 0.12
    # blocks stay contiguous slices of the stream
    for b in test_split.blocks:
        assert b.tolist() == list(range(int(b[0]), int(b[0]) + block))
    again = lm.pack_book(ids, block, train_tokens=None, test_tokens=None)
    assert torch.equal(again[0].blocks, train_split.blocks) and torch.equal(again[1].blocks, test_split.blocks)


def test_pack_book_subsets_are_spread_and_sized_in_tokens():
    ids = torch.arange(300_000)
    train_split, test_split = lm.pack_book(ids, 128)
    assert len(train_split) == lm.TRAIN_TOKENS // 128 and len(test_split) == lm.TEST_TOKENS // 128
    assert not set(train_split.blocks.flatten().tolist()) & set(test_split.blocks.flatten().tolist())
    starts = train_split.blocks[:, 0]
    assert int(starts[0]) < 10_000 and int(starts[-1]) > 280_000     # across the whole stream
    assert bool((starts[1:] > starts[:-1]).all())
    assert len(lm.pack_book(ids, 256)[0]) == lm.TRAIN_TOKENS // 256
    with pytest.raises(DeltatuneError, match="max-length"):
        lm.pack_book(torch.arange(1000), 128)


def test_spread():
    assert lm.spread(list(range(10)), 5) == [1, 3, 5, 7, 9]
    assert lm.spread([4, 5], 5) == [4, 5]
    assert lm.spread([4, 5], None) == [4, 5]


def test_blocks_follow_the_split_protocol():
    blocks = torch.arange(50).view(10, 5)
    split = lm.LMBlocks(blocks)
    assert len(split) == 10 and split.num_batches(4) == 3 and split.num_tokens == 50
    batches = list(split.batches(4, [9, 0, 3, 1, 2, 4, 5, 6, 7, 8]))
    assert [b["input_ids"].shape for b in batches] == [(4, 5), (4, 5), (2, 5)]
    assert batches[0]["input_ids"][:, 0].tolist() == [45, 0, 15, 5]
    for b in batches:
        assert set(b) == {"input_ids", "labels"} and b["input_ids"].dtype == torch.long
        assert torch.equal(b["labels"], b["input_ids"]) and b["labels"].data_ptr() != b["input_ids"].data_ptr()
    batches[0]["labels"][:] = -100          # a caller's in-place change does not reach the data
    assert int(split.blocks.min()) == 0
    order = split.grouped_order(4, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(10))
    assert order == split.grouped_order(4, torch.Generator().manual_seed(0))
    assert split.length_order() == list(range(10))


# ------------------------------------------------------------------------------ the text


def _have_moby_dick() -> str | None:
    if not (lm.RDATA_DIR / "Rdata.rdb").is_file():
        return "the Debian package r-cran-tokenizers is not installed"
    try:
        import rdata  # noqa: F401
    except ImportError:
        return "the PyPI package rdata is not installed"
    return None


@pytest.mark.skipif(_have_moby_dick() is not None, reason=str(_have_moby_dick()))
def test_read_moby_dick():
    text = lm.read_moby_dick()
    assert 1_250_000 < len(text) < 1_270_000
    assert len(text) == 1_257_293
    assert text.startswith("The Project Gutenberg EBook of Moby Dick; or The Whale, by Herman Melville")
    book = lm.book_text(text)
    assert "CHAPTER 1. Loomings.\n\n\nCall me Ishmael. Some years ago" in book
    assert "*** START OF" not in book and "Project Gutenberg License" not in book and "\r" not in book
    assert book.rstrip().endswith("only found another\norphan.")
    assert 1_200_000 < len(book) < 1_220_000


def test_missing_package_names_the_install(tmp_path):
    with pytest.raises(DeltatuneError, match="apt-get install r-cran-tokenizers.*pip install rdata"):
        lm.read_moby_dick(tmp_path)


# ------------------------------------------------------------------------------ the loop


def _tiny_setup(args):
    ids = torch.randint(0, VOCAB, (40_000,), generator=torch.Generator().manual_seed(7))
    train_split, test_split = lm.pack_book(ids, args.max_length, train_tokens=16 * args.max_length,
                                           test_tokens=8 * args.max_length)
    return TaskSetup(description="tiny lm", model=tiny_lm(), train=train_split, test=test_split,
                     evaluate=lm.evaluate_lm, model_name="tiny-llama", metric="test_perplexity", head=None)


def test_train_loop_runs_the_lm_task(tmp_path, monkeypatch):
    monkeypatch.setattr(lm, "setup", _tiny_setup)
    out = tmp_path / "run"
    metrics = train(TrainArgs(data="lm", method="lora", epochs=1, batch_size=4, eval_batch_size=3, max_length=16,
                              out=str(out), progress=False))
    assert metrics["metric"] == "test_perplexity"
    assert metrics["num_train"] == 16 and metrics["num_test"] == 8 and metrics["steps"] == 4
    assert math.exp(metrics["test_loss"]) == pytest.approx(metrics["test_perplexity"])
    assert metrics["head_lr"] is None and metrics["method_config"]["trainable_modules"] == []
    assert (out / "adapter.safetensors").is_file()
    assert json.loads((out / "metrics.json").read_text())["test_perplexity"] == metrics["test_perplexity"]
    with pytest.raises(DeltatuneError, match="no new head"):
        train(TrainArgs(data="lm", method="head", epochs=1, batch_size=4, max_length=16, out=str(tmp_path / "h"),
                        progress=False))


# ------------------------------------------------------------------------------ the real model


@pytest.mark.slow
@pytest.mark.skipif(_have_moby_dick() is not None, reason=str(_have_moby_dick()))
def test_smollm2_on_moby_dick():
    task = lm.setup(TrainArgs(data="lm", max_length=128))
    assert task.head is None and task.metric == "test_perplexity" and task.model_name == "smollm2"
    assert len(task.train) == lm.TRAIN_TOKENS // 128 and len(task.test) == lm.TEST_TOKENS // 128
    assert task.model.config.model_type == "llama"
    few = lm.LMBlocks(task.test.blocks[:4])
    out = lm.evaluate_lm(task.model, few, 4, torch.device("cpu"))
    assert 5 < out["test_perplexity"] < 300      # a random LM would be near the vocabulary size, 49,152
