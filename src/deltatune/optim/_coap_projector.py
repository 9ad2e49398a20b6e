"""Projections of COAP ("COAP: Memory-Efficient Training with Correlation-Aware Gradient
Projection", Xiao et al., CVPR 2025): their construction, their correlation-aware update, their
re-projection, and the change of basis of moments when a projection changes.

Matrices
--------
All matrix functions work on the *canonical* form ``A`` (``a x b``, ``a >= b``) and a projection
``P`` (``b x r``, orthonormal columns) that projects ``A``'s rows: ``A P`` is ``a x r``. For a
``"right"`` gradient (``m > n``) ``A = G``; for a ``"left"`` one (``m <= n``) ``A = G^T``, the
states ``r x n`` being the transposes of canonical ``n x r`` ones (see ``_projection``).

- ``initial_projection``: the top ``r`` right singular vectors of ``A`` by randomised SVD.
- ``correlation_step``: one gradient step on COAP's correlation-aware objective

      L(P) = ||A P P^T - A||^2 / ||A||^2  *  (1 - mean_i cos((M P^T)_i, A_i))

  where ``M`` (``a x r``) is the projected first moment and ``i`` runs over the rows of ``A``:
  the reconstruction error of the gradient, weighted by how badly the moment, mapped back to
  full space, points along the current gradient. The paper writes the first factor as the MSE;
  dividing by ``||A||^2`` instead of ``a*b`` has the same minimiser but makes the step size
  independent of the gradient's scale and the matrix size (with the MSE a step of 0.1 moves a
  unit-norm ``P`` by ~1e-7 on a typical gradient, i.e. not at all). The gradient of ``L`` is
  computed in closed form, clipped to norm 1 (as the paper's code does), and after
  ``P <- P - lr * grad`` the columns are re-orthonormalised by QR (signs fixed so that ``P``
  moves continuously).
- ``reproject``: the paper's occasional low-cost SVD: a range finder sketched by the previous
  ``P`` (plus ``oversample`` fresh Gaussian columns so that new directions can enter),
  ``Q = qr(A [P, Omega])``, then the top ``r`` right singular vectors of ``Q^T A``.
- ``carry_matrix``: moments expressed in the basis of ``P_old`` re-expressed in that of
  ``P_new``: with ``C = P_old^T P_new`` (``r x r``), first moment ``M C``, second moment
  ``V (C o C)`` (``o`` elementwise): the second moment of a linear combination of coordinates
  taken as independent, which stays non-negative. Cost ``O(a r^2)``, no full-size matrix.

Tucker (Conv2d kernels ``out x in x kh x kw``)
-----------------------------------------------
Factors ``U_out`` (``out x r_out``) and ``U_in`` (``in x r_in``) project the two channel modes:
the core ``G x_1 U_out^T x_2 U_in^T`` is ``r_out x r_in x kh x kw``. ``tucker_init`` is the
truncated HOSVD (randomised SVD of each mode unfolding), ``tucker_reproject`` one HOOI sweep
warm-started by the current factors, ``tucker_correlation_step`` the same objective as above
(rows ``i``: output channels) by autograd, each factor's gradient clipped to norm 1, then QR.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._projection import randomized_svd

# torch.nn.functional.cosine_similarity's default: norms below it are clamped
COS_EPS = 1e-8


class TuckerFactors(NamedTuple):
    out: torch.Tensor
    inp: torch.Tensor


def canonical(g: torch.Tensor, side: str) -> torch.Tensor:
    """The canonical form of a gradient or a state (its transpose for the ``"left"`` side)."""
    return g if side == "right" else g.T


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``p``'s, by QR with ``diag(R) >= 0`` (so ``p ~ Q`` when
    ``p`` is nearly orthonormal already)."""
    q, r = torch.linalg.qr(p)
    sign = torch.sign(torch.diagonal(r))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign


def initial_projection(a: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
    """``b x rank``: the top right singular vectors of the canonical ``a``."""
    return randomized_svd(a, rank, generator=generator).Vh.T.contiguous()


def correlation_step(p: torch.Tensor, m: torch.Tensor, a: torch.Tensor, lr: float,
                     max_norm: float = 1.0) -> torch.Tensor:
    """One step on COAP's objective (module docstring); ``p`` ``b x r``, ``m`` ``a x r``.

    The gradient is exact for any ``p`` but never forms an ``a x b`` product: with ``AP = A P``,
    ``K = AP^T AP`` and ``S = P^T P`` (both ``r x r``), ``||A P P^T - A||^2 = ||A||^2 - 2 tr K +
    tr(K S)`` and its gradient is ``2 (A^T AP (S - 2I) + P K)``; the rows of ``M P^T`` have dot
    products ``M_i . AP_i`` with those of ``A`` and squared norms ``M_i S M_i^T``. So the cost is
    three ``a x b x r`` products (``A P``, ``A^T AP``, ``A^T (M w)``), no ``a x b`` temporary.
    """
    rows, r = a.shape[0], p.shape[1]
    an = a.norm(dim=1)
    g2 = (an * an).sum().clamp_min(torch.finfo(a.dtype).tiny)
    ap = a @ p
    k = ap.T @ ap
    gram = p.T @ p
    rec = (g2 - 2.0 * torch.trace(k) + (k * gram).sum()).clamp_min(0.0) / g2
    dots = (m * ap).sum(dim=1)
    mn = ((m @ gram) * m).sum(dim=1).clamp_min(0.0).sqrt()
    mt, at = mn.clamp_min(COS_EPS), an.clamp_min(COS_EPS)
    cos_mean = (dots / (mt * at)).mean()
    # d cos_i / d (M P^T)_i = A_i / (|.| |A_i|) - cos_i (M P^T)_i / |.|^2; the second term is absent
    # where the norm is clamped, as in torch.nn.functional.cosine_similarity
    coef2 = torch.where(mn > COS_EPS, dots / (mt**3 * at), torch.zeros_like(dots))
    weights = (1.0 / (mt * at)).unsqueeze(1) * m
    eye = torch.eye(r, dtype=p.dtype, device=p.device)
    grad_rec = 2.0 * ((a.T @ ap) @ (gram - 2.0 * eye) + p @ k) / g2
    grad_cos = (a.T @ weights - p @ (m.T @ (coef2.unsqueeze(1) * m))) / rows
    grad = (1.0 - cos_mean) * grad_rec - rec * grad_cos
    scale = (max_norm / (grad.norm() + 1e-6)).clamp(max=1.0)
    return orthonormalize(p - lr * scale * grad)


def reproject(p: torch.Tensor, a: torch.Tensor, generator: torch.Generator, oversample: int = 8) -> torch.Tensor:
    """The new ``b x r`` projection from a range finder warm-started by ``p`` (docstring)."""
    b, r = p.shape
    extra = min(oversample, b - r)
    sketch = p
    if extra > 0:
        omega = torch.randn(b, extra, generator=generator, device=generator.device).to(p.device)
        sketch = torch.cat([p, omega], dim=1)
    q = torch.linalg.qr(a @ sketch).Q
    vh = torch.linalg.svd(q.T @ a, full_matrices=False).Vh
    return vh[:r].T.contiguous()


def carry_matrix(c: torch.Tensor, side: str, x: torch.Tensor, second: bool) -> torch.Tensor:
    """State ``x`` (``a x r`` right, ``r x n`` left) in the new basis; ``c = P_old^T P_new``."""
    t = c * c if second else c
    return x @ t if side == "right" else t.T @ x


# ------------------------------------------------------------------ Tucker


def tucker_project(g: torch.Tensor, f: TuckerFactors) -> torch.Tensor:
    return torch.einsum("oikl,or,is->rskl", g, f.out, f.inp)


def tucker_project_back(core: torch.Tensor, f: TuckerFactors) -> torch.Tensor:
    return torch.einsum("rskl,or,is->oikl", core, f.out, f.inp)


def _leading_left(mat: torch.Tensor, rank: int, generator: torch.Generator) -> torch.Tensor:
    return randomized_svd(mat, rank, generator=generator).U.contiguous()


def tucker_init(g: torch.Tensor, ranks: tuple[int, int], generator: torch.Generator) -> TuckerFactors:
    """Truncated HOSVD on the two channel modes."""
    out = _leading_left(g.reshape(g.shape[0], -1), ranks[0], generator)
    inp = _leading_left(g.transpose(0, 1).reshape(g.shape[1], -1), ranks[1], generator)
    return TuckerFactors(out, inp)


def tucker_reproject(g: torch.Tensor, f: TuckerFactors, generator: torch.Generator) -> TuckerFactors:
    """One HOOI sweep from the current factors: each mode's factor from the kernel already
    projected on the other mode."""
    r_out, r_in = f.out.shape[1], f.inp.shape[1]
    by_in = torch.einsum("oikl,is->oskl", g, f.inp).reshape(g.shape[0], -1)
    out = _leading_left(by_in, min(r_out, min(by_in.shape)), generator)
    by_out = torch.einsum("oikl,or->irkl", g, out).reshape(g.shape[1], -1)
    inp = _leading_left(by_out, min(r_in, min(by_out.shape)), generator)
    return TuckerFactors(out, inp)


def tucker_correlation_step(f: TuckerFactors, m: torch.Tensor, g: torch.Tensor, lr: float,
                            max_norm: float = 1.0) -> TuckerFactors:
    """One step on the correlation-aware objective for both factors (autograd: every ``T``
    steps, on kernels far smaller than the matrices)."""
    out = f.out.detach().clone().requires_grad_(True)
    inp = f.inp.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        fac = TuckerFactors(out, inp)
        rec = tucker_project_back(tucker_project(g, fac), fac)
        mh = tucker_project_back(m, fac)
        g2 = (g * g).sum().clamp_min(torch.finfo(g.dtype).tiny)
        cos = torch.nn.functional.cosine_similarity(mh.reshape(g.shape[0], -1), g.reshape(g.shape[0], -1), dim=1)
        loss = ((rec - g) ** 2).sum() / g2 * (1.0 - cos.mean())
        grads = torch.autograd.grad(loss, [out, inp])
    new = []
    for factor, grad in zip((out, inp), grads):
        scale = (max_norm / (grad.norm() + 1e-6)).clamp(max=1.0)
        new.append(orthonormalize(factor.detach() - lr * scale * grad))
    return TuckerFactors(*new)


def carry_tucker(old: TuckerFactors, new: TuckerFactors, x: torch.Tensor, second: bool) -> torch.Tensor:
    """A core-shaped state in the basis of ``new``."""
    c_out, c_in = old.out.T @ new.out, old.inp.T @ new.inp
    if second:
        c_out, c_in = c_out * c_out, c_in * c_in
    return torch.einsum("abkl,ar,bs->rskl", x, c_out, c_in)
