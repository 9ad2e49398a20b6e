"""Fuzzing the command line's argument handling: every generated ``deltatune train`` /
``inspect`` / ``merge`` command line ends in argparse's usage error, deltatune's one-line error
(exit status 2, no traceback), or a run whose arguments all passed validation; never an
internal error. The training itself is replaced by a probe that checks those arguments."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("transformers")

from deltatune import cli  # noqa: E402
from deltatune.train import loop  # noqa: E402
from fuzzing import FUZZ, counted  # noqa: E402

NUMBERS = st.one_of(
    st.integers(-10 ** 20, 10 ** 20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "-nan", "inf", "-inf", "1e309", "0", "-0", "1e-320", "0x10", "1_000", "", " ", "true",
                     "none", "[]", "{}", "[1, 2]", '{"query": 4}', "query,value", "é", "\x00", "--r"]),
)
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
TRAIN_OPTIONS = ["--epochs", "--lr", "--batch-size", "--eval-batch-size", "--max-length", "--grad-accum", "--seed",
                 "--weight-decay", "--head-dropout", "--head-lr", "--budget-seconds", "--precision", "--device",
                 "--method", "--data"]
METHOD_OPTIONS = ["--r", "--alpha", "--dropout", "--targets", "--exclude", "--layers", "--rank-pattern",
                  "--alpha-pattern", "--rslora", "--bias", "--init", "--num-virtual-tokens", "--feedforward",
                  "--trainable-modules", "--rank", "--lora-alpha"]
METHODS = st.sampled_from(["lora", "dora", "ia3", "prompt_tuning", "full", "head", "nope", ""])


class Probe(BaseException):       # passes the CLI's handler of internal errors
    """Raised by the stand-in for training once the arguments reached it."""


def probe_train(args):
    a = loop.TrainArgs.from_any(args)
    for name in ("lr", "head_lr", "budget_seconds", "weight_decay", "head_dropout"):
        v = getattr(a, name)
        assert v is None or math.isfinite(v), (name, v)
    assert a.epochs >= 1 and a.batch_size >= 1 and a.max_length >= 2 and 0 <= a.seed < 2 ** 63
    if a.method not in loop.BASELINES:
        loop.method_config(a.method, a.method_options)      # the config was valid
    raise Probe


@pytest.fixture(scope="module", autouse=True)
def no_training():
    real = loop.train
    loop.train = probe_train
    yield
    loop.train = real


def run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as e:         # argparse's usage errors
            code = e.code
        except Probe:
            code = 0
    return code, err.getvalue()


# values that often pass, so that many generated command lines get past parsing to validation
PLAUSIBLE = st.sampled_from(["1", "2", "8", "16", "0.1", "1e-3", "0.5", "128", "0", "true", "false", "query,value",
                             "query", "all-linear", "fp32", "bf16", "cpu", "auto", "bbc", '{"query": 2}', "0,1"])


@st.composite
def train_argv(draw):
    argv = ["train", "--out", "/nonexistent-deltatune-fuzz/run"]
    method = draw(METHODS)
    if method or draw(st.booleans()):
        argv += ["--method", method]
    for _ in range(draw(st.integers(0, 4))):
        argv += [draw(st.sampled_from(TRAIN_OPTIONS)), draw(st.one_of(PLAUSIBLE, PLAUSIBLE, NUMBERS, TEXT))]
    for _ in range(draw(st.integers(0, 4))):
        option = draw(st.sampled_from(METHOD_OPTIONS))
        argv += [option] if draw(st.integers(0, 5)) == 0 else [option, draw(st.one_of(PLAUSIBLE, NUMBERS, TEXT))]
    return argv


@FUZZ
@given(train_argv())
def test_fuzz_train_arguments(argv):
    with counted("cli: train arguments") as outcome:
        code, err = run(argv)
        outcome.name = "reached training" if code == 0 else "usage error" if "usage:" in err else "error"
        assert code in (0, 2), (argv, code, err)
        assert "Traceback" not in err
        if code == 2 and "usage:" not in err:
            assert len(err.strip().splitlines()) == 1 and err.startswith("deltatune train: error: "), err


def check_one_line_error(command: str, argv: list[str]) -> None:
    with counted(f"cli: {command} arguments") as outcome:
        code, err = run(argv)
        outcome.name = "usage error" if "usage:" in err else "error"
        assert code == 2, (argv, code, err)
        assert "Traceback" not in err
        if "usage:" not in err:
            assert len(err.strip().splitlines()) == 1 and err.startswith(f"deltatune {command}: error: "), err


PATHS = st.one_of(TEXT, NUMBERS, st.sampled_from(["/", "/proc", "/dev/null", ".", "..", "/etc/passwd", "-", "~"]))


@FUZZ
@given(PATHS)
def test_fuzz_inspect_arguments(model):
    check_one_line_error("inspect", ["inspect", "--model", model])


@FUZZ
@given(PATHS, PATHS, TEXT, st.booleans())
def test_fuzz_merge_arguments(model, adapter, out, overwrite):
    argv = ["merge", "--model", model, "--adapter", adapter, "--out", "/nonexistent-deltatune-fuzz/" + out]
    check_one_line_error("merge", argv + (["--overwrite"] if overwrite else []))
