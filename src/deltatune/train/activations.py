"""Activation memory: what a training step keeps for its backward pass, and how to keep less.

With a parameter-efficient method the frozen weights need no gradients and no optimizer state,
so what grows with the batch, the *activations* autograd saves for the backward pass, is most of
a step's memory. Two tools here (see docs/memory.md for when each pays off):

- **gradient checkpointing** ("Training Deep Nets with Sublinear Memory Cost", Chen et al. 2016):
  each repeated block (a transformer layer, a residual stage) keeps only its input; the backward
  pass runs the block's forward again to get the rest. ``enable_gradient_checkpointing(model)``
  uses transformers' own switch on its models and wraps the blocks of any other ``nn.Module``
  stack. Always *non-reentrant* ``torch.utils.checkpoint``: the reentrant variant only propagates
  gradients to its tensor inputs when one of them requires a gradient, so behind a frozen
  embedding (every PEFT setup) the adapters inside the checkpointed blocks would get no gradient
  at all. The non-reentrant variant also restores the RNG state for the recomputation, so dropout
  draws the same masks twice and the gradients are those of the plain run.
- **activation offload** (``ActivationOffload``, ``offload_activations``): the tensors autograd
  saves are moved to (pinned) host memory during the forward pass and brought back when the
  backward pass needs them, through ``torch.autograd.graph.saved_tensors_hooks``. It frees
  accelerator memory at the price of two copies over the host link; on a CPU there is nowhere
  to move them, so it is refused there.

The causal-LM loss, whose logits (tokens x vocabulary) are often the largest activation of all,
has its own remedy in ``train/lm.py`` (``chunked_causal_lm_loss``).
"""

from __future__ import annotations

import difflib
import itertools
import types
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.errors import DeltatuneError
from ..core.wrapper import DeltaLayer, ModuleCopies

SHARED_MODULE = "deltatune_shared"     # adapter-level state (core.lifecycle): never a stack of blocks
# saved tensors smaller than this stay on the accelerator: each copy costs a transfer of its own,
# and small tensors (masks, normalisation statistics, a sequence's positions) free next to nothing
OFFLOAD_MIN_BYTES = 1 << 20


# --------------------------------------------------------------------------------------------
# gradient checkpointing


def _supports_hf_checkpointing(module: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` that implements checkpointing of its own layers."""
    return bool(getattr(module, "supports_gradient_checkpointing", False)) and (
        hasattr(module, "activation_checkpointing_enable") or hasattr(module, "gradient_checkpointing_enable"))


def _unwrap(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, (DeltaLayer, ModuleCopies)) else module


def _is_stack(module: nn.Module) -> bool:
    """An ``nn.ModuleList`` / ``nn.Sequential`` of at least two blocks of one class, a block being a
    module with submodules of its own (checkpointing a single layer saves nothing: it would keep
    its input, which is what it saves anyway)."""
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
        return False
    blocks = [_unwrap(b) for b in module]
    return len({type(b) for b in blocks}) == 1 and next(iter(blocks[0].children()), None) is not None


def _plan(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, str, nn.Module]]:
    """``(kind, name, module)`` for the outermost units to checkpoint: ``("hf", name, model)`` for
    a transformers model that checkpoints its own layers, ``("block", name, block)`` for each block
    of a stack found anywhere else."""
    if _supports_hf_checkpointing(module):
        yield "hf", prefix, module
        return
    if _is_stack(module):
        for i, block in module.named_children():
            yield "block", f"{prefix}.{i}" if prefix else i, block
        return
    for name, child in module.named_children():
        if name != SHARED_MODULE:
            yield from _plan(child, f"{prefix}.{name}" if prefix else name)


def _has_kv_prefix(model: nn.Module) -> bool:
    """Whether an adapter feeds attention a key/value prefix through the model's cache (prefix
    tuning): a recomputed layer would append its keys to that cache a second time, which is why
    transformers drops the cache in checkpointed layers, and with it the prefix."""
    from ..sequence import SequenceDelta
    return any(isinstance(m, SequenceDelta) and type(m).key_value_prefix is not SequenceDelta.key_value_prefix
               for m in model.modules())


def _batchnorm_buffers(module: nn.Module) -> list[torch.Tensor]:
    """The running statistics a forward pass of ``module`` in its current mode would update."""
    out = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            out.extend(b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None)
    return out


class _Recompute:
    """The block's forward for ``checkpoint``: the first call is the forward pass; any later one is
    the backward's recomputation, which must leave no trace: a BatchNorm in training mode would
    move its running statistics a second time, so they are put back as they were."""

    def __init__(self, module: nn.Module, forward: Callable[..., Any]):
        self.module, self.forward, self.calls = module, forward, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            return self.forward(self.module, *args, **kwargs)
        buffers = _batchnorm_buffers(self.module)
        with torch.no_grad():
            kept = [b.clone() for b in buffers]
        try:
            return self.forward(self.module, *args, **kwargs)
        finally:        # also when the recomputation is stopped early (it raises to stop)
            with torch.no_grad():
                for b, k in zip(buffers, kept):
                    b.copy_(k)


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Installed as a block's ``forward``: the class's forward, checkpointed while training with
    gradients (in evaluation or under ``no_grad`` nothing is saved, so it runs as is)."""
    forward = type(self).forward
    if not (self.training and torch.is_grad_enabled()):
        return forward(self, *args, **kwargs)
    return checkpoint(_Recompute(self, forward), *args, use_reentrant=False, **kwargs)


def _is_ours(module: nn.Module) -> bool:
    f = module.__dict__.get("forward")
    return isinstance(f, types.MethodType) and f.__func__ is _checkpointed_forward


def _checkpoint_block(module: nn.Module, name: str) -> None:
    # the wrapped module itself (and the trainable copies of a ModuleCopies); a wrapper's own
    # deltas then run outside the checkpoint, on the block's output
    targets = [module.base, *module.copies.values()] if isinstance(module, ModuleCopies) else [_unwrap(module)]
    for m in targets:
        if "forward" in m.__dict__ and not _is_ours(m):
            raise DeltatuneError(f"gradient checkpointing: {name} ({type(m).__name__}) already has a forward of its "
                                 f"own set on the instance; remove it, or checkpoint another module (blocks=[...])")
        # bound to the instance (a deep copy rebinds it to the copy); the module tree is unchanged,
        # so adapters attach, save and load under the same names as without checkpointing
        m.forward = types.MethodType(_checkpointed_forward, m)


def _enable_hf(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):       # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers also hooks the input embeddings to make their output require a gradient,
    # which only the reentrant variant needs; behind a frozen embedding it would make the
    # backward pass differentiate the first layer with respect to its input for nothing. The
    # handles it keeps are those of the hooks it just added (a user's earlier one stays)
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


def _hf_layers(model: nn.Module, prefix: str) -> list[str]:
    """The names of the modules transformers now checkpoints: its per-layer blocks (or, in
    versions without ``GradientCheckpointingLayer``, the modules carrying the flag)."""
    flagged = [(n, m) for n, m in model.named_modules() if getattr(m, "gradient_checkpointing", False) is True]
    layers = [(n, m) for n, m in flagged
              if any(c.__name__ == "GradientCheckpointingLayer" for c in type(m).__mro__)] or flagged
    return [".".join(p for p in (prefix, n) if p) for n, _ in layers]


def enable_gradient_checkpointing(model: nn.Module, blocks: Sequence[str] | None = None) -> list[str]:
    """Checkpoint ``model``'s repeated blocks (non-reentrant: adapters behind a frozen embedding get
    their gradients, dropout recomputes the same masks); returns the names of the checkpointed
    modules.

    Without ``blocks``: each transformers model inside ``model`` (the model itself, or e.g. the
    ``encoder`` of a classifier) checkpoints its own layers through transformers'
    ``activation_checkpointing_enable`` / ``gradient_checkpointing_enable`` with
    ``use_reentrant=False``; elsewhere each block of every outermost ``nn.ModuleList`` /
    ``nn.Sequential`` of two or more blocks of one class is checkpointed. ``blocks``: the
    qualified names of the modules to checkpoint instead.

    Works before or after ``dt.attach`` (the module tree is not changed; an adapter wrapping a
    whole block adds its delta outside the checkpoint). Refused when an adapter feeds attention a
    key/value prefix (prefix tuning), which a recomputed layer cannot see again."""
    if _has_kv_prefix(model):
        raise DeltatuneError("gradient checkpointing cannot be combined with a key/value-prefix method (prefix "
                             "tuning, P-tuning v2): a recomputed attention layer would not see the prefix again "
                             "(its cache is dropped under checkpointing); train without --gradient-checkpointing, "
                             "or with a method that does not lengthen the keys (prompt tuning, LoRA, ...)")
    done: list[str] = []
    if blocks is not None:
        modules = dict(model.named_modules())
        for name in blocks:
            if name not in modules:
                close = difflib.get_close_matches(name, list(modules), n=5)
                raise DeltatuneError(f"gradient checkpointing: {type(model).__name__} has no module {name!r}"
                                     + (f"; close names: {', '.join(close)}" if close else ""))
            _checkpoint_block(modules[name], name)
            done.append(name)
        return done
    for kind, name, module in _plan(model):
        if kind == "hf":
            _enable_hf(module)
            done.extend(_hf_layers(module, name))
        else:
            _checkpoint_block(module, name)
            done.append(name)
    if not done:
        raise DeltatuneError(f"gradient checkpointing: {type(model).__name__} has no repeated blocks (an "
                             f"nn.ModuleList or nn.Sequential of two or more blocks of one class) and is not a "
                             f"transformers model that checkpoints its layers; name the modules to checkpoint with "
                             f"enable_gradient_checkpointing(model, blocks=[...])")
    return done


def disable_gradient_checkpointing(model: nn.Module) -> None:
    """Undo ``enable_gradient_checkpointing``: every block runs its plain forward again."""
    for m in model.modules():
        if _is_ours(m):
            del m.__dict__["forward"]
        if _supports_hf_checkpointing(m) and getattr(m, "is_gradient_checkpointing", False):
            if hasattr(m, "activation_checkpointing_disable"):
                m.activation_checkpointing_disable()
            else:
                m.gradient_checkpointing_disable()


def is_gradient_checkpointing(model: nn.Module) -> bool:
    """Whether any module of ``model`` is checkpointed (by this module or by transformers)."""
    return any(_is_ours(m) or getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


# --------------------------------------------------------------------------------------------
# activation offload


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """While active, every tensor autograd saves for the backward pass that lives on ``device``
    (and holds at least ``min_bytes``) is copied to host memory, pinned when the device is a CUDA
    GPU so the copy back can overlap; the backward pass copies it back when it needs it. The
    model's own parameters and buffers are never copied: they stay on the device anyway, and
    copying them would move the whole model across the host link every step.

    ``offloaded_bytes`` / ``offloaded_tensors`` count what was moved, ``kept_tensors`` what was
    not. Use ``offload_activations`` to get one (it refuses a CPU device); the class itself accepts
    any device so the mechanics can be checked without an accelerator."""

    def __init__(self, device: torch.device | str, model: nn.Module | None = None,
                 min_bytes: int = OFFLOAD_MIN_BYTES, pin_memory: bool | None = None):
        self.device = torch.device(device)
        self.min_bytes = int(min_bytes)
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)
        self.resident = set()
        if model is not None:
            self.resident = {t.untyped_storage().data_ptr()
                             for t in itertools.chain(model.parameters(), model.buffers())}
        self.offloaded_bytes = self.offloaded_tensors = self.kept_tensors = 0
        super().__init__(self.pack, self.unpack)

    def _moves(self, t: torch.Tensor) -> bool:
        return (t.device.type == self.device.type and (self.device.index is None or t.device == self.device)
                and t.layout == torch.strided and t.numel() * t.element_size() >= self.min_bytes
                and t.untyped_storage().data_ptr() not in self.resident)

    def pack(self, t: torch.Tensor) -> Any:
        if not self._moves(t):
            self.kept_tensors += 1
            return t
        host = torch.empty(t.size(), dtype=t.dtype, device="cpu", pin_memory=self.pin_memory)
        host.copy_(t, non_blocking=self.pin_memory)
        self.offloaded_bytes += t.numel() * t.element_size()
        self.offloaded_tensors += 1
        return t.device, host

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=host.is_pinned())


def offload_activations(device: torch.device | str, model: nn.Module | None = None,
                        min_bytes: int = OFFLOAD_MIN_BYTES) -> ActivationOffload:
    """A context manager that keeps the activations saved for the backward pass in host memory
    (see ``ActivationOffload``) during the forward passes run inside it. ``device`` is where the
    model computes; ``model``'s parameters and buffers are left where they are. Refused on a CPU
    device, where activations already are in host memory."""
    device = check_offload_device(device)
    return ActivationOffload(device, model, min_bytes)


def check_offload_device(device: torch.device | str) -> torch.device:
    """``device``, unless it is the CPU: activations computed there already are in host memory."""
    device = torch.device(device)
    if device.type == "cpu":
        raise DeltatuneError("--offload-activations moves activations from an accelerator to host memory, but this "
                             "run computes on the CPU, where they already are; drop the flag (to save memory on a "
                             "CPU use --gradient-checkpointing), or train on a GPU (--device cuda)")
    return device
