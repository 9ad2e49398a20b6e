"""Adapter diagnostics (``deltatune.diagnostics``, ``deltatune inspect FOLDER``): norms, spectra,
effective rank and intruder dimensions against values computed here with numpy, on weights
built by hand with known singular vectors; the intruder intervention; the command line on the
folders `deltatune train` writes."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune import cli
from deltatune.core.errors import DeltatuneError
from deltatune.diagnostics import Diagnosis, diagnose, diagnose_weights, scale_intruders, short_names
from models import tiny_bert_classifier

N = 16          # the hand-built layer is N x N
S0 = np.array([8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0])     # its nonzero singular values
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def orthogonal(seed: int, n: int = N) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q


class Host(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(N, N, bias=False)


def host(rank_one: tuple[float, np.ndarray, np.ndarray] | None = None) -> tuple[Host, np.ndarray, np.ndarray]:
    """A Linear with weight ``Q[:, :8] diag(S0) P[:, :8]ᵀ`` (Q, P random orthogonal) and a rank-1
    LoRA whose update is ``σ u vᵀ`` (``rank_one = (σ, u, v)``; default: set later)."""
    q, p = orthogonal(1), orthogonal(2)
    m = Host()
    with torch.no_grad():
        m.proj.weight.copy_(torch.from_numpy(q[:, :8] @ np.diag(S0) @ p[:, :8].T))
    dt.attach(m, dt.config("lora", r=1, alpha=1.0, targets=["proj"]))
    if rank_one is not None:
        set_update(m, *rank_one)
    return m, q, p


def set_update(m: Host, sigma: float, u: np.ndarray, v: np.ndarray) -> None:
    delta = m.proj.deltas["default"]
    with torch.no_grad():
        delta.lora_B.copy_(torch.from_numpy(sigma * u[:, None]))
        delta.lora_A.copy_(torch.from_numpy(v[None, :]))


def numpy_intruders(w0: np.ndarray, tuned: np.ndarray, k: int, eps: float, tol: float = 1e-4) -> list[int]:
    """The paper's count, written out: top-k left singular vectors of ``tuned`` whose largest
    |cos| with every left singular vector (nonzero singular value) of ``w0`` is below ``eps``."""
    u0, s0, _ = np.linalg.svd(w0)
    u, s, _ = np.linalg.svd(tuned)
    u0 = u0[:, s0 > tol * s0.max()]
    u = u[:, s > tol * s.max()][:, :k]
    return [i for i in range(u.shape[1]) if np.abs(u[:, i] @ u0).max() < eps]


def roy_vetterli(s: np.ndarray) -> float:
    p = s[s > 0] / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


# ----------------------------------------------------------------------------- intruders

def test_a_new_direction_is_exactly_one_intruder():
    q, p = orthogonal(1), orthogonal(2)
    # q[:, 8] is orthogonal to every column of W0; with sigma 5.5 it is the 4th singular vector
    m, _, _ = host((5.5, q[:, 8], p[:, 8]))
    row, = diagnose(m, k=10, epsilon=0.5).layers
    assert row.intruders == 1 and row.intruder_indices == (3,)
    assert row.max_cosines[3] < 1e-5 and min(c for i, c in enumerate(row.max_cosines) if i != 3) > 0.999
    assert len(row.max_cosines) == 9        # the tuned weight has rank 9: its null vectors are not tested
    assert row.delta_norm == pytest.approx(5.5, rel=1e-6)
    assert row.base_norm == pytest.approx(np.linalg.norm(S0), rel=1e-6)
    assert row.relative_norm == pytest.approx(5.5 / np.linalg.norm(S0), rel=1e-6)
    assert row.effective_rank == pytest.approx(1.0) and row.numerical_rank == 1
    assert row.singular_values[0] == pytest.approx(5.5, rel=1e-6)
    # below the tested part of the spectrum (k=3: the top three are W0's own) it is not counted
    assert diagnose(m, k=3).layers[0].intruders == 0


def test_rescaling_existing_singular_values_has_no_intruder():
    q, p = orthogonal(1), orthogonal(2)
    m, _, _ = host((3.0, q[:, 0], p[:, 0]))      # the top singular value 8 -> 11, vectors unchanged
    row, = diagnose(m).layers
    assert row.intruders == 0 and min(row.max_cosines) > 0.999
    assert row.delta_norm == pytest.approx(3.0, rel=1e-6) and row.effective_rank == pytest.approx(1.0)


def test_the_check_can_fail_a_mixed_direction_is_found_by_its_cosine():
    """Half in W0's column space, half outside: |cos| = sqrt(1/2) with one column; an intruder
    at epsilon 0.8, not at 0.5 (so the threshold is really applied)."""
    q, p = orthogonal(1), orthogonal(2)
    u = (q[:, 0] + q[:, 8]) / math.sqrt(2)
    m, _, _ = host((20.0, u, p[:, 8]))
    w = m.proj.weight.detach().double().numpy()
    tuned = w + 20.0 * np.outer(u, p[:, 8])
    for eps in (0.5, 0.8):
        row, = diagnose(m, epsilon=eps).layers
        assert list(row.intruder_indices) == numpy_intruders(w, tuned, 10, eps)
    assert diagnose(m, epsilon=0.5).layers[0].intruders == 0 and diagnose(m, epsilon=0.8).layers[0].intruders >= 1


def test_random_lora_on_a_bert_against_numpy():
    model = tiny_bert_classifier()
    dt.attach(model, dt.config("lora", r=4, alpha=8.0, targets=["query", "value"]))
    g = torch.Generator().manual_seed(0)
    for _, w in dt.core.engine.wrappers(model):
        d = w.deltas["default"]
        with torch.no_grad():
            d.lora_B.copy_(torch.randn(d.lora_B.shape, generator=g) * 0.6)
    diag = diagnose(model, k=10, epsilon=0.5)
    assert [r.layer for r in diag.layers] == [f"encoder.encoder.layer.{i}.attention.self.{n}"
                                              for i in range(2) for n in ("query", "value")]
    for row, (_, w) in zip(diag.layers, dt.core.engine.wrappers(model)):
        d = w.deltas["default"]
        a, b = d.lora_A.detach().double().numpy(), d.lora_B.detach().double().numpy()
        delta = 2.0 * b @ a
        w0 = w.base.weight.detach().double().numpy()
        s = np.linalg.svd(delta, compute_uv=False)
        assert row.delta_norm == pytest.approx(np.linalg.norm(delta), rel=1e-9)
        assert row.relative_norm == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(w0), rel=1e-9)
        assert row.effective_rank == pytest.approx(roy_vetterli(s), rel=1e-9)
        assert row.numerical_rank == 4 and row.shape == (32, 32)
        assert np.allclose(row.singular_values[:4], s[:4], rtol=1e-9)
        assert list(row.intruder_indices) == numpy_intruders(w0, w0 + delta, 10, 0.5)
    assert diag.intruders() == sum(r.intruders for r in diag.layers) > 0
    text = diag.table()
    assert "encoder.encoder.layer.1.attention.self.value" in text and f"{diag.intruders()} intruder dimensions" in text
    js = json.loads(json.dumps(diag.to_json()))
    assert js["totals"][0]["intruders"] == diag.intruders() and len(js["layers"]) == 4


def test_weight_delta_and_scaling_methods_give_their_update():
    """OFT (a WeightDelta: delta_2d) and IA3 (only a merge): ΔW against the merged weight the
    engine writes, and against IA3's formula diag(l - 1) W."""
    model = tiny_bert_classifier()
    dt.attach(model, dt.config("oft", targets=["query"]), name="oft")
    dt.attach(model, dt.config("ia3", targets=["value"]), name="ia3")
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".deltas." in n:
                p.add_(torch.randn_like(p) * 0.1)
    diag = diagnose(model)
    merged = copy.deepcopy(model)
    before = {n: w.base.weight.detach().double().clone() for n, w in dt.core.engine.wrappers(merged)}
    dt.merge(merged, ["oft", "ia3"])
    after = {n: w.base.weight.detach().double() for n, w in dt.core.engine.wrappers(merged)}
    assert {r.adapter for r in diag.layers} == {"oft", "ia3"} and len(diag.layers) == 4
    for row in diag.layers:
        assert row.delta_norm == pytest.approx(float((after[row.layer] - before[row.layer]).norm()), rel=1e-4)
        if row.adapter == "ia3":
            w = dict(dt.core.engine.wrappers(model))[row.layer]
            l = w.deltas["ia3"].ia3_l.detach().double()
            assert row.delta_norm == pytest.approx(float(((l - 1)[:, None] * before[row.layer]).norm()), rel=1e-9)
            assert row.numerical_rank == int((l != 1).sum())
    assert [r.layer for r in diagnose(model, "ia3").layers] == [f"encoder.encoder.layer.{i}.attention.self.value"
                                                                  for i in range(2)]


def test_non_weight_adapters_are_listed_and_skipped():
    model = tiny_bert_classifier()
    dt.attach(model, dt.config("prompt_tuning", num_virtual_tokens=2), name="prompt")
    dt.attach(model, dt.config("lora", r=2, targets=["query"]), name="lora")
    diag = diagnose(model)
    assert {r.adapter for r in diag.layers} == {"lora"}
    assert diag.skipped and all(s.adapter == "prompt" and "not a weight delta" in s.reason for s in diag.skipped)
    assert "skipped" in diag.table() and "not a weight delta" in diag.table()


def test_refusals_name_the_fix():
    model = tiny_bert_classifier()
    with pytest.raises(DeltatuneError, match="no adapter attached"):
        diagnose(model)
    dt.attach(model, dt.config("lora", r=2, targets=["query"]), name="task_a")
    with pytest.raises(DeltatuneError, match=r"no adapter named 'task_b'; attached: task_a"):
        diagnose(model, "task_b")
    with pytest.raises(DeltatuneError, match="k=0"):
        diagnose(model, k=0)
    with pytest.raises(DeltatuneError, match="epsilon=1.5"):
        diagnose(model, epsilon=1.5)
    with pytest.raises(DeltatuneError, match="factor=2"):
        scale_intruders(model, 2)
    with pytest.raises(DeltatuneError, match="adapters attached"):
        diagnose_weights(model, tiny_bert_classifier())


# ----------------------------------------------------------------------------- plain models

def test_diagnose_weights_compares_two_plain_models():
    base = tiny_bert_classifier()
    tuned = copy.deepcopy(base)
    name = "encoder.encoder.layer.0.attention.output.dense"
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():       # a small full-rank change everywhere, as full fine-tuning makes
        for n, p in tuned.named_parameters():
            if p.dim() == 2 and ".layer." in n:
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    diag = diagnose_weights(base, tuned)
    assert all(r.adapter == "full" for r in diag.layers) and len(diag.layers) == 2 * 6 + 2  # + pooler, head
    row = next(r for r in diag.layers if r.layer == name)
    w0 = base.encoder.encoder.layer[0].attention.output.dense.weight.detach().double().numpy()
    w1 = tuned.encoder.encoder.layer[0].attention.output.dense.weight.detach().double().numpy()
    s = np.linalg.svd(w1 - w0, compute_uv=False)
    assert row.delta_norm == pytest.approx(np.linalg.norm(w1 - w0), rel=1e-9)
    assert row.effective_rank == pytest.approx(roy_vetterli(s), rel=1e-9) and row.numerical_rank == 32
    assert diag.intruders() == 0 == len(numpy_intruders(w0, w1, 10, 0.5))
    pooler = next(r for r in diag.layers if r.layer == "encoder.pooler.dense")
    assert pooler.delta_norm == 0 and pooler.effective_rank == 0 and pooler.numerical_rank == 0
    only = diagnose_weights(base, tuned, modules=[name])
    assert [r.layer for r in only.layers] == [name]
    with pytest.raises(DeltatuneError, match="'nosuch' is not a weight matrix"):
        diagnose_weights(base, tuned, modules=["nosuch"])


# ----------------------------------------------------------------------------- intervention

def test_scale_intruders_removes_scales_or_keeps_them():
    q, p = orthogonal(1), orthogonal(2)
    w0 = torch.from_numpy(q[:, :8] @ np.diag(S0) @ p[:, :8].T).float()
    for factor in (0.0, 0.5, 1.0):
        m, _, _ = host((5.5, q[:, 8], p[:, 8]))
        merged_only = copy.deepcopy(m)
        dt.merge(merged_only)
        changed = scale_intruders(m, factor)
        s = np.linalg.svd(m.proj.base.weight.detach().double().numpy(), compute_uv=False)
        if factor == 1.0:
            assert changed == [] and torch.equal(m.proj.base.weight, merged_only.proj.base.weight)
        else:
            assert [c.layer for c in changed] == ["proj"] and changed[0].intruder_indices == (3,)
            assert changed[0].singular_values[0] == pytest.approx(5.5, rel=1e-6)
            expected = sorted([*S0, 5.5 * factor], reverse=True) if factor else list(S0)
            assert np.allclose(s[:len(expected)], expected, atol=1e-5)
        assert diagnose(m).layers[0].merged
        assert diagnose(m).intruders() == (1 if factor > 0 else 0)
        assert dt.summary(m, file=open("/dev/null", "w")) and m.proj.merged == ["default"]
        dt.unmerge(m)       # the pre-merge copy: the base weight bit for bit, edit and merge undone
        assert torch.equal(m.proj.base.weight, w0)


def test_scale_intruders_on_a_model_keeps_its_outputs_where_no_intruder_was():
    model = tiny_bert_classifier().eval()
    dt.attach(model, dt.config("lora", r=2, targets=["query", "value"]))
    x = torch.randint(0, 512, (2, 7))
    mask = torch.ones_like(x)
    ref = model(x, mask)        # LoRA at init: B = 0, nothing to scale
    assert scale_intruders(model, 0.0) == []
    torch.testing.assert_close(model(x, mask), ref)


# ----------------------------------------------------------------------------- plot

def test_plot_is_a_png_per_adapter(tmp_path):
    model = tiny_bert_classifier()
    dt.attach(model, dt.config("lora", r=2, targets=["query", "value"]), name="a")
    dt.attach(model, dt.config("lora", r=2, targets=["query"]), name="b")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    diag = diagnose(model, plot=tmp_path / "plots")
    assert [p.name for p in diag.plots] == ["diagnosis-a.png", "diagnosis-b.png"]
    for p in diag.plots:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    with pytest.raises(DeltatuneError, match="names one PNG file but 2 adapters"):
        diag.plot(tmp_path / "one.png")
    assert diagnose(model, "b").plot(tmp_path / "one.png")[0].read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.rglob("*.tmp"))


def test_short_names_tell_the_layers_of_a_block_apart():
    names = [f"encoder.encoder.layer.{i}.{n}" for i in (0, 1)
             for n in ("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense")]
    assert short_names(names)[:4] == ["L0 query", "L0 attention.output.dense", "L0 intermediate.dense",
                                      "L0 output.dense"]
    assert len(set(short_names(names))) == len(names)
    assert short_names(["classifier"]) == ["classifier"]


# ----------------------------------------------------------------------------- command line

transformers = pytest.importorskip("transformers")
from test_train import tiny_train_argv  # noqa: E402
from test_train import one_thread, tiny_model, toy_csv  # noqa: E402,F401  (fixtures)


@pytest.fixture(scope="module")
def lora_run(tiny_model, toy_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "run"
    assert cli.main(tiny_train_argv(tiny_model, toy_csv, out, epochs=1)) == 0
    return out


@pytest.fixture(scope="module")
def full_run(tiny_model, toy_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    argv = [a for a in tiny_train_argv(tiny_model, toy_csv, out, epochs=1)]
    argv = argv[:argv.index("--r")] + argv[argv.index("--dropout") + 2:]
    argv[argv.index("--lr") + 1] = "1e-3"
    assert cli.main([*argv, "--method", "full"]) == 0
    return out


def test_cli_inspect_an_adapter_folder(lora_run, tiny_model, tmp_path, capsys):
    capsys.readouterr()
    plots, report = tmp_path / "plots", tmp_path / "d.json"
    assert cli.main(["inspect", str(lora_run), "--plot", str(plots), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert f"lora adapter 'default' on base {tiny_model}" in out       # the base from the run's metrics.json
    assert "encoder.encoder.layer.1.attention.self.value" in out and "intruder dimensions in" in out
    png = plots / "diagnosis-default.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    js = json.loads(report.read_text())
    assert len(js["layers"]) == 4 and all(r["numerical_rank"] == 4 for r in js["layers"])
    # the same numbers as dt.diagnose on the model rebuilt by hand
    model = cli._adapter_model(lora_run, str(tiny_model), {"modules.classifier.weight": torch.zeros(3, 32)})[0]
    dt.load_adapter(model, lora_run)
    assert [r["delta_norm"] for r in js["layers"]] == [r.delta_norm for r in diagnose(model).layers]


def test_cli_inspect_a_full_fine_tune(full_run, tiny_model, capsys):
    capsys.readouterr()
    assert cli.main(["inspect", str(full_run), "--base", str(tiny_model)]) == 0
    out = capsys.readouterr().out
    assert "full fine-tune" in out and out.count("encoder.encoder.layer.") == 2 * 6
    assert "pooler" not in out and "classifier" not in out.split("\n", 1)[1]
    assert re.search(r"full fine-tune: \d+ intruder dimensions in \d+ of 12 layers", out)


def test_cli_scale_intruders_writes_the_edited_model(lora_run, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "edited"
    assert cli.main(["inspect", str(lora_run), "--scale-intruders", "0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "scaled the intruder components by 0" in text and "saved the edited merged model" in text
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "classifier.json").read_text())["intruders_scaled_by"] == 0
    assert cli.main(["inspect", str(lora_run), "--scale-intruders", "0", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_inspect_refusals(lora_run, full_run, tiny_model, tmp_path, capsys):
    capsys.readouterr()
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "notes.txt").write_text("x")
    cases = [
        (["inspect", str(neither)], "neither an adapter folder"),
        (["inspect", str(tiny_model), "--plot", str(tmp_path)], "is a model; give the folder to diagnose"),
        (["inspect", str(lora_run), "--model", str(tiny_model)], "not both"),
        (["inspect", str(lora_run), "--out", str(tmp_path / "o")], "add --scale-intruders"),
        (["inspect", str(lora_run), "--scale-intruders", "1.5"], "must be in [0, 1]"),
        (["inspect", str(full_run), "--scale-intruders", "0.5"], "holds a checkpoint but no adapter"),
        (["inspect", str(lora_run), "--k", "0"], "k=0"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "o").exists()


def test_cli_inspect_full_runs_without_their_last_weights(full_run, tiny_model, tmp_path, capsys):
    """A baseline keeps its weights only in the checkpoint of a complete epoch: a run cut inside
    its first has none (refused), one cut later is diagnosed at its last checkpoint (said so)."""
    import shutil
    cut = tmp_path / "cut"
    shutil.copytree(full_run, cut)
    metrics = json.loads((cut / "metrics.json").read_text())
    metrics["steps"] += 5
    (cut / "metrics.json").write_text(json.dumps(metrics))
    capsys.readouterr()
    assert cli.main(["inspect", str(cut), "--base", str(tiny_model)]) == 0
    assert f"holds the weights after epoch 1 (step {metrics['steps'] - 5})" in capsys.readouterr().out
    (cut / "checkpoint.safetensors").unlink()
    assert cli.main(["inspect", str(cut)]) == 2
    assert "stopped (--budget-seconds) inside its first" in capsys.readouterr().err


def test_cli_inspect_a_model_still_lists_its_modules(tiny_model, capsys):
    for argv in (["inspect", str(tiny_model)], ["inspect", "--model", str(tiny_model)]):
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        assert "encoder.layer.0.attention.self.query" in out and "lora default targets: query, value" in out


def test_diagnosis_record_is_json_ready():
    m, q, p = host((5.5, orthogonal(1)[:, 8], orthogonal(2)[:, 8]))
    diag = diagnose(m)
    assert isinstance(diag, Diagnosis)
    js = diag.to_json()
    assert json.loads(json.dumps(js)) == js and js["layers"][0]["intruders"] == 1 and js["k"] == 10
