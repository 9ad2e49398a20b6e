"""Projected optimizers: GaLoreAdamW (32- and 8-bit states), Flora, Apollo, ApolloMini, and their
shared helper deltatune.optim._projection. References are written here from the papers'
update rules; galore-torch is a second, independent reference for GaLore."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import deltatune.optim as optim
from deltatune.core.errors import DeltatuneError
from deltatune.optim import Apollo, ApolloMini, Flora, GaLoreAdamW, build_optimizer
from deltatune.optim._projection import (as_matrix, gaussian_projector, projection_side, randomized_svd,
                                         resolve_rank)

pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py

VARIANTS = {
    "galore": lambda ps, **kw: GaLoreAdamW(ps, **kw),
    "galore8": lambda ps, **kw: GaLoreAdamW(ps, state_bits=8, **kw),
    "flora": lambda ps, **kw: Flora(ps, **kw),
    "apollo": lambda ps, **kw: Apollo(ps, **kw),
    "apollo_mini": lambda ps, **kw: ApolloMini(ps, **kw),
}


class Net(nn.Module):
    """Wide and tall linears, a conv kernel (4-D), biases: every kind of parameter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.up = nn.Linear(6, 40)
        self.down = nn.Linear(40, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.down(torch.relu(self.up(h)))


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(n)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def groups(model):
    # two rates, so per-group learning rates are exercised
    return [{"params": [model.conv.weight, model.conv.bias, model.up.weight], "lr": 1e-2},
            {"params": [model.up.bias, model.down.weight, model.down.bias], "lr": 3e-2}]


# ---------------------------------------------------------------- _projection


def test_randomized_svd_recovers_an_exact_low_rank_matrix():
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(60, 5, generator=g)).Q
    v = torch.linalg.qr(torch.randn(90, 5, generator=g)).Q
    s = torch.tensor([9.0, 5.0, 3.0, 1.5, 0.5])
    a = u @ torch.diag(s) @ v.T
    out = randomized_svd(a, 5, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out.S, s, atol=1e-4)
    assert torch.allclose(out.U.T @ out.U, torch.eye(5), atol=1e-5)
    assert torch.allclose(out.Vh @ out.Vh.T, torch.eye(5), atol=1e-5)
    assert torch.allclose(out.U @ torch.diag(out.S) @ out.Vh, a, atol=1e-4)
    # top 3 of the 5: the same leading values; bf16 input is computed in float32
    top = randomized_svd(a.to(torch.bfloat16), 3, generator=torch.Generator().manual_seed(1))
    assert top.U.dtype == torch.float32 and top.U.shape == (60, 3) and top.Vh.shape == (3, 90)
    assert torch.allclose(top.S, s[:3], rtol=2e-2)


def test_projection_side_as_matrix_and_rank_resolution():
    assert projection_side((4, 9)) == "left" and projection_side((9, 4)) == "right"
    assert projection_side((5, 5)) == "left"
    assert projection_side((8, 3, 3, 3)) == "left"            # 8 x 27
    k = torch.zeros(8, 3, 3, 3)
    assert as_matrix(k).shape == (8, 27) and as_matrix(k).data_ptr() == k.data_ptr()
    assert resolve_rank("w", 0.25, (384, 1536)) == 96
    assert resolve_rank("w", 0.25, (384, 1536), min_rank=16) == 96
    assert resolve_rank("head", 0.25, (5, 384), min_rank=16) == 5          # floor, capped by the side
    assert resolve_rank("w", 0.25, (40, 60), min_rank=16) == 16
    assert resolve_rank("w", 7, (40, 60)) == 7
    with pytest.raises(DeltatuneError, match=r"'w'.*\(40, 60\).*largest valid rank is 40"):
        resolve_rank("w", 41, (40, 60))
    for bad in (0, -3, 0.0, 1.5, "8", True):
        with pytest.raises(DeltatuneError):
            resolve_rank("w", bad, (40, 60))


def test_gaussian_projector_is_a_seeded_unbiased_sketch():
    a = gaussian_projector(30, 6, seed=3)
    assert torch.equal(a, gaussian_projector(30, 6, seed=3))
    assert not torch.equal(a, gaussian_projector(30, 6, seed=4))
    mean = sum(gaussian_projector(30, 6, seed=s) @ gaussian_projector(30, 6, seed=s).T for s in range(400)) / 400
    assert torch.allclose(mean, torch.eye(30), atol=0.2)           # E[A A^T] = I


# ---------------------------------------------------------------- GaLore against references


@pytest.mark.parametrize("shape", [(4, 7), (7, 4)])
@pytest.mark.parametrize("svd", ["randomized", "exact"])
def test_galore_full_rank_with_a_permutation_projector_is_adamw(shape, svd):
    """Adam is equivariant under signed permutations of coordinates; a first gradient with
    orthogonal rows (columns, for a tall matrix) of distinct norms has a signed permutation for
    its singular vectors, so full-rank GaLore (scale 1, no refresh) must be AdamW step for step."""
    m, n = shape
    g = torch.Generator().manual_seed(0)
    d = min(m, n)
    norms = torch.tensor([2.0, 4.0, 1.0, 3.0])[:d]             # a 4-cycle: P is not its own inverse
    basis = torch.linalg.qr(torch.randn(max(m, n), d, generator=g)).Q.T   # d orthonormal rows
    first = norms[:, None] * basis if m <= n else (norms[:, None] * basis).T
    x, y = torch.randn(32, n, generator=g), torch.randn(32, m, generator=g)

    def run(make):
        torch.manual_seed(0)
        w, b = nn.Parameter(torch.randn(m, n)), nn.Parameter(torch.randn(m))
        opt = make([{"params": [w], "lr": 1e-2}, {"params": [b], "lr": 3e-2}])
        out = []
        for step in range(8):
            opt.zero_grad()
            loss = (first * w).sum() + b.sum() if step == 0 else ((x @ w.T + b - y) ** 2).mean()
            loss.backward()
            opt.step()
            out.append(torch.cat([w.detach().flatten(), b.detach()]))
        return out

    ours = run(lambda gs: GaLoreAdamW(gs, weight_decay=0.1, rank=1.0, scale=1.0, update_proj_gap=1000, svd=svd))
    ref = run(lambda gs: torch.optim.AdamW(gs, weight_decay=0.1))
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_galore_two_steps_match_a_hand_written_reference():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 10, generator=g)
    grads = [torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)]
    lr, wd, b1, b2, eps, r, scale = 0.1, 0.05, 0.9, 0.999, 1e-8, 2, 0.5

    # the paper's rule, left side (6 <= 10): P from the first gradient's SVD, kept for step 2 (T=2)
    u, _, _ = torch.linalg.svd(grads[0], full_matrices=False)
    p = u[:, :r]
    w, mom, var = w0.clone(), torch.zeros(r, 10), torch.zeros(r, 10)
    for t, grad in enumerate(grads, start=1):
        low = p.T @ grad
        mom = b1 * mom + (1 - b1) * low
        var = b2 * var + (1 - b2) * low ** 2
        n_t = (mom / (1 - b1 ** t)) / ((var / (1 - b2 ** t)).sqrt() + eps)
        w = w * (1 - lr * wd) - lr * scale * (p @ n_t)

    for svd in ("exact", "randomized"):
        param = nn.Parameter(w0.clone())
        opt = GaLoreAdamW([param], lr=lr, weight_decay=wd, rank=r, scale=scale, update_proj_gap=2, svd=svd)
        for grad in grads:
            param.grad = grad.clone()
            opt.step()
        assert torch.allclose(param.detach(), w, atol=1e-4), (svd, (param.detach() - w).abs().max())


def test_galore_matches_galore_torch_across_a_projector_refresh():
    galore_torch = pytest.importorskip("galore_torch")
    data = batches(7)

    def run(make_groups, cls, **kw):
        model = Net()
        opt = cls(make_groups(model), **kw)
        train(model, opt, data)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    def peer_groups(model):
        return [{"params": [model.up.weight, model.down.weight], "rank": 4, "update_proj_gap": 3, "scale": 0.5,
                 "proj_type": "std"},
                {"params": [model.conv.weight, model.conv.bias, model.up.bias, model.down.bias], "rank": None}]

    def our_groups(model):
        g = peer_groups(model)
        return [{"params": g[0]["params"]}, {"params": g[1]["params"], "rank": None}]

    # galore-torch adds eps before its bias correction (torch after): a tiny eps makes that moot
    peer = run(lambda m: [{k: v for k, v in g.items() if v is not None} for g in peer_groups(m)],
               galore_torch.GaLoreAdamW, lr=1e-2, eps=1e-12, weight_decay=0.0, no_deprecation_warning=True)
    ours = run(our_groups, GaLoreAdamW, lr=1e-2, eps=1e-12, rank=4, update_proj_gap=3, scale=0.5, svd="exact")
    assert torch.allclose(ours, peer, atol=1e-5), (ours - peer).abs().max()


def test_galore_8bit_is_close_to_32bit_and_smaller():
    """On one fixed sequence of gradients (so training feedback cannot amplify differences) the
    8-bit moments move the weights within 5 % of the distance the 32-bit run travels (about what
    bitsandbytes' dynamic 8-bit code gives here), with under a third of the state."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(64, 8, generator=g) @ torch.randn(8, 300, generator=g) * torch.rand(1, 300, generator=g)
             + 0.1 * torch.randn(64, 300, generator=g) for _ in range(30)]
    w0 = torch.randn(64, 300, generator=g)
    out, state = {}, {}
    for bits in (32, 8):
        w = nn.Parameter(w0.clone())
        opt = GaLoreAdamW([w], lr=1e-2, state_bits=bits)
        for grad in grads:
            w.grad = grad.clone()
            opt.step()
        out[bits], state[bits] = w.detach(), opt.state_bytes()
    assert (out[8] - out[32]).norm() <= 0.05 * (out[32] - w0).norm()
    assert (out[8] - out[32]).norm() > 0                      # the 8-bit path did run
    assert state[8] < state[32] / 3


# ---------------------------------------------------------------- Apollo and Flora against references


@pytest.mark.parametrize("cls", [Apollo, ApolloMini])
@pytest.mark.parametrize("shape", [(6, 20), (20, 6)])
def test_apollo_scaling_and_norm_growth_limiter_match_a_hand_computation(cls, shape):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(*shape, generator=g)
    grad1 = torch.randn(*shape, generator=g)
    grads = [grad1, 5 * grad1 + torch.randn(*shape, generator=g)]      # the norm grows: the limiter acts
    lr, wd, b1, b2, eps = 0.1, 0.01, 0.9, 0.999, 1e-8
    param = nn.Parameter(w0.clone())
    opt = cls([param], lr=lr, weight_decay=wd, rank=3 if cls is Apollo else 1)
    group = opt.param_groups[0]
    r, d = (3 if cls is Apollo else 1), min(shape)
    left = shape[0] <= shape[1]
    w, mom, var, prev = w0.clone(), None, None, None
    for t, grad in enumerate(grads, start=1):
        p = opt.projector(param, group, t - 1)
        assert p.shape == (d, r)
        low = p.T @ grad if left else grad @ p
        mom = (1 - b1) * low if mom is None else b1 * mom + (1 - b1) * low
        var = (1 - b2) * low ** 2 if var is None else b2 * var + (1 - b2) * low ** 2
        rt = (mom / (1 - b1 ** t)) / ((var / (1 - b2 ** t)).sqrt() + eps)
        if cls is Apollo:       # one factor per column (left: r x n state) or per row (right)
            s = rt.norm(dim=0) / low.norm(dim=0) if left else rt.norm(dim=1) / low.norm(dim=1)
            scaled = grad * s[None, :] if left else grad * s[:, None]
        else:
            scaled = grad * (rt.norm() / low.norm())
        if prev is not None and scaled.norm() > 1.01 * prev:
            scaled = scaled * (1.01 * prev / scaled.norm())
        prev = scaled.norm()
        w = w * (1 - lr * wd) - lr * math.sqrt(d / r) * scaled
        param.grad = grad.clone()
        opt.step()
        assert torch.allclose(param.detach(), w, atol=1e-5), (t, (param.detach() - w).abs().max())


@pytest.mark.parametrize("cls", [Apollo, ApolloMini])
def test_apollo_default_scale_gives_adamw_sized_first_steps(cls):
    """The default alpha = sqrt(d / r) undoes the sketch's shrinking of Adam's direction."""
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(64, 256, generator=g) * torch.rand(1, 256, generator=g)
    moves = {}
    for name, make in (("ours", cls), ("adamw", torch.optim.AdamW)):
        w = nn.Parameter(torch.zeros(64, 256))
        opt = make([w], lr=1.0)
        w.grad = grad.clone()
        opt.step()
        moves[name] = w.detach().norm()
    assert 0.7 < float(moves["ours"] / moves["adamw"]) < 1.4


def test_apollo_projector_is_regenerated_and_resampled_every_gap():
    w = nn.Parameter(torch.zeros(8, 30))
    opt = Apollo([w], rank=4, update_proj_gap=3)
    group = opt.param_groups[0]
    assert torch.equal(opt.projector(w, group, 0), opt.projector(w, group, 2))
    assert not torch.equal(opt.projector(w, group, 2), opt.projector(w, group, 3))
    w.grad = torch.ones_like(w)
    opt.step()
    assert all(v.numel() < w.numel() for v in opt.state[w].values() if isinstance(v, torch.Tensor))


def test_flora_two_steps_with_a_resampling_match_a_hand_written_reference():
    g = torch.Generator().manual_seed(0)
    m, n, r = 6, 14, 3
    w0 = torch.randn(m, n, generator=g)
    grads = [torch.randn(m, n, generator=g), torch.randn(m, n, generator=g)]
    lr, wd, b1, b2 = 0.1, 0.01, 0.9, 0.999
    param = nn.Parameter(w0.clone())
    opt = Flora([param], lr=lr, weight_decay=wd, rank=r, update_proj_gap=1, clip_threshold=0.5)
    group = opt.param_groups[0]
    w, comp, row, col = w0.clone(), torch.zeros(r, n), torch.zeros(m), torch.zeros(n)
    for t, grad in enumerate(grads, start=1):
        a = opt.projector(param, group, t - 1)
        if t > 1:          # T = 1: every step resamples; the momentum moves to the new projection
            comp = a.T @ (opt.projector(param, group, t - 2) @ comp)
        sq = grad ** 2 + 1e-30
        row = b2 * row + (1 - b2) * sq.mean(dim=1)
        col = b2 * col + (1 - b2) * sq.mean(dim=0)
        v = torch.outer(row, col) / row.mean() / (1 - b2 ** t)
        u = grad / v.sqrt()
        direction = (b1 * (a @ comp) + (1 - b1) * u) / (1 - b1 ** t)
        comp = b1 * comp + (1 - b1) * (a.T @ u)
        rms = direction.pow(2).mean().sqrt()
        direction = direction / max(1.0, float(rms) / 0.5)
        w = w * (1 - lr * wd) - lr * direction
        param.grad = grad.clone()
        opt.step()
        assert torch.allclose(param.detach(), w, atol=1e-5), (t, (param.detach() - w).abs().max())
    assert torch.allclose(opt.state[param]["momentum"], comp, atol=1e-5)


# ---------------------------------------------------------------- state memory, state_dict, errors


def test_state_bytes_follow_the_documented_formulas():
    model = Net()
    shapes = {"conv": (6, 27), "up": (40, 6), "down": (5, 40)}          # matrix views
    vectors = 6 + 40 + 5                                                # biases: AdamW, 2 x fp32 each
    data = batches(1)

    def ranks(rank):
        return {k: resolve_rank(k, rank, s, min_rank=16) for k, s in shapes.items()}

    def blocks(numel):
        return numel + 4 * math.ceil(numel / 256)

    expected = {
        "galore": sum(4 * min(s) * r + 8 * r * max(s) for (k, s), r in zip(shapes.items(), ranks(0.25).values())),
        "galore8": sum(4 * min(s) * r + 2 * blocks(r * max(s))
                       for (k, s), r in zip(shapes.items(), ranks(0.25).values())),
        "flora": sum(4 * r * max(s) + 4 * (s[0] + s[1]) for (k, s), r in zip(shapes.items(), ranks(0.25).values())),
        "apollo": sum(8 * r * max(s) + 4 for (k, s), r in zip(shapes.items(), ranks(0.25).values())),
        "apollo_mini": sum(8 * max(s) + 4 for s in shapes.values()),
    }
    for name, make in VARIANTS.items():
        m = copy.deepcopy(model)
        opt = make(m.parameters(), lr=1e-3)
        train(m, opt, data)
        assert opt.state_bytes() == expected[name] + 8 * vectors, name


def test_optimizer_state_bytes_counts_tensors_and_quantised_records():
    from deltatune.optim._projection import optimizer_state_bytes
    from deltatune.optim._state8bit import quantize_state
    w = nn.Parameter(torch.zeros(10, 30))
    opt = torch.optim.SGD([w], lr=0.1)
    opt.state[w] = {"step": 3, "m": torch.zeros(10, 30), "q": quantize_state(torch.ones(300), signed=True),
                    "pair": (torch.zeros(5, dtype=torch.float16), torch.zeros(2, dtype=torch.int8))}
    assert optimizer_state_bytes(opt) == 4 * 300 + (300 + 4 * 2) + (2 * 5 + 2)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_state_dict_round_trip_continues_exactly(name):
    make = VARIANTS[name]
    data = batches(12)
    kw = dict(update_proj_gap=4)                  # a refresh after the reload, too

    whole = Net()
    opt = make(groups(whole), **kw)
    train(whole, opt, data)

    first = Net()
    opt1 = make(groups(first), **kw)
    train(first, opt1, data[:6])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    second = Net()
    second.load_state_dict(saved["model"])
    opt2 = make(groups(second), **kw)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state_bytes() == opt1.state_bytes()
    train(second, opt2, data[6:])
    for a, b in zip(whole.parameters(), second.parameters()):
        assert torch.equal(a, b), name


def test_load_state_dict_keeps_float32_states_of_bf16_weights():
    w = nn.Parameter(torch.randn(8, 20).to(torch.bfloat16))
    opt = GaLoreAdamW([w], rank=4)
    w.grad = torch.randn_like(w)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    opt2 = GaLoreAdamW([w], rank=4)
    opt2.load_state_dict(state)
    assert {v.dtype for v in opt2.state[w].values() if isinstance(v, torch.Tensor)} == {torch.float32}


def test_defaults_project_every_matrix_and_fit_the_state_budget():
    """With defaults, every matrix (embedding included) keeps a small state, and on MiniLM's
    parameter shapes the state is at most 0.45 of AdamW's (the issue's bound)."""
    hidden, ffn, vocab = 384, 1536, 30522
    shapes = [(vocab, hidden), (512, hidden), (2, hidden)]
    shapes += [(hidden, hidden)] * 4 * 6 + [(ffn, hidden), (hidden, ffn)] * 6 + [(hidden, hidden), (5, hidden)]
    vectors = [hidden] * (2 + 6 * 9 + 1) + [ffn] * 6 + [5]
    params = [nn.Parameter(torch.zeros(s)) for s in shapes] + [nn.Parameter(torch.zeros(k)) for k in vectors]
    assert 22_500_000 < sum(p.numel() for p in params) < 22_900_000
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    adamw = 8 * sum(p.numel() for p in params)
    for name, make in VARIANTS.items():
        opt = make(params, lr=0.0)
        opt.step()
        for p in params[:len(shapes)]:
            if p.shape[0] > 5:      # the 5 x 384 head and 2 x 384 token types are below the rank floor
                assert all(v.numel() < p.numel() for v in opt.state[p].values() if isinstance(v, torch.Tensor))
        assert opt.state_bytes() <= 0.45 * adamw, (name, opt.state_bytes() / adamw)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_defaults_train(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    opt = VARIANTS[name](model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        first = first if first is not None else float(loss.detach())
        loss.backward()
        opt.step(lambda: None)
    assert float(loss) < 0.1 * first


@pytest.mark.parametrize("make", [
    lambda ps: GaLoreAdamW(ps, rank=7),                       # 6 x 27 conv kernel: at most 6
    lambda ps: Flora(ps, rank=0),
    lambda ps: Apollo(ps, rank=-1),
    lambda ps: GaLoreAdamW(ps, rank=1.5),
    lambda ps: GaLoreAdamW(ps, update_proj_gap=0),
    lambda ps: Apollo(ps, update_proj_gap=2.5),
    lambda ps: GaLoreAdamW(ps, state_bits=4),
    lambda ps: GaLoreAdamW(ps, svd="qr"),
    lambda ps: GaLoreAdamW(ps, scale=0.0),
    lambda ps: Apollo(ps, scale_type="row"),
    lambda ps: Apollo(ps, scale=-1.0),
    lambda ps: ApolloMini(ps, norm_growth_limit=0.5),
    lambda ps: Flora(ps, clip_threshold=0),
    lambda ps: Flora(ps, betas=(0.9, 1.0)),
    lambda ps: GaLoreAdamW(ps, lr=-1.0),
])
def test_bad_options_fail_before_any_step(make):
    with pytest.raises(DeltatuneError):
        make(Net().parameters())


def test_rank_error_names_the_parameter_shape_and_the_largest_rank():
    model = Net()
    named = [{"params": [p for _, p in model.named_parameters()],
              "param_names": [n for n, _ in model.named_parameters()]}]
    with pytest.raises(DeltatuneError, match=r"'conv.weight'.*\(6, 3, 3, 3\).*largest valid rank is 6"):
        GaLoreAdamW(named, rank=7)
    # a group may set its own rank; a bad one fails as the group is added
    opt = Apollo([model.up.weight], rank=2)
    with pytest.raises(DeltatuneError, match="largest valid rank is 5"):
        opt.add_param_group({"params": [model.down.weight], "rank": 6})


def test_registry_names_build_the_optimizers():
    model = Net()
    expected = {"galore_adamw": GaLoreAdamW, "galore_adamw8bit": GaLoreAdamW, "flora": Flora, "apollo": Apollo,
                "apollo_mini": ApolloMini}
    for name, cls in expected.items():
        opt = build_optimizer(name, [{"params": list(model.parameters()), "lr": 1e-3}], 1e-3, 0.01)
        assert type(opt) is cls and opt.param_groups[0]["weight_decay"] == 0.01
    assert build_optimizer("galore_adamw8bit", [{"params": list(model.parameters())}], 1e-3, 0.0).state_bits == 8
    assert optim.GaLoreAdamW is GaLoreAdamW
