"""The full / head-only baselines and the time budget of the training loop, and
``deltatune bench methods`` end to end, on a tiny random-init BERT and a small keyword task
(the builders of test_train.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from deltatune import cli  # noqa: E402
from deltatune.bench.methods import analyse, pareto_front, report_markdown  # noqa: E402
from deltatune.train.checkpoint import CHECKPOINT_FILE, load_checkpoint  # noqa: E402
from deltatune.train.loop import BASELINES, TrainArgs, train  # noqa: E402
from test_train import make_dataset, make_tiny_model  # noqa: E402

HIDDEN, LABELS = 32, 3


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def toy_csv(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("toy_data") / "toy.csv")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models run far faster on one thread, here and in the bench's child processes."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_args(model: Path, data: Path, out: Path, **kw) -> TrainArgs:
    base = dict(model=str(model), data=str(data), epochs=1, batch_size=16, max_length=24, out=str(out),
                progress=False, device="cpu")
    return TrainArgs(**{**base, **kw})


# ----------------------------------------------------------------------------- baselines

def test_head_baseline_trains_only_the_head(tiny_model, toy_csv, tmp_path):
    m = train(tiny_args(tiny_model, toy_csv, tmp_path / "head", method="head"))
    assert m["trainable_params"] == HIDDEN * LABELS + LABELS
    assert m["lr"] == BASELINES["head"] and m["method_config"] == {"baseline": "head"}
    assert not (tmp_path / "head" / "adapter.safetensors").exists()     # not an adapter: the checkpoint holds it
    assert set(load_checkpoint(tmp_path / "head" / CHECKPOINT_FILE).params) == {"classifier.weight",
                                                                                 "classifier.bias"}


def test_full_baseline_trains_every_parameter(tiny_model, toy_csv, tmp_path):
    m = train(tiny_args(tiny_model, toy_csv, tmp_path / "full", method="full"))
    assert m["trainable_params"] == m["total_params"] > 900_000      # the 30522-token embedding is most of it
    assert m["lr"] == BASELINES["full"] and 0 <= m["test_accuracy"] <= 1
    assert not (tmp_path / "full" / "adapter_config.json").exists()


def test_baselines_take_no_method_options():
    with pytest.raises(ValueError, match="baseline without options"):
        TrainArgs(method="full", method_options={"r": 8}).validate()


# ----------------------------------------------------------------------------- time budget

def test_budget_stops_after_the_current_step_and_evaluates(tiny_model, toy_csv, tmp_path):
    out = tmp_path / "budget"
    m = train(tiny_args(tiny_model, toy_csv, out, method="lora", method_options={"r": 2}, epochs=3,
                        budget_seconds=1e-6))
    assert m["stopped_early"] is True and m["steps"] == 1
    assert m["planned_steps"] == 3 * 9         # 144 training texts / 16: the schedule is planned for 3 epochs
    assert m["epochs_completed"] == 0 and len(m["history"]) == 1 and m["history"][0]["partial"] is True
    assert 0 <= m["test_accuracy"] <= 1
    assert json.loads((out / "metrics.json").read_text())["stopped_early"] is True
    assert not (out / CHECKPOINT_FILE).exists()         # a partial epoch writes no checkpoint


def test_budget_not_reached_changes_nothing(tiny_model, toy_csv, tmp_path):
    m = train(tiny_args(tiny_model, toy_csv, tmp_path / "ok", method="head", epochs=2, budget_seconds=3600))
    assert m["stopped_early"] is False and m["steps"] == m["planned_steps"] == 18 and m["epochs_completed"] == 2
    with pytest.raises(ValueError, match="--budget-seconds must be a positive"):
        TrainArgs(budget_seconds=0).validate()


# ----------------------------------------------------------------------------- bench methods

def test_bench_methods_report_plots_baselines_and_a_failure(tiny_model, toy_csv, tmp_path, capsys, monkeypatch):
    out, work = tmp_path / "report", tmp_path / "work"
    # ia3 aimed at a module that does not exist: that run fails, the others go on
    options = json.dumps({"lora": {"r": 4, "lr": 5e-2}, "ia3": {"targets": ["nosuch"]}})
    rc = cli.main(["bench", "methods", "--task", str(toy_csv), "--methods", "lora,ia3", "--options", options,
                   "--model", str(tiny_model), "--epochs", "2", "--batch-size", "16", "--max-length", "24",
                   "--device", "cpu", "--out", str(out), "--work-dir", str(work)])
    printed = capsys.readouterr().out
    assert rc == 1                      # a run failed: the report is written and the exit status says so
    assert "[1/4] lora" in printed and "[4/4] head" in printed and "ETA" in printed

    results = json.loads((out / "results.json").read_text())
    status = {r["method"]: r["status"] for r in results["runs"]}
    assert status == {"lora": "ok", "ia3": "failed", "full": "ok", "head": "ok"}
    assert results["command"].startswith("deltatune bench methods --task ")
    assert {"torch", "python", "deltatune"} <= set(results["versions"])
    lora = next(r for r in results["runs"] if r["method"] == "lora")
    assert lora["metrics"]["lr"] == 5e-2 and lora["metrics"]["method_config"]["r"] == 4
    assert lora["derived"]["step_time_vs_lora"] == pytest.approx(1.0)
    ia3 = next(r for r in results["runs"] if r["method"] == "ia3")
    assert "nosuch" in ia3["error_tail"]

    report = (out / "report.md").read_text()
    assert results["command"] in report
    for text in ("`full` (baseline)", "`head` (baseline)", "**failed**", "## Failed runs", "step time vs LoRA",
                 "Pareto front", "nosuch"):
        assert text in report, text
    for png in ("accuracy_vs_params.png", "accuracy_vs_memory.png", "accuracy_vs_time.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png

    # --update runs only the named method again and replaces its row; the others stay as they were
    same = ["--task", str(toy_csv), "--model", str(tiny_model), "--batch-size", "16", "--max-length", "24",
            "--device", "cpu", "--out", str(out), "--work-dir", str(work), "--update"]
    assert cli.main(["bench", "methods", "--methods", "ia3", "--epochs", "1", *same]) == 2
    assert "--epochs 1 (report: 2)" in capsys.readouterr().err
    assert cli.main(["bench", "methods", "--methods", "ia3", "--epochs", "2", *same]) == 0
    assert "[1/1] ia3" in capsys.readouterr().out
    updated = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in updated["runs"]] == ["lora", "ia3", "full", "head"]
    assert updated["runs"][1]["status"] == "ok" and "derived" in updated["runs"][1]
    for before, after in zip(results["runs"], updated["runs"]):
        if before["method"] != "ia3":
            assert after["metrics"] == before["metrics"]
    assert updated["command"] == results["command"] and updated["updates"][0]["methods"] == ["ia3"]
    report = (out / "report.md").read_text()
    assert "Runs of `ia3` replaced on" in report and updated["updates"][0]["command"] in report
    assert "**failed**" not in report

    # two --update runs side by side: the one finishing last must keep the other's row, so the
    # report is read again when it is merged, not only at the start
    import deltatune.bench.methods as bench_methods
    real_run_one = bench_methods.run_one

    def run_one_while_another_lands(run, *args, **kwargs):
        rec = real_run_one(run, *args, **kwargs)
        other = json.loads((out / "results.json").read_text())
        other["runs"][0] = {**other["runs"][0], "metrics": {**other["runs"][0]["metrics"], "marker": 1}}
        (out / "results.json").write_text(json.dumps(other))
        return rec

    monkeypatch.setattr(bench_methods, "run_one", run_one_while_another_lands)
    assert cli.main(["bench", "methods", "--methods", "ia3", "--epochs", "2", *same]) == 0
    both = json.loads((out / "results.json").read_text())
    assert both["runs"][0]["metrics"].get("marker") == 1 and len(both["updates"]) == 2


def test_bench_methods_bad_input_fails_before_any_run(capsys, tmp_path):
    assert cli.main(["bench", "methods", "--methods", "lorra", "--out", str(tmp_path)]) == 2
    assert "unknown method(s) lorra" in capsys.readouterr().err
    assert cli.main(["bench", "methods", "--task", "fashoin", "--out", str(tmp_path)]) == 2
    assert "not bbc, tweets, fashion, lm nor an existing" in capsys.readouterr().err
    assert cli.main(["bench", "methods", "--options", "{bad", "--out", str(tmp_path)]) == 2
    assert "--options must be a JSON object" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- analysis

def test_pareto_front_lower_is_better():
    pts = {"a": (10, 12.0), "b": (100, 9.0), "c": (100, 11.0), "d": (5, 30.0)}
    assert pareto_front(pts, higher_is_better=False) == {"a", "b", "d"}
    assert pareto_front(pts) == {"d"}       # read as higher-is-better, d (fewest, highest) dominates all


def _ok_run(method, test_perplexity):
    r = _run(method, None, 1000 if method == "full" else 10)
    del r["metrics"]["test_accuracy"]
    r["metrics"].update(test_perplexity=test_perplexity, metric="test_perplexity")
    return r


def test_lm_task_runs_full_only_as_baseline_and_ranks_by_perplexity():
    from deltatune.bench.methods import parse_methods, report_markdown, task_metric
    assert parse_methods("lora", "lm") == ["lora", "full"]
    assert parse_methods("lora", "bbc") == ["lora", "full", "head"]
    assert task_metric("lm") == "test_perplexity" and task_metric("tweets") == "test_accuracy"
    runs = [_ok_run("lora", test_perplexity=14.0), _ok_run("full", test_perplexity=12.0),
            _ok_run("ia3", test_perplexity=20.0)]
    summary = analyse(runs, "test_perplexity")
    assert summary["full_score"] == 12.0 and summary["head_score"] is None
    assert all(r["derived"]["beats_head"] is None for r in runs)
    results = {"task": "lm", "command": "c", "started": "t", "settings": {
        "model": None, "epochs": 1, "seed": 0, "batch_size": 8, "max_length": 128, "budget_seconds": None},
        "versions": {}, "metric": "test_perplexity", "summary": summary, "runs": runs}
    md = report_markdown(results)
    assert "test perplexity" in md and "beats head-only" not in md
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows[:3]] == ["full", "lora", "ia3"]      # lowest perplexity first


def test_pareto_front():
    pts = {"a": (10, 0.9), "b": (100, 0.95), "c": (100, 0.9), "d": (5, 0.5), "e": (10, 0.9)}
    # c is dominated by a (fewer params, same accuracy); a and e tie: neither dominates the other
    assert pareto_front(pts) == {"a", "b", "d", "e"}


def _run(method, acc, trainable, seconds=10.0, steps=10, stopped=False):
    return {"method": method, "status": "ok", "train_args": {"method_options": {}, "lr": None}, "wall_seconds": 1.0,
            "metrics": {"test_accuracy": acc, "trainable_params": trainable, "total_params": 1000,
                        "train_seconds": seconds, "steps": steps, "planned_steps": 20 if stopped else steps,
                        "peak_memory_mb": 100.0 + trainable / 10, "lr": 1e-3, "stopped_early": stopped}}


def test_report_marks_methods_below_the_head_baseline():
    runs = [_run("lora", 0.9, 10, seconds=20.0), _run("ia3", 0.5, 5, stopped=True), _run("full", 0.92, 1000),
            _run("head", 0.6, 3)]
    summary = analyse(runs)
    d = {r["method"]: r["derived"] for r in runs}
    assert d["ia3"]["beats_head"] is False and d["lora"]["beats_head"] is True and d["head"]["beats_head"] is None
    assert d["ia3"]["step_time_vs_lora"] == pytest.approx(0.5)
    assert summary["pareto_front"]["params"] == ["full", "head", "lora"]     # head: fewer params, more accurate than ia3
    results = {"task": "toy", "command": "deltatune bench methods --task toy", "started": "now", "runs": runs,
               "summary": summary, "versions": {"torch": "x"},
               "settings": {"model": "m", "epochs": 2, "seed": 0, "batch_size": 4, "max_length": 8,
                            "budget_seconds": 5.0}}
    report = report_markdown(results)
    assert "| `ia3` | stopped by budget (10/20 steps) | 50.00 %" in report and "**no**" in report
    assert "budget 5 s per run" in report
    assert "## Notes" not in report
    results["notes"] = ["Full fine-tuning for the whole epoch: 91.00 %."]
    noted = report_markdown(results)
    assert noted.index("## Notes") < noted.index("Full fine-tuning for the whole epoch: 91.00 %.") < noted.index("## Runs")


def test_replot_rewrites_report_and_plots_from_results_json(tmp_path, capsys):
    runs = [_run("lora", 0.9, 10, seconds=20.0), _run("ia3", 0.5, 5, stopped=True), _run("head", 0.8, 3)]
    summary = analyse(runs)
    results = {"task": "bbc", "command": "c", "started": "t", "settings": {
        "model": "minilm", "epochs": 1, "seed": 0, "batch_size": 32, "max_length": 128, "budget_seconds": 60},
        "versions": {}, "metric": "test_accuracy", "summary": summary, "runs": runs}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert cli.main(["bench", "methods", "--replot", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "stopped by budget (10/20 steps)" in md and "**no**" in md
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(
        ["accuracy_vs_params.png", "accuracy_vs_memory.png", "accuracy_vs_time.png"])
    assert cli.main(["bench", "methods", "--replot", str(tmp_path / "missing")]) == 2
    assert "no results.json there" in capsys.readouterr().err
