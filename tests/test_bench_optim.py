"""``deltatune bench optim`` end to end on a tiny random-init BERT and a small keyword task (the
builders of test_train.py), and its pieces: the state-size count, the plan, the ratios."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from deltatune.bench.optim import (PEERS, _apollo_torch, _galore_torch, add_arguments, analyse,  # noqa: E402
                                   main_optim, parse_lrs, parse_optimizers, state_bytes)
from deltatune.core.errors import DeltatuneError  # noqa: E402
from test_train import make_dataset, make_tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models run far faster on one thread, here and in the bench's child processes."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_bench_optim_report_fields_ratios_and_peers(tmp_path):
    model, data = make_tiny_model(tmp_path / "tiny_bert"), make_dataset(tmp_path / "toy.csv")
    out, work = tmp_path / "report", tmp_path / "work"
    names = ",".join(["galore_adamw", "apollo_mini", *PEERS])
    ns = parse(["--task", str(data), "--model", str(model), "--optimizers", names,
                "--epochs", "1", "--batch-size", "16", "--max-length", "24", "--device", "cpu", "--out", str(out),
                "--work-dir", str(work)])
    assert main_optim(ns) == 0

    results = json.loads((out / "results.json").read_text())
    runs = {r["optimizer"]: r for r in results["runs"]}
    assert list(runs) == ["adamw", "galore_adamw", "apollo_mini", *PEERS]       # the reference first
    assert all(r["status"] == "ok" for r in runs.values())
    assert results["command"].startswith("deltatune bench optim --task ")
    assert results["settings"]["method"] == "full" and results["metric"] == "test_accuracy"

    # AdamW keeps two fp32 moments per element and a 0-d fp32 step per parameter
    adamw = runs["adamw"]
    assert adamw["optim"]["param_elements"] == adamw["metrics"]["trainable_params"]
    elements, tensors = adamw["optim"]["stepped_elements"], adamw["optim"]["stepped_tensors"]
    assert 0.99 * adamw["optim"]["param_elements"] < elements <= adamw["optim"]["param_elements"]
    assert adamw["optim"]["state_bytes"] == 8 * elements + 4 * tensors
    assert adamw["derived"]["state_mb_vs_adamw"] == pytest.approx(1.0)
    assert adamw["derived"]["score_minus_adamw"] == pytest.approx(0.0)
    for name in ("galore_adamw", "apollo_mini", *PEERS):
        d = runs[name]["derived"]
        assert d["state_mb_vs_adamw"] < 0.8, name
        assert d["step_seconds"] > 0 and d["peak_mb"] > 0 and d["step_seconds_vs_adamw"] > 0
        acc = runs[name]["metrics"]["test_accuracy"]
        assert d["score_minus_adamw"] == pytest.approx(100 * (acc - adamw["metrics"]["test_accuracy"]))
    assert runs["apollo_mini"]["derived"]["state_mb_vs_adamw"] < runs["galore_adamw"]["derived"]["state_mb_vs_adamw"]
    assert runs["peer:galore_torch"]["optim"]["class"] == "galore_torch.adamw.AdamW"
    assert not any((work / n.replace(":", "_") / "checkpoint.safetensors").exists() for n in runs)

    report = (out / "report.md").read_text()
    assert results["command"] in report and "state vs AdamW" in report and "step vs AdamW" in report
    for name in runs:
        assert f"| `{name}` | ok |" in report
    assert (out / "metric_vs_state.png").stat().st_size > 1000
    with pytest.raises(DeltatuneError, match="already holds a report"):
        main_optim(ns)

    # notes added to results.json by hand appear in the report rewritten from it
    results["notes"] = ["adamw ran under heavier load"]
    (out / "results.json").write_text(json.dumps(results))
    assert main_optim(parse(["--replot", str(out)])) == 0
    assert "## Notes\n\n- adamw ran under heavier load" in (out / "report.md").read_text()


def test_state_bytes_count_projectors_inside_objects_once():
    w, b = nn.Parameter(torch.randn(24, 40)), nn.Parameter(torch.zeros(24))
    groups = [{"params": [w, b], "lr": 1e-3}]
    for make in (_galore_torch, _apollo_torch):
        opt = make(groups, 1e-3, 0.0)
        loss = (w.sum(1) * torch.arange(24.0)).pow(2).sum() + b.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        r = 16                                      # max(ceil(0.25 * 24), 16)
        moments = 2 * 4 * r * 40 + 2 * 4 * 24       # projected moments of w, full ones of b
        # GaLore keeps a view of the whole U (24 x 24); APOLLO its random 24 x r and a 0-d limiter norm
        projector = 4 * 24 * 24 if make is _galore_torch else 4 * 24 * r + 4
        assert state_bytes(opt) == moments + projector, make.__name__
    opt.state[w]["again"] = opt.state[w]["exp_avg"]           # one storage, counted once
    assert state_bytes(opt) == moments + projector


def test_plan_errors_and_ratios():
    assert parse_optimizers("galore_adamw,adamw")[:2] == ["adamw", "galore_adamw"]
    assert parse_optimizers(None)[0] == "adamw" and "adam" not in parse_optimizers(None)
    assert set(PEERS) <= set(parse_optimizers(None))
    with pytest.raises(DeltatuneError, match="unknown nosuch"):
        parse_optimizers("nosuch")
    assert parse_lrs('{"apollo": {"lr": 1e-4}}', ["adamw", "apollo"]) == {"apollo": 1e-4}
    for bad in ('{"apollo": {"rank": 4}}', '{"flora": {"lr": 1}}', "not json"):
        with pytest.raises(DeltatuneError):
            parse_lrs(bad, ["adamw", "apollo"])

    def rec(name, acc, state, seconds, steps=10):
        return {"optimizer": name, "status": "ok", "optim": {"state_bytes": state},
                "metrics": {"test_accuracy": acc, "train_seconds": seconds, "steps": steps, "peak_memory_mb": 100.0}}

    runs = [rec("adamw", 0.90, 2 ** 21, 2.0), rec("x", 0.885, 2 ** 19, 3.0), {"optimizer": "y", "status": "failed"}]
    summary = analyse(runs, "test_accuracy")
    assert summary["memory_key"] == "peak_memory_mb" and summary["reference_ran"]
    d = runs[1]["derived"]
    assert d["state_mb"] == 0.5 and d["state_mb_vs_adamw"] == 0.25
    assert d["step_seconds_vs_adamw"] == pytest.approx(1.5) and d["peak_mb_vs_adamw"] == 1.0
    assert d["score_minus_adamw"] == pytest.approx(-1.5) and runs[2]["derived"] == {}
    assert math.isclose(runs[0]["derived"]["score_minus_adamw"], 0.0)
