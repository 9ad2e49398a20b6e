"""MeZO and Sparse MeZO against their papers' update, computed here: one step equals SPSA written
out in this file (its own seed derivation, its own draws of z in parameter order, its own
threshold); the perturb / restore passes return θ to within float rounding (measured); no
parameter-sized buffer is kept (an allocation tracker of this file counts what is alive during a
step); the loss goes down; a resumed run is bit-identical; Sparse MeZO leaves the entries above
its threshold untouched; bad input is refused by name."""

from __future__ import annotations

import copy
import io
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import deltatune as dt
from deltatune.core.errors import DeltatuneError
from deltatune.optim import MeZO, SparseMeZO, build_optimizer, is_zeroth_order

pytestmark = pytest.mark.usefixtures("one_thread")

U64 = (1 << 64) - 1


def seed_of_step(seed: int, step: int) -> int:
    """splitmix64 of ``seed + (step + 1) * golden``, top 63 bits: the documented step seed."""
    x = (seed + (step + 1) * 0x9E3779B97F4A7C15) & U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & U64
    return (x ^ (x >> 31)) >> 1


def draws(params: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def problem(n: int = 64, d: int = 10, seed: int = 0):
    """A linear regression: parameters (w, b), and the loss of a fixed batch as a function of them."""
    g = torch.Generator().manual_seed(seed)
    x, w_true = torch.randn(n, d, generator=g), torch.randn(d, 3, generator=g)
    y = x @ w_true + 0.5
    w = nn.Parameter(0.1 * torch.randn(d, 3, generator=g))
    b = nn.Parameter(torch.zeros(3))

    def loss(w_, b_):
        return F.mse_loss(x @ w_ + b_, y)
    return w, b, loss


def _true_weights() -> torch.Tensor:
    """``problem()``'s generating weights, drawn again from its generator."""
    g = torch.Generator().manual_seed(0)
    torch.randn(64, 10, generator=g)
    return torch.randn(10, 3, generator=g)


def spsa_reference(params, loss, lrs, wds, eps, seed, masks=None):
    """θ' of one SPSA step from θ, and (ℓ+ + ℓ-)/2, evaluated at θ ± ε z directly (no in-place passes)."""
    theta = [p.detach().clone() for p in params]
    zs = draws(theta, seed)
    if masks is not None:
        zs = [z * m for z, m in zip(zs, masks)]
    plus = loss(*[t + eps * z for t, z in zip(theta, zs)])
    minus = loss(*[t - eps * z for t, z in zip(theta, zs)])
    g = (plus - minus).item() / (2 * eps)
    decay = [torch.ones_like(t) for t in theta] if masks is None else masks
    new = [t - lr * (g * z + wd * m * t) for t, z, lr, wd, m in zip(theta, zs, lrs, wds, decay)]
    return new, (plus + minus).item() / 2


def small_threshold(p: torch.Tensor, sparsity: float) -> float:
    """The (1 - sparsity) quantile of |p| by sorting: the magnitude of the k-th smallest entry."""
    k = max(1, math.ceil((1 - sparsity) * p.numel()))
    return p.detach().abs().flatten().sort().values[k - 1].item()


@pytest.mark.parametrize("cls", [MeZO, SparseMeZO])
def test_one_step_equals_spsa_written_out(cls):
    w, b, loss = problem()
    with torch.no_grad():
        b.add_(0.3 * torch.randn(3))        # not all equal, so the threshold selects
    lrs, wds, eps = (1e-2, 3e-2), (0.1, 0.0), 1e-3
    kw = {"sparsity": 0.6} if cls is SparseMeZO else {}
    masks = None if cls is MeZO else [(p.detach().abs() <= small_threshold(p, 0.6)).float() for p in (w, b)]
    want, want_loss = spsa_reference([w, b], loss, lrs, wds, eps, seed_of_step(7, 0), masks)
    opt = cls([{"params": [w], "lr": lrs[0], "weight_decay": wds[0]},
               {"params": [b], "lr": lrs[1], "weight_decay": wds[1]}], eps=eps, seed=7, **kw)
    got_loss = opt.step(lambda: loss(w, b))
    assert opt.last_seed == seed_of_step(7, 0)
    assert abs(got_loss.item() - want_loss) < 1e-6
    for p, q in zip((w, b), want):
        assert (p.detach() - q).abs().max().item() < 1e-6
    assert not all(torch.equal(p.detach(), q) for p, q in zip((w, b), [c.detach() for c in problem()[:2]]))


def test_second_step_draws_from_the_next_seed():
    w, b, loss = problem()
    opt = MeZO([w, b], lr=1e-2, eps=1e-3, seed=3)
    opt.step(lambda: loss(w, b))
    want, _ = spsa_reference([w, b], loss, (1e-2, 1e-2), (0.0, 0.0), 1e-3, seed_of_step(3, 1))
    opt.step(lambda: loss(w, b))
    assert all((p.detach() - q).abs().max().item() < 1e-6 for p, q in zip((w, b), want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lr_zero_restores_theta_to_float_rounding(dtype):
    """Measured: (θ + εz - 2εz) + εz is θ bit for bit for about half the entries; the rest are off
    by rounding, within an ulp of |θ| + 2ε|z| (asserted with a factor 2). Restoring is not exact."""
    torch.manual_seed(0)
    p = nn.Parameter(0.05 * torch.randn(20000, dtype=dtype))
    theta = p.detach().clone()
    eps = 1e-3
    opt = MeZO([p], lr=0.0, eps=eps, seed=1)
    opt.step(lambda: p.sum())
    z = draws([theta], seed_of_step(1, 0))[0]
    err = (p.detach() - theta).abs()
    ulp = torch.finfo(dtype).eps
    assert (err <= 2 * ulp * (theta.abs() + 2 * eps * z.abs())).all()
    exact = (err == 0).double().mean().item()
    assert 0.2 < exact < 0.9, f"{exact:.2%} restored bit for bit"


class LiveBytes(TorchDispatchMode):
    """The peak of bytes alive in storages allocated while active: each op's outputs whose storage
    no input holds are new; views of them count once; a storage dies with its last tensor."""

    def __init__(self):
        super().__init__()
        self.refs, self.sizes, self.live, self.peak = {}, {}, 0, 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        held = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage().data_ptr()
            if key not in self.refs:
                if key in held:
                    continue            # an in-place result or a view of an older tensor
                self.refs[key], self.sizes[key] = 0, t.untyped_storage().nbytes()
                self.live += self.sizes[key]
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


def test_the_tracker_sees_a_copy_of_the_parameters():
    params = [torch.randn(5000), torch.randn(3000)]
    keep = []
    with LiveBytes() as tracker:
        keep.extend(p.clone() for p in params)
    assert tracker.peak == 8 * 4000 == tracker.live


@pytest.mark.parametrize("cls", [MeZO, SparseMeZO])
def test_no_parameter_sized_buffer(cls):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(60000)), nn.Parameter(torch.randn(60000)), nn.Parameter(torch.randn(500))]
    coefs = [torch.randn(p.shape) for p in params]
    opt = cls(params, lr=1e-4, weight_decay=0.1)

    def closure():          # dot products: the closure itself allocates scalars only
        return sum(torch.dot(p, c) for p, c in zip(params, coefs))
    opt.step(closure)
    with LiveBytes() as tracker:
        opt.step(closure)
    largest, total = 60000 * 4, sum(p.numel() for p in params) * 4
    # at most one z at a time; Sparse MeZO adds that tensor's unpacked 1-byte mask and the step's bits
    budget = largest + 64 if cls is MeZO else largest * 5 // 4 + total // 32 + 64
    assert tracker.peak <= budget < total
    assert tracker.live == 0            # nothing kept after the step
    if cls is MeZO:
        assert opt.state_bytes() == 0
    else:
        assert opt.state_bytes() == 8 * len(params) + sum(math.ceil(p.numel() / 8) for p in params)


@pytest.mark.parametrize("cls", [MeZO, SparseMeZO])
def test_the_loss_goes_down(cls):
    w, b, loss = problem()
    if cls is SparseMeZO:
        # a "pretrained" start, the solution plus noise: the small entries are the ones to fix
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            w.copy_(torch.where(torch.rand(w.shape, generator=g) < 0.3, 0.3 * torch.randn(w.shape, generator=g),
                                _true_weights()))
            b.fill_(0.5)
    opt = cls([w, b], lr=2e-2, eps=1e-3, seed=0)
    start = loss(w, b).item()
    for _ in range(200):
        opt.step(lambda: loss(w, b))
    assert loss(w, b).item() < 0.5 * start


@pytest.mark.parametrize("cls", [MeZO, SparseMeZO])
def test_a_resumed_run_is_identical(cls):
    w, b, loss = problem()
    opt = cls([w, b], lr=1e-2, weight_decay=0.01, seed=11)
    for _ in range(5):
        opt.step(lambda: loss(w, b))
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "w": w.detach().clone(), "b": b.detach().clone()}, buffer)
    for _ in range(5):
        opt.step(lambda: loss(w, b))
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    w2, b2 = nn.Parameter(saved["w"]), nn.Parameter(saved["b"])
    resumed = cls([w2, b2], lr=1e-2, weight_decay=0.01, seed=999)       # the file's seed wins
    resumed.load_state_dict(saved["opt"])
    for _ in range(5):
        resumed.step(lambda: loss(w2, b2))
    assert torch.equal(w2, w) and torch.equal(b2, b)
    assert resumed.steps == opt.steps == 10


def test_sparse_mezo_never_moves_the_large_entries():
    w, b, loss = problem()
    with torch.no_grad():
        b.copy_(torch.tensor([0.5, -0.01, 2.0]))
    start = [p.detach().clone() for p in (w, b)]
    out = [p.abs() > small_threshold(p, 0.7) for p in start]
    opt = SparseMeZO([w, b], lr=1e-2, weight_decay=0.1, sparsity=0.7)
    for _ in range(30):
        opt.step(lambda: loss(w, b))
    for p, s, o in zip((w, b), start, out):
        assert o.any() and torch.equal(p.detach()[o], s[o])
        assert not torch.equal(p.detach()[~o], s[~o])


def test_sparsity_zero_is_mezo():
    w, b, loss = problem()
    w2, b2 = (nn.Parameter(p.detach().clone()) for p in (w, b))
    a, s = MeZO([w, b], lr=1e-2, seed=4), SparseMeZO([w2, b2], lr=1e-2, seed=4, sparsity=0.0)
    for _ in range(3):
        a.step(lambda: loss(w, b))
        s.step(lambda: loss(w2, b2))
    assert torch.equal(w, w2) and torch.equal(b, b2)


def test_a_lora_adapter_trains_from_forward_passes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    x, y = torch.randn(32, 8), torch.randn(32, 2)
    dt.attach(model, dt.config("lora", r=2, targets=["0", "2"]))
    model.eval()            # deterministic forwards: dropout off, as the paper evaluates
    opt = build_optimizer("mezo", dt.parameter_groups(model, lr=5e-3), 5e-3, 0.0)
    assert is_zeroth_order(opt) and isinstance(opt, MeZO)
    closure = lambda: F.mse_loss(model(x), y)         # noqa: E731
    with torch.no_grad():
        start = closure().item()
    for _ in range(150):
        opt.step(closure)
    with torch.no_grad():
        assert closure().item() < 0.9 * start
    assert all(p.grad is None for p in model.parameters())


def test_registry_names():
    p = nn.Parameter(torch.zeros(3))
    for name, cls in (("mezo", MeZO), ("sparse_mezo", SparseMeZO)):
        opt = build_optimizer(name, [{"params": [p], "lr": 1e-4}], 1e-3, 0.01)
        assert type(opt) is cls and opt.zeroth_order and opt.param_groups[0]["lr"] == 1e-4
        assert opt.param_groups[0]["weight_decay"] == 0.01


def test_bad_input_is_refused_by_name():
    w, b, loss = problem()
    opt = MeZO([w, b], lr=1e-3)
    with pytest.raises(DeltatuneError, match="closure"):
        opt.step()
    for kw, field in (({"eps": 0.0}, "eps"), ({"eps": float("nan")}, "eps"), ({"lr": -1.0}, "lr"),
                      ({"weight_decay": -0.1}, "weight_decay"), ({"seed": 1.5}, "seed")):
        with pytest.raises(DeltatuneError, match=field):
            MeZO([w], **kw)
    for sparsity in (1.0, -0.1, float("inf")):
        with pytest.raises(DeltatuneError, match="sparsity"):
            SparseMeZO([w], sparsity=sparsity)
    with pytest.raises(DeltatuneError, match="zeroth_order"):
        opt.load_state_dict(torch.optim.SGD([w, b], lr=0.1).state_dict())


@pytest.mark.parametrize("closure_result", ["raise", "nan", "vector"])
def test_a_failing_closure_leaves_the_parameters_as_they_were(closure_result):
    w, b, loss = problem()
    start = [p.detach().clone() for p in (w, b)]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) < 2:
            return loss(w, b)
        if closure_result == "raise":
            raise RuntimeError("out of memory")
        return torch.tensor(float("nan")) if closure_result == "nan" else torch.ones(2)
    opt = MeZO([w, b], lr=1e-2)
    with pytest.raises(RuntimeError if closure_result == "raise" else DeltatuneError):
        opt.step(closure)
    for p, s in zip((w, b), start):
        assert (p.detach() - s).abs().max().item() < 1e-6
    assert opt.steps == 0


def test_the_state_dict_copies():
    w, b, loss = problem()
    thresholds = [small_threshold(p, 0.5) for p in (w, b)]
    opt = SparseMeZO([w, b], lr=1e-3, sparsity=0.5)
    opt.step(lambda: loss(w, b))
    state = copy.deepcopy(opt.state_dict())
    assert state["zeroth_order"] == {"seed": 0, "steps": 1}
    assert [state["state"][i]["threshold"] for i in range(2)] == pytest.approx(thresholds, abs=0)


def test_z_is_drawn_in_chunks_as_the_definition_with_chunked_draws(monkeypatch):
    """With ``Z_CHUNK`` = 16, a 10 x 13 tensor gets ``z`` as nine consecutive draws of 16 (the last
    of 2) from the step's seed: the update equals SPSA written out with that ``z``."""
    import deltatune.optim.mezo as mezo_module
    monkeypatch.setattr(mezo_module, "Z_CHUNK", 16)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(10, 13))
    w = torch.randn(10, 13)
    theta = p.detach().clone()
    opt = mezo_module.MeZO([p], lr=1e-2, eps=1e-3, seed=5)

    def loss():
        return (p * w).sum() ** 2 / 100

    opt.step(loss)
    gen = torch.Generator().manual_seed(mezo_module.step_seed(5, 0))
    z = torch.cat([torch.randn(min(16, 130 - s), generator=gen) for s in range(0, 130, 16)]).view(10, 13)
    value = lambda t: float(((t * w).sum() ** 2 / 100).double())     # noqa: E731
    g = (value(theta + 1e-3 * z) - value(theta - 1e-3 * z)) / 2e-3
    torch.testing.assert_close(p.detach(), theta - 1e-2 * g * z, rtol=1e-4, atol=1e-5)


def test_sparse_mezo_chunks_keep_large_entries_fixed(monkeypatch):
    import deltatune.optim.mezo as mezo_module
    monkeypatch.setattr(mezo_module, "Z_CHUNK", 16)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(7, 11))      # 77 entries: chunks of 16 and a last of 13
    before = p.detach().clone()
    opt = mezo_module.SparseMeZO([p], lr=1e-1, eps=1e-2, sparsity=0.5)
    for _ in range(3):
        opt.step(lambda: (p ** 3).sum())
    h = opt.state[p]["threshold"]
    large = before.abs() > h
    assert large.any() and (~large).any()
    assert torch.equal(p.detach()[large], before[large])
    assert not torch.equal(p.detach()[~large], before[~large])


def test_a_step_holds_one_chunk_of_z_not_the_largest_tensor():
    """A 4M-entry parameter (16 MB): the step's allocations above the parameter stay near one
    chunk of ``z`` (4 MB), far below a parameter-sized draw."""
    from deltatune.measure import allocator_peak
    from deltatune.optim.mezo import MeZO, Z_CHUNK
    p = torch.nn.Parameter(torch.zeros(2048, 2048))
    opt = MeZO([p], lr=1e-6)
    peak = allocator_peak(lambda: opt.step(lambda: p.sum()))
    assert peak <= 1.5 * Z_CHUNK * 4 < p.numel() * 4
