"""Kernels: fused autograd functions that compute a frozen layer and its delta together, kept
in one place so methods stay their math. Each is checked against the plain definition by the
conformance suite (``test_fast_paths_equal_the_plain_definition``).

- ``dropout_mask``: a fast Bernoulli mask (four 16-bit draws per 64-bit random word);
- ``FusedLoraLinear``: ``y = x W^T + b + s (drop(x) A^T) B^T`` in one function, saving only what
  the backward needs;
- ``FusedLoraGroup``: several LoRA layers reading one input (q/k/v, gate/up) in one pass;
- ``SharedInput``: the engine's grouping of such sibling layers, which lets the first one called
  compute all of their outputs (``grouped_forward``).

A frozen weight stored compactly (a quantised base, ``deltatune.quant``) arrives as a float
tensor carrying ``rebuild``: these functions keep that function for backward, not the tensor.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .core.wrapper import DeltaLayer


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Where dropout zeroes ``x`` (True = dropped): each element independently with probability
    ``p`` (to 1/65536). Four 16-bit draws come from each 64-bit random word, about 5x faster on a
    CPU than ``bernoulli_``, whose per-element draws cost LoRA-with-dropout ~8 % of a MiniLM step."""
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, 2 ** 63 - 1)
    return (words.view(torch.int16)[:n] < round(p * 65536) - 32768).view(x.shape)


class FusedLoraLinear(torch.autograd.Function):
    """``g * (x W^T + s (drop(x) A^T) B^T) + b (+ lora_bias)`` for a frozen ``W`` in one function;
    ``g = magnitude / norm`` per output unit is DoRA's rescaling (``g = 1`` for LoRA, where the
    magnitude is None).

    Against composing the ops with autograd it saves: the dropped input (only a 1-byte mask is
    kept; ``x`` itself is referenced, not copied), the full-size passes for the scale and the add
    (they go into ``addmm_``), and in backward ``g B`` is computed once and shared between the
    factor gradients and the input gradient, which is accumulated with ``addmm_`` too. DoRA keeps
    one full-size tensor (the pre-scale output, for the magnitude's gradient) where composed ops
    keep three. The dropout mask comes from ``dropout_mask`` on both paths, so they agree for the
    same RNG state.
    """

    @staticmethod
    def forward(ctx, x, w2, bias, A, B, lora_bias, magnitude, norm, scale: float, p: float):
        x2 = x.reshape(-1, x.shape[-1])
        drop = None
        if p > 0:
            drop = dropout_mask(x2, p)
            z = (x2.masked_fill(drop, 0) @ A.t()).mul_(1 / (1 - p))
        else:
            z = x2 @ A.t()
        pre = None
        if magnitude is None:
            out = torch.addmm(bias, x2, w2.t()) if bias is not None else x2 @ w2.t()
            out.addmm_(z, B.t(), alpha=scale)
        else:
            pre = (x2 @ w2.t()).addmm_(z, B.t(), alpha=scale)
            out = pre * (magnitude / norm) if bias is None else torch.addcmul(bias, pre, magnitude / norm)
        if lora_bias is not None:
            out += lora_bias
        ctx.rebuild = getattr(w2, "rebuild", None)
        # x is kept for A's gradient alone: a frozen A (LoRA-FA) keeps only z = x A^T
        ctx.save_for_backward(x2 if ctx.needs_input_grad[3] else None, drop, z, None if ctx.rebuild else w2,
                              A, B, pre, magnitude, norm)
        ctx.scale, ctx.p, ctx.has_lora_bias = scale, p, lora_bias is not None
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x2, drop, z, w2, A, B, pre, magnitude, norm = ctx.saved_tensors
        s, p = ctx.scale, ctx.p
        g2 = g.reshape(-1, g.shape[-1])
        dA = dB = dx = dlb = dmag = None
        if ctx.has_lora_bias and ctx.needs_input_grad[5]:
            dlb = g2.sum(0)
        if magnitude is not None:
            if ctx.needs_input_grad[6]:
                dmag = (g2 * pre).sum(0) / norm
            g2 = g2 * (magnitude / norm)
        gB = g2 @ B
        if ctx.needs_input_grad[4]:
            dB = (g2.t() @ z).mul_(s)
        if ctx.needs_input_grad[3]:
            if drop is None:
                dA = (gB.t() @ x2).mul_(s)
            else:
                dA = (gB.t() @ x2.masked_fill(drop, 0)).mul_(s / (1 - p))
        if ctx.needs_input_grad[0]:
            dx = g2 @ (ctx.rebuild() if ctx.rebuild else w2)
            if drop is None:
                dx.addmm_(gB, A, alpha=s)
            else:
                dx.add_((gB @ A).masked_fill_(drop, 0), alpha=s / (1 - p))
            dx = dx.reshape(*g.shape[:-1], dx.shape[-1])
        return dx, None, None, dA, dB, dlb, dmag, None, None, None


class FusedLoraGroup(torch.autograd.Function):
    """Several LoRA layers on one input (q/k/v, gate/up), without dropout: ``FusedLoraLinear`` for
    each, except that the input is read once for all the down-projections (``x [A_1; A_2; ...]^T``)
    and once for all their gradients, and the input gradient takes all the low-rank terms in one
    ``addmm_``. An output the model never used gets no gradient and costs nothing in backward."""

    @staticmethod
    def forward(ctx, x, n: int, scales: tuple, *tensors):
        x2 = x.reshape(-1, x.shape[-1])
        ws, biases, As, Bs, lbs = (tensors[i * n:(i + 1) * n] for i in range(5))
        A_cat = torch.cat(As)
        Z = x2 @ A_cat.t()
        ranks = [A.shape[0] for A in As]
        outs = []
        for w2, b, z, B, lb, s in zip(ws, biases, Z.split(ranks, dim=1), Bs, lbs, scales):
            y = torch.addmm(b, x2, w2.t()) if b is not None else x2 @ w2.t()
            y.addmm_(z, B.t(), alpha=s)
            if lb is not None:
                y += lb
            outs.append(y.reshape(*x.shape[:-1], y.shape[-1]))
        ctx.rebuilds = [getattr(w2, "rebuild", None) for w2 in ws]
        trains_A = any(ctx.needs_input_grad[3 + 2 * n + i] for i in range(n))
        ctx.save_for_backward(x2 if trains_A else None, Z, A_cat,
                              *[None if r else w2 for w2, r in zip(ws, ctx.rebuilds)], *Bs)
        ctx.n, ctx.scales, ctx.ranks, ctx.x_shape = n, scales, ranks, x.shape
        ctx.has_lb = [lb is not None for lb in lbs]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x2, Z, A_cat, *rest = ctx.saved_tensors
        n, scales, ranks = ctx.n, ctx.scales, ctx.ranks
        need = ctx.needs_input_grad
        ws, Bs = [r() if r and need[0] else w2 for w2, r in zip(rest[:n], ctx.rebuilds)], rest[n:]
        dx = None
        gBs, dBs, dlbs = [], [None] * n, [None] * n
        for i, (g, w2, B, z, s) in enumerate(zip(grads, ws, Bs, Z.split(ranks, dim=1), scales)):
            if g is None:
                gBs.append(Z.new_zeros(Z.shape[0], ranks[i]))
                continue
            g2 = g.reshape(-1, g.shape[-1])
            gBs.append(g2 @ B * s)
            if need[3 + 3 * n + i]:
                dBs[i] = (g2.t() @ z).mul_(s)
            if ctx.has_lb[i] and need[3 + 4 * n + i]:
                dlbs[i] = g2.sum(0)
            if need[0]:
                dx = g2 @ w2 if dx is None else dx.addmm_(g2, w2)
        gB = torch.cat(gBs, dim=1)
        dAs = list((gB.t() @ x2).split(ranks)) if x2 is not None else [None] * n
        if need[0]:
            dx = gB @ A_cat if dx is None else dx.addmm_(gB, A_cat)
            dx = dx.reshape(ctx.x_shape)
        return (dx, None, None, *([None] * 2 * n), *dAs, *dBs, *dlbs)


def batched_low_rank(x: torch.Tensor, y: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor]],
                     scales: list[float], biases: list[torch.Tensor | None], index: torch.Tensor) -> torch.Tensor:
    """Mixed-batch low-rank updates: ``y[i] + s_k B_k A_k x[i] (+ b_k)`` with ``k = index[i]`` (-1: none),
    for the base output ``y`` of ``x``. The factors are gathered into ``(N, r, fan_in)`` /
    ``(N, out, r)`` stacks (ranks zero-padded) and applied with two batched products, whatever
    the number of adapters."""
    n, rmax, out = len(factors), max(A.shape[0] for A, _ in factors), factors[0][1].shape[0]
    # the scale goes into B and the base output into the last product (baddbmm), so the
    # low-rank terms cost two batched products and no full-size elementwise pass
    A_all = x.new_zeros(n + 1, rmax, factors[0][0].shape[1])
    B_all = x.new_zeros(n + 1, out, rmax)
    bias = x.new_zeros(n + 1, out)
    for i, ((A, B), s, b) in enumerate(zip(factors, scales, biases)):
        A_all[i, : A.shape[0]], B_all[i, :, : B.shape[1]] = A, B * s
        bias[i] = 0 if b is None else b
    slot = torch.where(index < 0, n, index)     # the last slot is all zeros: the base model
    z = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), A_all[slot].transpose(1, 2))
    y3 = y.reshape(x.shape[0], -1, out)
    if any(b is not None for b in biases):
        y3 = y3 + bias[slot][:, None, :]
    return torch.baddbmm(y3, z, B_all[slot].transpose(1, 2)).reshape(y.shape)


# Sibling layers that read the same input in the usual architectures: their adapted outputs can be
# computed together, reading the input once (see SharedInput).
SHARED_INPUT_SETS = ({"query", "key", "value"}, {"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"},
                     {"q", "k", "v"}, {"q_lin", "k_lin", "v_lin"}, {"w1", "w3"})


class SharedInput:
    """A group of sibling ``DeltaLayer``s (q/k/v, gate/up) that usually get the very same input
    tensor. The first member called computes every member's output in one pass over the input
    (its delta class's ``grouped_forward``) and leaves the others' outputs here; a member called
    next with the same tensor, unchanged (same object, same version counter), takes its output.
    A member called with anything else computes alone, so the result never depends on this, and
    leaves the group: the architecture does not feed it the others' input.

    The group holds its members and the last input weakly: a strong reference to the input would
    keep that forward's graph (every saved activation) alive after the caller dropped it, and the
    members hold the group, so strong references back would make a cycle that only the garbage
    collector frees."""

    def __init__(self, layers: list["DeltaLayer"]):
        self.layers = [weakref.ref(m) for m in layers]
        self.key: tuple | None = None
        self.pending: dict[int, torch.Tensor] = {}
        self.left: set[int] = set()

    def __deepcopy__(self, memo):
        # the copy's layers are not this group's members; an empty group computes each alone
        return SharedInput([])

    def output(self, layer: "DeltaLayer", x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s output for ``x`` from the group, or None: compute it alone."""
        if id(layer) in self.left or x.is_inference():     # inference tensors have no version counter
            return None
        k = self.key
        if k is not None and k[0]() is x and k[1] == x._version and k[2] == torch.is_grad_enabled():
            out = self.pending.pop(id(layer), None)
            if out is not None:
                return out
        if id(layer) in self.pending:       # computed for an input this layer does not read
            del self.pending[id(layer)]
            self.left.add(id(layer))
            return None
        return self.compute(layer, x)

    def compute(self, layer: "DeltaLayer", x: torch.Tensor) -> torch.Tensor | None:
        """Every member's output for input ``x``, when they all run one fusable delta of the same
        adapter and kind; else None."""
        self.pending, self.key = {}, None
        members = []
        for ref in self.layers:
            m = ref()
            if m is None or (id(m) in self.left and m is not layer):
                continue
            deltas = m.running()
            if m.per_sample is not None or len(deltas) != 1 or m.active != layer.active:
                return None
            members.append((m, deltas[0]))
        if len(members) < 2 or all(m is not layer for m, _ in members):
            return None
        grouped = getattr(type(members[0][1]), "grouped_forward", None)
        if grouped is None or any(type(d) is not type(members[0][1]) for _, d in members):
            return None
        outs = grouped([(d, m.base) for m, d in members], x)
        if outs is None:
            return None
        self.pending = {id(m): o for (m, _), o in zip(members, outs) if m is not layer}
        self.key = (weakref.ref(x), x._version, torch.is_grad_enabled())
        return outs[[m for m, _ in members].index(layer)]
