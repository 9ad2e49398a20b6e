"""Fuzzing the data readers of ``deltatune train --data``: ``read_table`` on CSV and JSONL files
and ``load_task`` on files.

Property: a file either reads exactly as it was written or is refused with a one-line
``DeltatuneError`` naming the file; nothing else escapes. Files built from known rows (hostile
cells and labels, BOMs, repeated columns or keys, rows of the wrong length, NULs, lone
surrogates) are checked against the rows written: ``expected`` says what must be read, or None
when the file must be refused. Files with random bytes spliced in, and raw random bytes, must
read into sane examples or be refused.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import math
import re
import tempfile
from pathlib import Path
from unittest import mock

from fuzzing import FUZZ, counted
from hypothesis import given
from hypothesis import strategies as st

from deltatune.core.errors import DeltatuneError
from deltatune.train import data as data_module
from deltatune.train.data import load_task, read_table

INTEGER = re.compile(r"-?[0-9]+")       # what the reader takes for an integer label
MAX_ID_DIGITS = 18

# characters CSV and JSON treat specially, white space that str.strip() removes, a BOM; NUL
# only where a flaw puts it
SPECIAL = ",\"'\n\r \t\u3000\x85\u2028\ufeff\\{}:é😀"
cells = st.text(st.sampled_from(SPECIAL) | st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8)
# mostly valid; "" (empty) and 19 digits (too long an id) must be refused
LABELS = ["pos", "neg", " pos ", "0", "1", "007", "-3", "²", "١٢", "é", "neutral", "pos", "neg", "0", "1",
          "", "9" * 19]
label_cells = st.sampled_from(LABELS) | st.sampled_from(LABELS) | st.sampled_from(LABELS) | cells     # 3 : 1
few_labels = st.sampled_from(["pos", "neg", "neutral", "1", "2", " pos", "²", "١"])      # classes of 2+ examples
surrogates = st.characters(categories=["Cs"])
INJECTED = [b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\x00", b'"', b",", b"\n", b"\r",
            b"\xef\xbb\xbf", b"{", b"}", b"\\u", b"\\ud800", b"\\"]
BOMS = ["", "", "\ufeff"]


def read(name: str, raw: bytes, reader=read_table):
    """Write ``raw`` to a fresh temp file ``name`` and read it; a DeltatuneError must name the
    file on one line."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, name)
        path.write_bytes(raw)
        try:
            return reader(str(path))
        except DeltatuneError as e:
            assert str(path) in str(e) and "\n" not in str(e), f"message must name the file in one line: {e}"
            raise


def typed(labels) -> list:
    return [(type(y), y) for y in labels]


def expected_label(v):
    """The label ``read_table`` must return for a raw label, or None if it must refuse it."""
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        return None
    if isinstance(v, int):
        return v if abs(v) < 10**MAX_ID_DIGITS else None
    v = v.strip()
    if not v or any("\ud800" <= c <= "\udfff" for c in v):
        return None
    if INTEGER.fullmatch(v) and len(v.lstrip("-")) > MAX_ID_DIGITS:
        return None
    return v


def expected_of(records):
    """(texts, labels) from (text, raw label) records, or None when one must be refused."""
    texts, labels = [], []
    for text, label in records:
        if not text.strip():
            continue                    # skipped, with a notice
        label = expected_label(label)
        if label is None:
            return None
        texts.append(text)
        labels.append(label)
    return (texts, labels) if texts else None


# ----------------------------------------------------------------------------- CSV

@st.composite
def csv_files(draw, labels=label_cells, min_rows=0):
    """(bytes, expected, longest field): a CSV written by csv.writer from rows of hostile cells,
    sometimes with a repeated text or label column, a row too short or too long, a NUL or a BOM."""
    extra = draw(st.lists(st.sampled_from(["id", "", "Text", "label "]), max_size=2, unique=True))
    repeated = draw(st.sampled_from([[]] * 18 + [["text"], ["label"]]))
    header = draw(st.permutations(["text", "label"] + extra + repeated))
    rows = [[draw(labels if c == "label" else cells) for c in header]
            for _ in range(draw(st.integers(min_rows, 7)))]
    # the first choice is the one hypothesis favours
    flaw = draw(st.sampled_from(["none"] * 27 + ["short row", "long row", "NUL"])) if rows else "none"
    at = draw(st.integers(0, len(rows) - 1)) if rows else 0
    if flaw == "short row":
        rows[at] = rows[at][:draw(st.integers(0, len(header) - 1))]     # [] is a blank line: skipped
    elif flaw == "long row":
        rows[at].append(draw(cells))
    elif flaw == "NUL":
        rows[at][draw(st.integers(0, len(header) - 1))] += "\x00"
    # csv.writer leaves a lone \r unquoted unless the line ends are \r\n: quote everything then
    quoting, ending = draw(st.sampled_from([(csv.QUOTE_MINIMAL, "\r\n"), (csv.QUOTE_ALL, "\r\n"),
                                            (csv.QUOTE_ALL, "\n"), (csv.QUOTE_ALL, "\r")]))
    out = io.StringIO()
    writer = csv.writer(out, quoting=quoting, lineterminator=ending)
    writer.writerow(header)
    writer.writerows(rows)

    if repeated or flaw == "NUL" or any(r and len(r) != len(header) for r in rows):
        expected = None
    else:
        ti, li = header.index("text"), header.index("label")
        expected = expected_of((r[ti], r[li]) for r in rows if r)
    longest = max(len(c) for r in [header] + rows for c in r)
    return (draw(st.sampled_from(BOMS)) + out.getvalue()).encode("utf-8"), expected, longest


@FUZZ
@given(csv_files(), st.sampled_from([None, None, 3, 12]))
def test_csv_reads_exactly_or_refuses(file, field_limit):
    """``field_limit``: a small CSV field limit, so that csv's own errors occur in small files."""
    raw, expected, longest_field = file
    if field_limit and longest_field > field_limit:
        expected = None         # csv refuses the field
    limit_before = csv.field_size_limit()
    field_limit = field_limit or data_module.CSV_FIELD_LIMIT
    with counted("data: csv"), mock.patch.object(data_module, "CSV_FIELD_LIMIT", field_limit):
        try:
            got = read("d.csv", raw)
        except DeltatuneError:
            assert expected is None, f"refused a valid file: {raw!r}"
            raise
        finally:
            assert csv.field_size_limit() == limit_before
        assert expected is not None, "read a file that must be refused"
        assert got[0] == expected[0] and typed(got[1]) == typed(expected[1])


# ----------------------------------------------------------------------------- JSONL

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**22, 10**22) | st.floats() | cells,
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.sampled_from(["text", "label"]), inner, max_size=2),
    max_leaves=3)
HOSTILE_LINES = [
    '{"text": "a", "label": ' + "9" * 5000 + "}", '{"text": "a", "label": ' + "[" * 5000 + "]" * 5000 + "}",
    '{"text": "a\\ud800", "label": 1}', '{"text": "a", "label": "\\udc00"}', '{"text": "a", "label": 1}}',
    '{"text": "a", "label": 1} x', ' \ufeff{"text": "a", "label": 1}', "NaN", "[]", "null", '"text"',
    '{"text": "a", "label": 1', "{'text': 'a', 'label': 1}", '{"text": "a", "label": 1, "label": 2}',
]
junk_lines = st.text(min_size=1, max_size=10).filter(lambda s: s.strip() and not set(s) & set("\r\n"))


@st.composite
def jsonl_files(draw, labels=label_cells, min_rows=0):
    """(bytes, expected): JSONL lines of objects written key by key (so a key can be missing or
    repeated), with hostile texts and labels (any JSON value, lone surrogates, NaN), blank lines,
    and now and then a line that is no record at all."""
    lines, records, valid = [], [], True
    ascii_only = draw(st.booleans())        # False: non-ASCII (and lone surrogates) written raw
    for _ in range(draw(st.integers(min_rows, 7))):
        # the first choice is the one hypothesis favours
        flaw = draw(st.sampled_from(["none"] * 44 + ["junk line"] * 4 + ["blank line", "int label", "int label",
                                                     "float label", "JSON label", "JSON text", "surrogate text",
                                                     "surrogate label", "key missing", "key repeated", "extra key"]))
        if flaw == "junk line":
            lines.append(draw(st.sampled_from(HOSTILE_LINES) | junk_lines))
            valid = False
            continue
        if flaw == "blank line":
            lines.append(draw(st.sampled_from(["", " ", "\t"])))        # skipped
            continue
        text, label = draw(cells), draw(labels)
        if flaw == "int label":
            label = draw(st.integers(-10**20, 10**20))
        elif flaw == "float label":
            label = draw(st.floats())                   # NaN, infinities, 2.0, 1e300, ...
        elif flaw == "JSON label":
            label = draw(json_values)
        elif flaw == "JSON text":
            text = draw(json_values)
        elif flaw == "surrogate text":
            text += draw(surrogates)
        elif flaw == "surrogate label":
            label = draw(cells) + draw(surrogates)
        pairs = [("text", text), ("label", label)]
        if draw(st.booleans()):
            pairs.reverse()
        if flaw == "extra key":
            pairs.insert(1, ("id", draw(json_values)))
        elif flaw == "key missing":
            pairs.pop(draw(st.integers(0, 1)))
        elif flaw == "key repeated":
            pairs.append((draw(st.sampled_from(["text", "label"])), draw(labels)))
        # a lone surrogate is refused in any text or label, even on a line with an empty text
        if flaw in ("surrogate text", "surrogate label", "key missing", "key repeated") or not isinstance(text, str):
            valid = False
        else:
            records.append((text, label))
        # by hand: json.dumps of a dict cannot repeat a key
        lines.append("{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v, ensure_ascii=ascii_only)}"
                                     for k, v in pairs) + "}")
    ending = draw(st.sampled_from(["\n", "\r\n"]))
    text = draw(st.sampled_from(BOMS)) + ending.join(lines) + draw(st.sampled_from([ending, ""]))
    # a lone surrogate written raw (ensure_ascii=False) becomes bytes that are not UTF-8: refused too
    return text.encode("utf-8", "surrogatepass"), expected_of(records) if valid else None


@FUZZ
@given(jsonl_files())
def test_jsonl_reads_exactly_or_refuses(file):
    raw, expected = file
    with counted("data: jsonl"):
        try:
            got = read("d.jsonl", raw)
        except DeltatuneError:
            assert expected is None, f"refused a valid file: {raw!r}"
            raise
        assert expected is not None, "read a file that must be refused"
        assert got[0] == expected[0] and typed(got[1]) == typed(expected[1])


# ----------------------------------------------------------------------------- spliced and raw bytes

@st.composite
def spliced(draw, files):
    """A file's bytes with a few bytes inserted, replaced or cut at random places."""
    raw = draw(files)[0]
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(raw)))
        piece = draw(st.sampled_from(INJECTED) | st.binary(min_size=1, max_size=3))
        raw = raw[:at] + piece + raw[at + draw(st.integers(0, 2)):]
    return raw


PREFIXES = [b"", b"text,label\n", b"\xef\xbb\xbftext,label\r\n", b'label,text\n1,"', b'{"text": "a", "label": 1}\n',
            b'{"text": "', b'{"text": "a", "label": ']
raw_bytes = st.tuples(st.sampled_from(PREFIXES), st.binary(max_size=120)).map(b"".join)


def check_sane(result) -> None:
    """What any successful read must satisfy, whatever the input."""
    texts, labels = result
    assert len(texts) == len(labels) > 0
    for t, y in zip(texts, labels):
        assert isinstance(t, str) and t.strip()
        t.encode("utf-8")
        assert (type(y) is int and abs(y) < 10**MAX_ID_DIGITS) or (type(y) is str and y == y.strip() and y)
        if isinstance(y, str):
            y.encode("utf-8")


@FUZZ
@given(st.one_of(st.tuples(st.just("d.csv"), spliced(csv_files()) | raw_bytes),
                 st.tuples(st.just("d.jsonl"), spliced(jsonl_files()) | raw_bytes)))
def test_spliced_and_random_bytes_read_or_refuse(file):
    name, raw = file
    with counted("data: csv" if name == "d.csv" else "data: jsonl"):
        check_sane(read(name, raw))


# ----------------------------------------------------------------------------- load_task

def class_names(labels) -> list[str]:
    """The class name of each label, as ``encode_labels`` names classes."""
    if all(isinstance(y, int) or INTEGER.fullmatch(y) for y in labels):
        return [str(int(y)) for y in labels]
    return [str(y) for y in labels]


@FUZZ
@given(st.one_of(st.tuples(st.just("d.csv"), csv_files(few_labels, min_rows=4)),
                 st.tuples(st.just("d.jsonl"), jsonl_files(few_labels, min_rows=4))))
def test_load_task_splits_exactly_or_refuses(file):
    name, (raw, expected, *_) = file
    with counted("data: load_task"):
        try:
            task = read(name, raw, load_task)
        except DeltatuneError as e:
            assert expected is None or re.search("at least 2 classes|too few examples", str(e)), \
                f"refused a valid file: {e}"
            raise
        assert expected is not None, "read a file that must be refused"
        got = collections.Counter((t, task.label_names[y]) for t, y in zip(task.train_texts + task.test_texts,
                                                                             task.train_labels + task.test_labels))
        assert got == collections.Counter(zip(expected[0], class_names(expected[1])))
        assert task.train_texts and task.test_texts and len(task.label_names) >= 2
