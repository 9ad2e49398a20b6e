"""Activation memory (``deltatune.train.activations``, the chunked loss of ``train/lm.py``) and
the training loop's wiring of it and of zeroth-order optimizers.

Expected values are computed here independently of the code under test: bytes saved for the
backward pass counted with ``saved_tensors_hooks`` against a formula of the model's shapes,
gradients against the plain (unchecked-pointed, unchunked) computation, a zeroth-order
optimizer's bookkeeping against what a dummy optimizer defined here recorded."""

from __future__ import annotations

import copy
import json
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.core.errors import DeltatuneError
from deltatune.optim import OPTIMIZERS
from deltatune.train import activations as act
from deltatune.train import lm
from deltatune.train.loop import TrainArgs, train

pytestmark = pytest.mark.usefixtures("one_thread")

F32 = 4
VOCAB = 97


# ----------------------------------------------------------------------------- a plain stack


class Block(nn.Module):
    """Pre-norm residual MLP block: ``x + dropout(down(gelu(up(norm(x)))))``."""

    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return x + self.drop(self.down(F.gelu(self.up(self.norm(x)))))


class Stack(nn.Module):
    """A frozen embedding, ``L`` blocks in an ``nn.ModuleList``, mean pooling, a linear head."""

    def __init__(self, layers: int = 3, d: int = 16, vocab: int = 50, classes: int = 3, dropout: float = 0.1):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.emb.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(d, dropout) for _ in range(layers))
        self.head = nn.Linear(d, classes)

    def forward(self, ids, labels):
        h = self.emb(ids)
        for block in self.layers:
            h = block(h)
        return F.cross_entropy(self.head(h.mean(1)), labels)


def stack(**kw) -> Stack:
    torch.manual_seed(0)
    return Stack(**kw)


B, T, D, L = 4, 8, 16, 3
IDS = torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1, 2, 0])


def saved_bytes(model: nn.Module, loss_fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass during ``loss_fn()``,
    the model's parameters and buffers left out (they are kept anyway)."""
    resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in resident:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return sum(seen.values())


def grads_of(model: nn.Module, loss_fn, seed: int = 3) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_fn(model)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def lora(model: nn.Module, targets: list[str], dropout: float = 0.1) -> nn.Module:
    """LoRA attached, its factors drawn at random (B starts at zero, which would leave A without
    a gradient and the adapter's output at zero)."""
    dt.attach(model, dt.config("lora", r=4, targets=targets, dropout=dropout))
    with torch.no_grad():
        for i, (_, p) in enumerate(dt.trainable_parameters(model)):
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(i))
    return model


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-6) -> None:
    assert a.keys() == b.keys() and a
    for n in a:
        assert (a[n] - b[n]).abs().max() <= tol, n


def stack_loss(m):
    return m(IDS, Y)


# ----------------------------------------------------------------------------- gradient checkpointing


def test_checkpointing_keeps_only_the_blocks_inputs():
    N = B * T
    outside = saved_bytes(m := stack(layers=0), lambda: m(IDS, Y))      # head, pooling, loss: no block
    plain_model = stack()
    plain = saved_bytes(plain_model, lambda: plain_model(IDS, Y))
    ckpt_model = stack()
    assert act.enable_gradient_checkpointing(ckpt_model) == ["layers.0", "layers.1", "layers.2"]
    ckpt = saved_bytes(ckpt_model, lambda: ckpt_model(IDS, Y))
    # without checkpointing a block saves at least: the norm's input, mean and 1/std, the up
    # projection's input (the norm's output), gelu's input and the down projection's input
    # (4d each), float32; with it, only its input (N x d), the embedding's output for block 0
    per_block_plain = F32 * N * (D + 2 + D + 4 * D + 4 * D)
    assert plain >= outside + L * per_block_plain
    assert ckpt == outside + L * F32 * N * D
    factor = (outside + L * per_block_plain) / (outside + L * F32 * N * D)
    assert factor > 8 and plain / ckpt >= factor


def test_checkpointed_gradients_equal_with_dropout_frozen_embedding_and_lora():
    base = lora(stack(), ["up", "down"])
    assert not base.emb.weight.requires_grad           # the PEFT case: no input requires a gradient
    ckpt = copy.deepcopy(base)
    act.enable_gradient_checkpointing(ckpt)
    loss_a, ga = grads_of(base, stack_loss)
    loss_b, gb = grads_of(ckpt, stack_loss)
    assert any("lora" in n or "delta" in n for n in ga) and all(g.abs().sum() > 0 for g in gb.values())
    assert loss_a == loss_b
    assert_same_grads(ga, gb)
    # dropout is really on: another seed draws other masks, other gradients
    _, gc = grads_of(base, stack_loss, seed=4)
    assert max((ga[n] - gc[n]).abs().max() for n in ga) > 1e-4
    # adapters keep their names: saving does not see the checkpointing
    assert [n for n, _ in dt.trainable_parameters(ckpt)] == [n for n, _ in dt.trainable_parameters(base)]


def test_reentrant_checkpointing_behind_a_frozen_embedding_starves_the_adapters():
    """Why the non-reentrant variant: the reentrant one sees no input that requires a gradient
    and leaves the adapters inside the block without one."""
    model = lora(stack(), ["up", "down"])
    model.train()
    h = model.emb(IDS)
    with pytest.warns(UserWarning):
        for block in model.layers:
            h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=True)
    if h.requires_grad:         # some versions raise on backward, others leave the output detached
        F.cross_entropy(model.head(h.mean(1)), Y).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if p.requires_grad and "layers" in n)


def test_checkpointing_before_attach_gives_the_same_gradients():
    early = stack()
    act.enable_gradient_checkpointing(early)
    lora(early, ["up", "down"])
    late = lora(stack(), ["up", "down"])
    _, ga = grads_of(late, stack_loss)
    _, gb = grads_of(early, stack_loss)
    assert_same_grads(ga, gb)


def test_evaluation_and_no_grad_run_the_plain_forward():
    model = stack()
    act.enable_gradient_checkpointing(model)
    calls = []
    real = torch.utils.checkpoint.checkpoint
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(act, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
        model.eval()
        model(IDS, Y).backward()
        model.train()
        with torch.no_grad():
            model(IDS, Y)
        assert calls == []
        model(IDS, Y)
        assert len(calls) == L


def test_disable_restores_the_plain_forward():
    model = stack()
    plain = saved_bytes(model, lambda: model(IDS, Y))
    act.enable_gradient_checkpointing(model)
    assert act.is_gradient_checkpointing(model)
    assert saved_bytes(model, lambda: model(IDS, Y)) < plain
    act.disable_gradient_checkpointing(model)
    assert not act.is_gradient_checkpointing(model)
    assert saved_bytes(model, lambda: model(IDS, Y)) == plain


class ConvBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + F.relu(self.bn(self.conv(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*(ConvBlock(8) for _ in range(3)))
        self.fc = nn.Linear(8, 2)

    def forward(self, x, y):
        return F.cross_entropy(self.fc(self.blocks(self.stem(x)).mean((2, 3))), y)


def test_batchnorm_statistics_move_once_under_checkpointing():
    """Full fine-tuning of a convnet: the recomputation must not update the BatchNorm running
    statistics a second time."""
    torch.manual_seed(0)
    plain = ConvNet()
    ckpt = copy.deepcopy(plain)
    assert act.enable_gradient_checkpointing(ckpt) == ["blocks.0", "blocks.1", "blocks.2"]
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 1, 0])
    _, ga = grads_of(plain, lambda m: m(x, y))
    _, gb = grads_of(ckpt, lambda m: m(x, y))
    assert_same_grads(ga, gb)
    for (n, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        assert torch.equal(a, b), n
    assert int(ckpt.blocks[0].bn.num_batches_tracked) == 1


def test_checkpointing_errors_name_the_fix():
    with pytest.raises(DeltatuneError, match=r"no repeated blocks.*blocks=\[\.\.\.\]"):
        act.enable_gradient_checkpointing(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    with pytest.raises(DeltatuneError, match="no module 'layers.7'.*layers.0"):
        act.enable_gradient_checkpointing(stack(), blocks=["layers.7"])
    model = stack()
    assert act.enable_gradient_checkpointing(model, blocks=["layers.1"]) == ["layers.1"]
    assert act.is_gradient_checkpointing(model)


# ----------------------------------------------------------------------------- transformers models


def tiny_bert():
    from models import tiny_bert_classifier
    return lora(tiny_bert_classifier(), ["query", "value"])


def tiny_llama():
    # dropout in every layer: the masks must be replayed
    return lora(tiny_causal_lm(False, dropout=0.1), ["q_proj", "v_proj", "down_proj"])


HF_IDS = torch.randint(5, 97, (3, 16), generator=torch.Generator().manual_seed(5))


def bert_loss(m):
    return m(HF_IDS, torch.ones_like(HF_IDS)).square().mean()


def llama_loss(m):
    return m(input_ids=HF_IDS, labels=HF_IDS).loss


@pytest.mark.parametrize("build,loss_fn,layers", [(tiny_bert, bert_loss, ["encoder.encoder.layer.0",
                                                                          "encoder.encoder.layer.1"]),
                                                  (tiny_llama, llama_loss, ["model.layers.0", "model.layers.1"])])
def test_transformers_models_checkpoint_their_layers(build, loss_fn, layers):
    pytest.importorskip("transformers")
    base = build()
    ckpt = copy.deepcopy(base)
    assert act.enable_gradient_checkpointing(ckpt) == layers
    loss_a, ga = grads_of(base, loss_fn)
    loss_b, gb = grads_of(ckpt, loss_fn)
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert_same_grads(ga, gb)
    _, gc = grads_of(base, loss_fn, seed=4)             # the dropout masks matter
    assert max((ga[n] - gc[n]).abs().max() for n in ga) > 1e-5
    plain = saved_bytes(base, lambda: loss_fn(base))
    kept = saved_bytes(ckpt, lambda: loss_fn(ckpt))
    # a layer saves a dozen tensors of the hidden size or larger; checkpointed it keeps its input
    assert kept < plain / 3


def test_transformers_input_grad_hook_is_not_left_behind():
    """Non-reentrant checkpointing needs no input that requires a gradient: the hook transformers
    adds for the reentrant variant is removed (it would differentiate the first layer for
    nothing), unless the user had set it up before."""
    ids = HF_IDS[:1, :4]
    model = tiny_bert()
    act.enable_gradient_checkpointing(model)
    assert not model.encoder.get_input_embeddings()(ids).requires_grad
    own = tiny_bert()
    own.encoder.enable_input_require_grads()
    act.enable_gradient_checkpointing(own)
    assert own.encoder.get_input_embeddings()(ids).requires_grad


def test_prefix_tuning_refuses_checkpointing():
    model = tiny_causal_lm(False)
    dt.attach(model, dt.config("prefix_tuning"))
    with pytest.raises(DeltatuneError, match="key/value-prefix.*without --gradient-checkpointing"):
        act.enable_gradient_checkpointing(model)


# ----------------------------------------------------------------------------- activation offload


def test_offload_is_refused_on_the_cpu(tmp_path, monkeypatch):
    with pytest.raises(DeltatuneError, match="computes on the CPU.*--gradient-checkpointing"):
        act.offload_activations("cpu", stack())

    def never(args):
        raise AssertionError("refused before the task loads")

    import deltatune.train.loop as loop
    monkeypatch.setattr(loop, "setup_task", never)
    with pytest.raises(DeltatuneError, match="--offload-activations"):
        train(TrainArgs(data="bbc", device="cpu", offload_activations=True, progress=False, out=str(tmp_path / "r")))


def saved_tensors(model: nn.Module) -> list[tuple[int, bool]]:
    """(bytes, is a parameter or buffer of the model) of each tensor saved in one training step."""
    resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    out = []

    def pack(t):
        out.append((t.numel() * t.element_size(), t.untyped_storage().data_ptr() in resident))
        return t

    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(IDS, Y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return out


def test_offload_hooks_see_every_saved_tensor_and_keep_other_devices():
    model = stack()
    model.train()
    expected = saved_tensors(model)
    assert any(resident for _, resident in expected)       # the weights are saved too (and must stay)
    _, plain = grads_of(model, stack_loss)
    hooks = act.ActivationOffload(torch.device("cuda"), model, pin_memory=False)   # a device these tensors are not on
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    with hooks:
        loss = model(IDS, Y)
    loss.backward()
    assert hooks.kept_tensors == len(expected) and hooks.offloaded_tensors == 0 == hooks.offloaded_bytes
    assert_same_grads(plain, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, tol=0)
    model(IDS, Y).backward()                                # outside the context: no hook runs
    assert hooks.kept_tensors == len(expected)


def test_offload_moves_activations_not_weights():
    """The mechanics, with the host standing in for the accelerator: every activation of at
    least ``min_bytes`` goes through a host copy and back, parameters never do."""
    model = stack()
    model.train()
    expected = saved_tensors(model)
    min_bytes = 1024
    moved = [b for b, resident in expected if not resident and b >= min_bytes]
    assert 0 < len(moved) < len(expected)
    _, plain = grads_of(model, stack_loss)
    hooks = act.ActivationOffload(torch.device("cpu"), model, min_bytes=min_bytes)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    with hooks:
        loss = model(IDS, Y)
    loss.backward()
    assert hooks.offloaded_tensors == len(moved) and hooks.offloaded_bytes == sum(moved)
    assert hooks.kept_tensors == len(expected) - len(moved)
    assert_same_grads(plain, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, tol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_on_a_gpu():
    model = stack().cuda()
    ids, y = IDS.cuda(), Y.cuda()
    _, plain = grads_of(model, lambda m: m(ids, y))
    hooks = act.offload_activations("cuda", model, min_bytes=0)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    with hooks:
        loss = model(ids, y)
    loss.backward()
    assert hooks.offloaded_bytes > 0
    assert_same_grads(plain, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, tol=0)


# ----------------------------------------------------------------------------- the chunked LM loss


def tiny_causal_lm(tie: bool, seed: int = 0, dropout: float = 0.0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                                   tie_word_embeddings=tie, attention_dropout=dropout)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


LM_IDS = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))


def lm_labels() -> torch.Tensor:
    labels = LM_IDS.clone()
    labels[0, 3:6] = -100
    labels[2, -1] = -100
    return labels


def hand_mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    logp = torch.log_softmax(logits.double(), -1)
    total, n = 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] != -100:
                total -= float(logp[b, t, labels[b, t + 1]])
                n += 1
    return total / n


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk", [None, 5, 64])
def test_chunked_loss_equals_the_plain_loss_full_fine_tuning(tie, chunk):
    model = tiny_causal_lm(tie)
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    labels = lm_labels()
    model.train()
    logits = model(input_ids=LM_IDS).logits
    plain = lm.causal_lm_loss(logits, labels)
    plain.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    hidden = model.model(input_ids=LM_IDS).last_hidden_state
    chunked = lm.chunked_causal_lm_loss(hidden, model.lm_head, labels, chunk_tokens=chunk)
    assert float(chunked.detach()) == pytest.approx(hand_mean_nll(logits.detach(), labels), abs=1e-5)
    assert abs(float(chunked.detach()) - float(plain.detach())) <= 1e-5
    chunked.backward()
    for n, p in model.named_parameters():
        assert (p.grad - want[n]).abs().max() <= 1e-5, n


def test_chunked_loss_with_an_adapter_on_the_head():
    """A wrapped head (LoRA on lm_head) takes the checkpoint-per-chunk path."""
    model = lora(tiny_causal_lm(False), ["lm_head", "q_proj"], dropout=0.0)
    assert type(model.lm_head) is not nn.Linear
    labels = lm_labels()
    model.train()
    plain = lm.causal_lm_loss(model(input_ids=LM_IDS).logits, labels)
    plain.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    hidden = model.model(input_ids=LM_IDS).last_hidden_state
    chunked = lm.chunked_causal_lm_loss(hidden, model.lm_head, labels, chunk_tokens=7)
    assert abs(float(chunked.detach()) - float(plain.detach())) <= 1e-5
    chunked.backward()
    assert any("lm_head" in n for n in want)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert (p.grad - want[n]).abs().max() <= 1e-5, n


def saved_total(loss_fn, model: nn.Module) -> int:
    """Bytes of the distinct storages saved for the backward pass while ``loss_fn()`` runs, the
    model's parameters left out."""
    resident = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in resident:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn()
    return sum(seen.values())


@pytest.mark.parametrize("adapter_on_head", [False, True])
def test_chunked_loss_keeps_nothing_of_the_logits_size(adapter_on_head):
    model = tiny_causal_lm(True)
    dt.attach(model, dt.config("lora", r=4, targets=["q_proj", "v_proj"] + (["lm_head"] if adapter_on_head else [])))
    model.train()
    labels = lm_labels()
    hidden = model.model(input_ids=LM_IDS).last_hidden_state
    n_tokens, width = LM_IDS.shape[0] * (LM_IDS.shape[1] - 1), hidden.shape[-1]
    # the plain loss keeps a tokens x vocabulary tensor (the log-softmax) for its backward pass
    assert saved_total(lambda: lm.causal_lm_loss(model.lm_head(hidden), labels), model) >= F32 * n_tokens * VOCAB
    # the chunked one keeps the states it reads and their gradient, tokens x hidden each, and
    # scalars (the last position's state is not read: a block of 12 tokens predicts 11)
    chunked = saved_total(lambda: lm.chunked_causal_lm_loss(hidden, model.lm_head, labels, chunk_tokens=6), model)
    assert chunked <= 2 * F32 * hidden.shape[0] * hidden.shape[1] * width + 64 < F32 * n_tokens * VOCAB


def test_task_returns_no_logits_with_the_chunked_loss():
    base = lora(tiny_causal_lm(True), ["q_proj", "v_proj"], dropout=0.0)
    plain = lm.CausalLMTask(base)
    chunked = lm.CausalLMTask(copy.deepcopy(base), chunked_loss=True)
    labels = lm_labels()
    logits, want = plain(LM_IDS, labels=labels)
    got_logits, got = chunked(LM_IDS, labels=labels)
    assert got_logits is None and abs(float(got.detach()) - float(want.detach())) <= 1e-5
    assert chunked._head_is_last is True
    n_tokens = LM_IDS.shape[0] * (LM_IDS.shape[1] - 1)
    # instead of a log-softmax (tokens x vocabulary) it keeps the states' gradient (tokens x hidden)
    assert saved_total(lambda: plain(LM_IDS, labels=labels), plain) \
        - saved_total(lambda: chunked(LM_IDS, labels=labels), chunked) >= F32 * n_tokens * (VOCAB - 32)
    torch.testing.assert_close(chunked(LM_IDS)[0], logits)        # without labels: the logits
    assert chunked.training        # the one-time check left the modes as they were


class SoftCapped(nn.Module):
    """A causal LM whose logits are soft-capped after its output layer (as Gemma 2's)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_output_embeddings(self):
        return self.inner.lm_head

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        logits = self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache).logits
        return types.SimpleNamespace(logits=3.0 * torch.tanh(logits / 3.0))


def test_a_model_that_changes_its_logits_after_the_head_gets_the_plain_loss():
    base = tiny_causal_lm(False)
    with torch.no_grad():
        base.lm_head.weight.mul_(20)            # logits large enough for the cap to bite
    plain = lm.CausalLMTask(SoftCapped(base))
    chunked = lm.CausalLMTask(SoftCapped(copy.deepcopy(base)), chunked_loss=True)
    labels = lm_labels()
    _, want = plain(LM_IDS, labels=labels)
    with pytest.warns(UserWarning, match="not its output layer applied.*--no-chunked-loss"):
        logits, got = chunked(LM_IDS, labels=labels)
    assert logits is not None and float(got.detach()) == pytest.approx(float(want.detach()), abs=1e-6)


def test_chunked_loss_refuses_labels_outside_the_vocabulary():
    model = tiny_causal_lm(False)
    labels = LM_IDS.clone()
    labels[1, 4] = VOCAB
    hidden = model.model(input_ids=LM_IDS).last_hidden_state
    with pytest.raises(DeltatuneError, match="outside the vocabulary"):
        lm.chunked_causal_lm_loss(hidden, model.lm_head, labels)


def test_chunked_loss_under_bf16_autocast_is_close():
    model = tiny_causal_lm(True)
    labels = lm_labels()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = lm.causal_lm_loss(model(input_ids=LM_IDS).logits, labels)
        hidden = model.model(input_ids=LM_IDS).last_hidden_state
        chunked = lm.chunked_causal_lm_loss(hidden, model.lm_head, labels, chunk_tokens=8)
    assert chunked.dtype == torch.float32
    assert float(chunked.detach()) == pytest.approx(float(plain.detach()), rel=1e-2)


# ----------------------------------------------------------------------------- the loop: memory options


def tiny_lm_setup(args):
    from deltatune.train.tasks import TaskSetup
    ids = torch.randint(0, VOCAB, (40_000,), generator=torch.Generator().manual_seed(7))
    train_split, test_split = lm.pack_book(ids, args.max_length, train_tokens=16 * args.max_length,
                                           test_tokens=8 * args.max_length)
    lm_model = tiny_causal_lm(True, dropout=0.1)
    return TaskSetup(description="tiny lm", model=lm.CausalLMTask(lm_model, chunked_loss=args.chunked_loss),
                     train=train_split, test=test_split, evaluate=lm.evaluate_lm, model_name="tiny-llama",
                     metric="test_perplexity", head=None)


def test_lm_runs_agree_with_and_without_the_memory_options(tmp_path, monkeypatch):
    monkeypatch.setattr(lm, "setup", tiny_lm_setup)
    runs = {}
    for name, opts in {"plain": {"chunked_loss": False}, "chunked": {},
                       "both": {"gradient_checkpointing": True}}.items():
        runs[name] = train(TrainArgs(data="lm", method="lora", method_options={"dropout": 0.1}, epochs=1,
                                     batch_size=4, max_length=16, out=str(tmp_path / name), progress=False,
                                     device="cpu", **opts))
    assert runs["plain"]["chunked_loss"] is False and runs["chunked"]["chunked_loss"] is True
    assert runs["both"]["gradient_checkpointing"] is True
    for name in ("chunked", "both"):
        assert runs[name]["final_train_loss"] == pytest.approx(runs["plain"]["final_train_loss"], abs=1e-5)
        assert runs[name]["test_loss"] == pytest.approx(runs["plain"]["test_loss"], abs=1e-5)


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    from test_train import make_dataset, make_tiny_model
    root = tmp_path_factory.mktemp("activation_memory")
    return make_tiny_model(root / "model"), make_dataset(root / "toy.csv", per_class=20)


def text_args(tiny_text, out, **kw) -> TrainArgs:
    model, data = tiny_text
    args = dict(model=str(model), data=str(data), method="lora", method_options={"r": 4, "dropout": 0.1}, epochs=1,
                batch_size=16, max_length=32, lr=5e-2, out=str(out), progress=False, device="cpu")
    return TrainArgs(**{**args, **kw})


def test_gradient_checkpointing_run_equals_the_plain_run(tiny_text, tmp_path, capsys):
    plain = train(text_args(tiny_text, tmp_path / "plain"))
    ckpt = train(text_args(tiny_text, tmp_path / "ckpt", gradient_checkpointing=True))
    assert "gradient checkpointing: 2 blocks (encoder.encoder.layer.0 .. encoder.encoder.layer.1)" in \
        capsys.readouterr().out
    assert ckpt["gradient_checkpointing"] is True and plain["gradient_checkpointing"] is False
    assert ckpt["final_train_loss"] == pytest.approx(plain["final_train_loss"], abs=1e-6)
    assert ckpt["test_loss"] == pytest.approx(plain["test_loss"], abs=1e-6)
    # the memory options may change on --resume (they change how, not what, a step computes)
    again = train(text_args(tiny_text, tmp_path / "plain", resume=True, gradient_checkpointing=True))
    assert again["resumed_from_epoch"] == 1 and again["test_loss"] == pytest.approx(plain["test_loss"], abs=1e-6)


def test_the_lm_task_gets_the_chunked_loss_unless_turned_off(monkeypatch):
    from deltatune.train import model as model_module
    text = "header\n*** START OF THIS BOOK ***\n" + "call me ishmael. " * 2000 + "\nEnd of Project Gutenberg\n"
    monkeypatch.setattr(lm, "read_moby_dick", lambda: text)

    def tokenizer(s, add_special_tokens=False, verbose=False):
        return {"input_ids": [ord(c) % VOCAB for c in s]}

    monkeypatch.setattr(model_module, "load_causal_lm", lambda name: (tiny_causal_lm(True), tokenizer))
    assert lm.setup(TrainArgs(data="lm", max_length=16)).model.chunked_loss is True
    assert lm.setup(TrainArgs(data="lm", max_length=16, chunked_loss=False)).model.chunked_loss is False


def test_calibrated_method_under_checkpointing_equals_the_plain_run(tiny_text, tmp_path):
    """LoRA-GA calibrates on gradients of a few batches before training; with checkpointing
    enabled first, calibration runs through the checkpointed layers and gives the same start."""
    opts = {"method_options": {"r": 4, "init": "lora_ga"}}
    plain = train(text_args(tiny_text, tmp_path / "plain", **opts))
    ckpt = train(text_args(tiny_text, tmp_path / "ckpt", gradient_checkpointing=True, **opts))
    assert ckpt["final_train_loss"] == pytest.approx(plain["final_train_loss"], abs=1e-6)
    assert ckpt["test_loss"] == pytest.approx(plain["test_loss"], abs=1e-6)


def test_no_chunked_loss_is_for_the_lm_task_only():
    with pytest.raises(DeltatuneError, match="--no-chunked-loss applies to the causal-LM task"):
        TrainArgs(data="bbc", chunked_loss=False).validate()
    TrainArgs(data="lm", chunked_loss=False).validate()


# ----------------------------------------------------------------------------- zeroth-order optimizers


class DummyZeroOrder(torch.optim.Optimizer):
    """Two-point SPSA along a seeded random direction, recording what the loop does to it."""

    zeroth_order = True

    def __init__(self, params, lr: float, eps: float = 1e-3):
        super().__init__(params, {"lr": lr})
        self.eps, self.steps, self.closure_calls, self.losses = eps, 0, [], []

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def step(self, closure=None):
        assert closure is not None, "a zeroth-order optimizer needs the closure"
        gen = torch.Generator().manual_seed(self.steps)
        zs = [torch.randn(p.shape, generator=gen) for p in self._params()]
        with torch.no_grad():
            for p, z in zip(self._params(), zs):
                p.add_(z, alpha=self.eps)
        plus = closure()
        self.closure_calls.append(plus.requires_grad)
        with torch.no_grad():
            for p, z in zip(self._params(), zs):
                p.add_(z, alpha=-2 * self.eps)
        minus = closure()
        self.closure_calls.append(minus.requires_grad)
        g = float(plus - minus) / (2 * self.eps)
        rates = [group["lr"] for group in self.param_groups for _ in group["params"]]
        with torch.no_grad():
            for p, z, lr in zip(self._params(), zs, rates):
                p.add_(z, alpha=self.eps - lr * g)
        self.steps += 1
        loss = (plus + minus) / 2
        self.losses.append(float(loss))
        return loss


@pytest.fixture
def dummy_zo(monkeypatch):
    made = []

    def factory(groups, lr, wd):
        made.append(DummyZeroOrder(groups, lr=lr))
        return made[-1]

    monkeypatch.setitem(OPTIMIZERS, "dummy_zo", factory)
    return made


def test_zeroth_order_steps_from_the_closure_without_backward(tiny_text, tmp_path, dummy_zo, monkeypatch):
    def no_backward(*a, **k):
        raise AssertionError("backward must not run with a zeroth-order optimizer")

    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", no_backward)
    metrics = train(text_args(tiny_text, tmp_path / "zo", optimizer="dummy_zo", lr=1e-3))
    (opt,) = dummy_zo
    batches = math.ceil(metrics["num_train"] / 16)
    assert metrics["steps"] == opt.steps == batches and metrics["zeroth_order"] is True
    # twice a step, each loss without a graph although the adapters require gradients: no_grad
    assert opt.closure_calls == [False] * (2 * batches)
    assert all(p.requires_grad and p.grad is None for p in opt._params())
    sizes = [16] * (batches - 1) + [metrics["num_train"] - 16 * (batches - 1)]
    want = sum(loss * n for loss, n in zip(opt.losses, sizes)) / sum(sizes)
    assert metrics["final_train_loss"] == pytest.approx(want, rel=1e-6)
    # the scheduler ran once per step: the last step's rate is the schedule's
    from deltatune.train.loop import linear_schedule
    warmup = math.ceil(0.06 * batches)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * linear_schedule(batches, warmup)(batches))


@pytest.mark.parametrize("opts,message", [({"grad_accum": 2}, "no gradients to accumulate.*--grad-accum 1"),
                                          ({"gradient_checkpointing": True}, "--gradient-checkpointing has nothing")])
def test_zeroth_order_refuses_backward_only_options(tiny_text, tmp_path, dummy_zo, opts, message):
    with pytest.raises(DeltatuneError, match=message):
        train(text_args(tiny_text, tmp_path / "zo", optimizer="dummy_zo", **opts))


def test_zeroth_order_losses_are_deterministic_functions_of_the_parameters(tiny_text, tmp_path, monkeypatch):
    """SPSA differences two losses; with dropout drawing new masks per forward the difference
    would measure the masks. The loop runs zeroth-order steps with dropout off: the closure
    called twice at the same parameters gives the same loss (the tiny BERT and the head have
    dropout 0.1)."""
    seen = []

    class Twice(DummyZeroOrder):
        def step(self, closure=None):
            seen.append((float(closure()), float(closure())))
            return super().step(closure)

    monkeypatch.setitem(OPTIMIZERS, "twice_zo", lambda groups, lr, wd: Twice(groups, lr=lr))
    train(text_args(tiny_text, tmp_path / "zo", optimizer="twice_zo", lr=1e-3))
    assert seen and all(a == b for a, b in seen)


def test_mezo_trains_from_the_command_line(tiny_text, tmp_path, capsys):
    if "mezo" not in OPTIMIZERS:
        pytest.skip("deltatune.optim has no mezo yet")
    from deltatune import cli
    model, data = tiny_text
    out = tmp_path / "mezo"
    assert cli.main(["train", "--model", str(model), "--data", str(data), "--out", str(out), "--epochs", "1",
                     "--batch-size", "16", "--max-length", "32", "--optimizer", "mezo", "--lr", "1e-4",
                     "--no-progress", "--device", "cpu"]) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["optimizer"] == "mezo" and metrics["zeroth_order"] is True
    assert metrics["steps"] == math.ceil(metrics["num_train"] / 16)
    assert math.isfinite(metrics["final_train_loss"]) and (out / "adapter.safetensors").is_file()


# ----------------------------------------------------------------------------- the command line


def test_cli_flags_and_the_optimizer_list(monkeypatch, capsys, tmp_path):
    from deltatune import cli
    monkeypatch.setenv("COLUMNS", "2000")       # one line per option: names are not wrapped
    ns = cli.build_parser().parse_args(["train", "--gradient-checkpointing", "--offload-activations",
                                        "--no-chunked-loss"])
    assert ns.gradient_checkpointing and ns.offload_activations and ns.chunked_loss is False
    ns = cli.build_parser().parse_args(["train"])
    assert not ns.gradient_checkpointing and not ns.offload_activations and ns.chunked_loss
    monkeypatch.setitem(OPTIMIZERS, "zz_registered_here", lambda groups, lr, wd: None)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"one of {', '.join(sorted(OPTIMIZERS))} (" in text and "zz_registered_here" in text
    assert cli.main(["train", "--data", "bbc", "--no-chunked-loss", "--device", "cpu", "--out",
                     str(tmp_path / "r")]) == 2
    assert "--no-chunked-loss applies to the causal-LM task" in capsys.readouterr().err
