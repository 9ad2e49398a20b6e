"""The command line against hostile or careless input: no code from a model folder runs, no
existing result is replaced without ``--overwrite``, a failure part-way leaves the previous state
intact, and bad arguments end in one line naming the problem before anything loads."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import deltatune as dt  # noqa: E402
from deltatune import cli  # noqa: E402
from deltatune.core.errors import DeltatuneError  # noqa: E402
from deltatune.train import loop  # noqa: E402
from deltatune.train.checkpoint import CHECKPOINT_FILE  # noqa: E402
from deltatune.train.model import check_model_folder, load_encoder  # noqa: E402
from test_train import make_dataset, subprocess_env, tiny_train_argv  # noqa: E402
from test_train import one_thread, tiny_model, toy_csv  # noqa: E402,F401  (fixtures)


def digest(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file under ``folder`` (what must survive a refused command)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".staging-" in p.name)


def trained_run(tiny_model, toy_csv, out: Path) -> Path:
    assert cli.main(tiny_train_argv(tiny_model, toy_csv, out, epochs=1)) == 0
    return out


@pytest.fixture(scope="module")
def run_dir(tiny_model, toy_csv, tmp_path_factory) -> Path:
    return trained_run(tiny_model, toy_csv, tmp_path_factory.mktemp("run") / "run")


# ----------------------------------------------------------------------------- remote code

def evil_folder(root: Path, model_type: str = "evil") -> tuple[Path, Path]:
    """A model folder whose config names custom code that, if imported, writes ``marker``."""
    folder, marker = root / "evil_model", root / "CODE_RAN"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": model_type, "hidden_size": 8,
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}}))
    code = (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
            "from transformers import PretrainedConfig\n"
            "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (folder / "configuration_evil.py").write_text(code)
    (folder / "modeling_evil.py").write_text(code)
    return folder, marker


def run_in_pty(argv: list[str], env: dict[str, str], timeout: float = 120) -> tuple[int, str]:
    """Run ``argv`` on a pseudo-terminal that answers 'y' to every prompt (as a user who presses
    y at transformers' "Do you wish to run the custom code? [y/N]"). Returns (exit status, output)."""
    pid, fd = pty.fork()
    if pid == 0:        # the child: its stdin/stdout are the terminal
        os.execve(argv[0], argv, env)
    output, deadline = b"", time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.3)
        try:
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                output += chunk
            os.write(fd, b"y\n")
        except OSError:     # the child closed the terminal: it has ended
            break
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


@pytest.mark.parametrize("command", ["inspect", "train"])
def test_auto_map_code_never_runs_under_a_terminal_answering_yes(tmp_path, command):
    folder, marker = evil_folder(tmp_path)
    env = {**subprocess_env(), "HF_MODULES_CACHE": str(tmp_path / "modules"), "TERM": "dumb"}
    argv = [sys.executable, "-m", "deltatune.cli", command, "--model", str(folder)]
    if command == "train":
        argv += ["--data", str(make_dataset(tmp_path / "d.csv", per_class=5)), "--out", str(tmp_path / "run")]
    status, output = run_in_pty(argv, env)
    assert not marker.exists(), output
    assert status == 2, output
    assert "never runs code from a model folder" in output and "Traceback" not in output


def test_transformers_is_told_never_to_trust_remote_code(tmp_path, monkeypatch):
    """The second line of defence: with the folder check switched off, transformers is still
    called with trust_remote_code=False (it then refuses the unknown model type without asking)."""
    folder, marker = evil_folder(tmp_path)
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr("deltatune.train.model.check_model_folder", lambda path: {})
    with pytest.raises(DeltatuneError, match="cannot load the model"):
        load_encoder(str(folder))
    assert not marker.exists()


def test_auto_map_in_the_tokenizer_config_is_refused(tiny_model, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    for f in tiny_model.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(DeltatuneError, match="tokenizer_config.json: names custom Python code"):
        check_model_folder(folder)


def test_pickled_weights_and_truncated_safetensors_get_deltatune_messages(tiny_model, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((tiny_model / "config.json").read_bytes())
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    assert cli.main(["inspect", "--model", str(pickled)]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "never loads" in err and "Traceback" not in err

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in tiny_model.iterdir():
        data = f.read_bytes()
        (truncated / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    assert cli.main(["inspect", "--model", str(truncated)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: not a complete safetensors file" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- train outputs

def test_train_refuses_to_replace_a_run_without_overwrite(tiny_model, toy_csv, run_dir, capsys):
    before = digest(run_dir)
    assert cli.main(tiny_train_argv(tiny_model, toy_csv, run_dir, epochs=1)) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert digest(run_dir) == before


def test_train_overwrite_failing_part_way_keeps_the_old_run(tiny_model, toy_csv, run_dir, monkeypatch, capsys):
    """The failure comes after the new run wrote its first file (the epoch's checkpoint)."""
    before = digest(run_dir)
    written = []
    real_save = loop.save_checkpoint

    def save_then_record(path, *args, **kwargs):
        real_save(path, *args, **kwargs)
        written.append(Path(path))

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop, "save_checkpoint", save_then_record)
    monkeypatch.setattr(dt, "save_adapter", fail)
    argv = tiny_train_argv(tiny_model, toy_csv, run_dir, epochs=1) + ["--overwrite", "--seed", "1"]
    assert cli.main(argv) == 1
    assert written and not written[0].exists()          # it was written, into the staging folder
    assert digest(run_dir) == before
    assert leftovers(run_dir.parent) == []
    capsys.readouterr()


def test_train_overwrite_replaces_the_run_when_complete(tiny_model, toy_csv, tmp_path):
    out = trained_run(tiny_model, toy_csv, tmp_path / "run")
    (out / "notes.txt").write_text("mine")                 # not a run file: kept
    old = json.loads((out / "metrics.json").read_text())
    argv = tiny_train_argv(tiny_model, toy_csv, out, epochs=1) + ["--overwrite", "--method", "head"]
    argv = [a for a in argv if a not in ("--r", "4", "--dropout", "0.1")]
    assert cli.main(argv) == 0
    new = json.loads((out / "metrics.json").read_text())
    assert old["method"] == "lora" and new["method"] == "head"
    assert not (out / "adapter.safetensors").exists()      # the old run's adapter went with it
    assert (out / "notes.txt").read_text() == "mine" and (out / CHECKPOINT_FILE).is_file()
    assert leftovers(tmp_path) == []


def test_train_checks_the_output_folder_before_training(tiny_model, toy_csv, tmp_path, monkeypatch, capsys):
    def no_training(*args, **kwargs):
        raise AssertionError("the task was set up before the output folder was checked")
    monkeypatch.setattr(loop, "setup_task", no_training)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli.main(tiny_train_argv(tiny_model, toy_csv, a_file)) == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err
    assert cli.main(tiny_train_argv(tiny_model, toy_csv, a_file / "sub")) == 2
    assert "cannot write there" in capsys.readouterr().err
    if os.geteuid() != 0:       # root writes through permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        assert cli.main(tiny_train_argv(tiny_model, toy_csv, ro)) == 2
        assert "cannot write there" in capsys.readouterr().err
    assert a_file.read_text() == "x"


def test_resume_refuses_edited_data_at_the_same_path(tiny_model, tmp_path, capsys):
    data = make_dataset(tmp_path / "data.csv", per_class=20)
    out = tmp_path / "run"
    assert cli.main(tiny_train_argv(tiny_model, data, out, epochs=1)) == 0
    make_dataset(data, per_class=20, seed=1)        # same path, other rows
    assert cli.main(tiny_train_argv(tiny_model, data, out, epochs=1) + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "is not the data this run was trained on" in err
    make_dataset(data, per_class=20, seed=0)        # the original bytes again: resumes
    assert cli.main(tiny_train_argv(tiny_model, data, out, epochs=1) + ["--resume"]) == 0


# ----------------------------------------------------------------------------- argument checks

@pytest.mark.parametrize("option, value, message", [
    ("--weight-decay", "nan", "--weight-decay must be a finite number >= 0"),
    ("--weight-decay", "-0.1", "--weight-decay must be a finite number >= 0"),
    ("--head-dropout", "nan", "--head-dropout must be a finite number in [0, 1)"),
    ("--lr", "inf", "--lr must be a positive number"),
    ("--lr", "nan", "--lr must be a positive number"),
    ("--head-lr", "-1", "--head-lr must be a number >= 0"),
    ("--budget-seconds", "nan", "--budget-seconds must be a positive number"),
    ("--seed", "-1", "--seed must be an integer in [0, 2**63)"),
    ("--epochs", "0", "--epochs must be a positive integer"),
])
def test_bad_numbers_are_refused_before_anything_loads(tmp_path, monkeypatch, capsys, option, value, message):
    monkeypatch.setattr(loop, "setup_task", lambda *a, **k: pytest.fail("loaded the task"))
    assert cli.main(["train", "--out", str(tmp_path / "o"), option, value]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_max_length_above_the_models_positions_is_refused_with_the_limit(tiny_model, toy_csv, tmp_path, capsys):
    argv = tiny_train_argv(tiny_model, toy_csv, tmp_path / "o") + ["--max-length", "1000"]
    argv.remove("32")           # the fixture's own --max-length value
    argv.remove("--max-length")
    assert cli.main(argv) == 2
    assert "--max-length 1000 is above the 128 positions" in capsys.readouterr().err


def test_debug_shows_the_traceback_and_internal_errors_say_so(tmp_path, monkeypatch, capsys):
    with pytest.raises(DeltatuneError):
        cli.main(["train", "--debug", "--epochs", "0"])
    with pytest.raises(DeltatuneError):
        cli.main(["--debug", "train", "--epochs", "0"])
    monkeypatch.setattr(cli, "cmd_methods", lambda: 1 / 0)
    assert cli.main(["methods"]) == 1
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError" in err and "--debug" in err


# ----------------------------------------------------------------------------- merge outputs

def merge_argv(model: Path, adapter: Path, out: Path, *more: str) -> list[str]:
    return ["merge", "--model", str(model), "--adapter", str(adapter), "--out", str(out), *more]


def test_merge_never_writes_over_the_base_model_or_the_adapter(tiny_model, run_dir, capsys):
    for target in (tiny_model, run_dir, tiny_model.parent):
        before = digest(tiny_model), digest(run_dir)
        assert cli.main(merge_argv(tiny_model, run_dir, target, "--overwrite")) == 2
        assert "would write over" in capsys.readouterr().err
        assert (digest(tiny_model), digest(run_dir)) == before


def test_merge_refuses_an_existing_output_without_overwrite(tiny_model, run_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert cli.main(merge_argv(tiny_model, run_dir, out)) == 0
    before = digest(out)
    assert cli.main(merge_argv(tiny_model, run_dir, out)) == 2
    assert "already holds files" in capsys.readouterr().err
    assert digest(out) == before
    assert cli.main(merge_argv(tiny_model, run_dir, out, "--overwrite")) == 0
    assert digest(out) == before                      # the same merge again, written anew
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    assert cli.main(merge_argv(tiny_model, run_dir, mine, "--overwrite")) == 2
    assert "not a merged model this command wrote" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "x"


@pytest.mark.parametrize("existing", [False, True])
def test_merge_failing_after_the_first_file_leaves_the_previous_state(tiny_model, run_dir, tmp_path, monkeypatch,
                                                                      existing, capsys):
    out = tmp_path / "merged"
    if existing:
        assert cli.main(merge_argv(tiny_model, run_dir, out)) == 0
        (out / "marker").write_text("old")
    before = digest(out) if existing else None

    def fail(folder, *args):
        assert (folder / "model.safetensors").is_file()      # the model was written first
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cli, "_write_head", fail)
    assert cli.main(merge_argv(tiny_model, run_dir, out, *(["--overwrite"] if existing else []))) == 1
    assert (digest(out) == before) if existing else not out.exists()
    assert leftovers(tmp_path) == []
    capsys.readouterr()


@pytest.mark.parametrize("metrics", ["{not json", "[1, 2]", '{"label_names": "food"}', '{"label_names": [1, 2, 3]}',
                                     '{"label_names": ["a", "b"]}'])
def test_merge_checks_metrics_before_writing(tiny_model, run_dir, tmp_path, metrics, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for f in ("adapter_config.json", "adapter.safetensors"):
        (adapter / f).write_bytes((run_dir / f).read_bytes())
    (adapter / "metrics.json").write_text(metrics)
    out = tmp_path / "merged"
    assert cli.main(merge_argv(tiny_model, adapter, out)) == 2
    assert "metrics.json" in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []


def test_merge_refuses_non_finite_merged_weights(tiny_model, run_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes((run_dir / "adapter_config.json").read_bytes())
    tensors = load_file(str(run_dir / "adapter.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_B"))
    big = next(k for k in tensors if k.endswith("lora_A") and k.startswith(key[: -len("lora_B")]))
    tensors[key] = torch.full_like(tensors[key], 1e30)     # finite, but B A overflows float32
    tensors[big] = torch.full_like(tensors[big], 1e30)
    save_file(tensors, str(adapter / "adapter.safetensors"))
    out = tmp_path / "merged"
    assert cli.main(merge_argv(tiny_model, adapter, out)) == 2
    err = capsys.readouterr().err
    assert "non-finite values in" in err and "nothing was written" in err
    assert not out.exists()


def test_merge_refuses_a_head_that_is_not_a_matrix(tiny_model, run_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    meta = json.loads((run_dir / "adapter_config.json").read_text())
    tensors = load_file(str(run_dir / "adapter.safetensors"))
    tensors["modules.classifier.weight"] = tensors["modules.classifier.weight"].reshape(-1)
    meta["tensors"]["modules.classifier.weight"] = list(tensors["modules.classifier.weight"].shape)
    (adapter / "adapter_config.json").write_text(json.dumps(meta))
    save_file(tensors, str(adapter / "adapter.safetensors"))
    assert cli.main(merge_argv(tiny_model, adapter, tmp_path / "merged")) == 2
    assert "classifier" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_bench_reports_are_not_replaced_without_overwrite(tmp_path, monkeypatch, capsys):
    from deltatune.bench import methods, speed
    monkeypatch.setattr(methods, "run_one", lambda *a, **k: pytest.fail("trained before checking --out"))
    monkeypatch.setattr(speed, "run", lambda *a, **k: pytest.fail("timed before checking --out"))
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "speed.json").write_text("{}")
    assert cli.main(["bench", "methods", "--task", "bbc", "--methods", "lora", "--out", str(tmp_path)]) == 2
    assert "already holds a report" in capsys.readouterr().err
    assert cli.main(["bench", "speed", "--out", str(tmp_path)]) == 2
    assert "already holds speed.json" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == (tmp_path / "speed.json").read_text() == "{}"
