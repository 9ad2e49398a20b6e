"""Hostile and broken data files for ``deltatune train --data``: each is read exactly or refused
with a ``DeltatuneError`` that names the file and the line, never silently altered."""

from __future__ import annotations

import csv
import json

import pytest

from deltatune.core.errors import DeltatuneError
from deltatune.train import data
from deltatune.train.data import load_task, read_table


def write(tmp_path, name, content: str | bytes):
    p = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    p.write_bytes(content)
    return p


def jsonl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# ----------------------------------------------------------------------------- encoding

@pytest.mark.parametrize("name,content,line", [
    ("d.csv", b"text,label\nok,a\ncaf\xe9,b\n", 3),
    ("d.csv", b"\xef\xbb\xbftext,label\r\nok,a\r\ncaf\xe9,b\r\n", 3),       # BOM and CRLF
    ("d.csv", b"text,label\rok,a\rcaf\xe9,b\r", 3),                             # old Mac line ends
    ("d.csv", b'text,label\n"two\nlines",a\nbad \x80 byte,b\n', 4),            # physical lines, not rows
    ("d.jsonl", b'{"text": "ok", "label": "a"}\n\n{"text": "caf\xe9", "label": "b"}\n', 3),
])
def test_invalid_utf8_is_refused_with_its_line(tmp_path, name, content, line):
    p = write(tmp_path, name, content)
    with pytest.raises(DeltatuneError, match=rf"d\.\w+, line {line}: bytes .* are not valid UTF-8; "
                                             rf"re-encode the file as UTF-8"):
        read_table(p)


@pytest.mark.parametrize("name", ["d.csv", "d.jsonl"])
def test_nul_bytes_are_refused_with_their_line(tmp_path, name):
    body = "text,label\nok,a\nn\x00l,b\n" if name == "d.csv" else jsonl({"text": "ok", "label": "a"}) + '\x00{}\n'
    p = write(tmp_path, name, body)
    line = 3 if name == "d.csv" else 2
    with pytest.raises(DeltatuneError, match=rf"line {line}: NUL byte; .*re-encode it as UTF-8"):
        read_table(p)


@pytest.mark.parametrize("name,body", [
    ("d.csv", "text,label\nhello,a\nworld,b\n"),
    ("d.jsonl", jsonl({"text": "hello", "label": "a"}, {"text": "world", "label": "b"})),
])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, name, body):
    p = write(tmp_path, name, b"\xef\xbb\xbf" + body.encode())
    assert read_table(p) == (["hello", "world"], ["a", "b"])


# ----------------------------------------------------------------------------- empty texts

@pytest.mark.parametrize("name", ["data.csv", "data.jsonl"])
def test_empty_texts_are_skipped_and_reported(tmp_path, capsys, name):
    texts = ["a", "b", "", "c", "d", "e", "f", " \t ", "g", "h", "\u3000"]      # empty on lines 4, 9, 12
    labels = ["x", "y"] * 6
    if name == "data.csv":
        body = "text,label\n" + "".join(f'"{t}",{y}\n' for t, y in zip(texts, labels))
    else:
        body = "\n" + jsonl(*({"text": t, "label": y} for t, y in zip(texts, labels)))   # a blank first line
    p = write(tmp_path, name, body)
    got = read_table(p)
    assert got == ([t for t in texts if t.strip()], [y for t, y in zip(texts, labels) if t.strip()])
    assert capsys.readouterr().err.strip() == f"{p}: skipped 3 rows with an empty text (lines 4, 9, 12)"


def test_many_skipped_lines_are_listed_briefly(tmp_path, capsys):
    p = write(tmp_path, "d.csv", "text,label\nkeep,a\n" + ",b\n" * 25)
    read_table(p)
    assert capsys.readouterr().err.strip().endswith("(lines 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, and 15 more)")


@pytest.mark.parametrize("name,body", [
    ("d.csv", "text,label\n,a\n  ,b\n"),
    ("d.jsonl", jsonl({"text": "", "label": "a"}, {"text": "\n", "label": "b"})),
])
def test_a_file_of_empty_texts_is_refused(tmp_path, name, body):
    with pytest.raises(DeltatuneError, match=r"no examples: all 2 rows have an empty text"):
        load_task(str(write(tmp_path, name, body)))


# ----------------------------------------------------------------------------- CSV structure

@pytest.mark.parametrize("header,message", [
    ("text,label,text", r"the header has 2 'text' columns"),
    ("label,text,label", r"the header has 2 'label' columns"),
    ("text,label,label,text", r"the header has 2 'text' and 2 'label' columns; keep one of each"),
])
def test_repeated_csv_columns_are_refused(tmp_path, header, message):
    p = write(tmp_path, "d.csv", header + "\n" + ",".join("v" * len(header.split(","))) + "\n")
    with pytest.raises(DeltatuneError, match=message):
        read_table(p)


def test_repeated_jsonl_keys_are_refused(tmp_path):
    p = write(tmp_path, "d.jsonl", jsonl({"text": "a", "label": 0}) + '{"text": "b", "label": 0, "label": 1}\n')
    with pytest.raises(DeltatuneError, match=r"line 2: the keys 'label' occur more than once"):
        read_table(p)


@pytest.mark.parametrize("row,fields", [("a,x,extra", "3 fields"), ("a", "1 field"), ("a,x,", "3 fields")])
def test_csv_rows_with_the_wrong_number_of_fields_are_refused(tmp_path, row, fields):
    p = write(tmp_path, "d.csv", f"text,label\nok,y\n{row}\n")
    with pytest.raises(DeltatuneError, match=rf"line 3: {fields}, but the header has 2; quote any field"):
        read_table(p)


def test_an_unclosed_quote_is_refused_where_it_opens(tmp_path):
    p = write(tmp_path, "d.csv", 'text,label\nok,y\n"never closed,y\nmore,z\n')
    with pytest.raises(DeltatuneError, match=r"line 3: 1 field, but the header has 2.*close every quote"):
        read_table(p)


def test_long_csv_fields_load(tmp_path):
    article = "word " * 60_000                  # 300,000 characters: over csv's default field limit
    p = write(tmp_path, "d.csv", f'text,label\n"{article}",a\nshort,b\n')
    before = csv.field_size_limit()
    assert read_table(p) == ([article, "short"], ["a", "b"])
    assert csv.field_size_limit() == before     # the process-wide limit is put back


def test_a_field_over_the_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CSV_FIELD_LIMIT", 1000)
    p = write(tmp_path, "d.csv", 'text,label\nok,a\n"' + "x" * 2000 + '",b\n')
    before = csv.field_size_limit()
    with pytest.raises(DeltatuneError, match=r"d\.csv, line 3: cannot read the CSV .*a field over 1,000 "
                                             r"characters is almost always a quote that is never closed"):
        read_table(p)
    assert csv.field_size_limit() == before


# ----------------------------------------------------------------------------- paths

def test_a_directory_is_named_as_such(tmp_path):
    folder = tmp_path / "corpus.csv"
    folder.mkdir()
    for call in (lambda: read_table(folder), lambda: load_task(str(folder)), lambda: load_task(str(tmp_path))):
        with pytest.raises(DeltatuneError, match=r"is a directory, not a data file; give a \.csv or \.jsonl file "
                                                 r"with text and label columns, or a built-in task \(bbc, tweets, fashion, lm\)"):
            call()


def test_a_missing_file_lists_the_builtin_names(tmp_path):
    with pytest.raises(DeltatuneError, match=r"missing\.jsonl: no such data file; .*built-in task \(bbc, tweets, fashion, lm\)"):
        load_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DeltatuneError, match=r"cannot open the data file .*bbc, tweets"):
        load_task("x" * 5000 + ".csv")            # too long a name for the file system


# ----------------------------------------------------------------------------- JSONL values

@pytest.mark.parametrize("line,message", [
    ('{"text": "a", "label": ' + "9" * 5000 + "}", "a number with thousands of digits"),
    ('{"text": "a", "label": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nested too deeply"),
    ('{"text": "a\\ud800b", "label": "x"}', r"the text holds '\\ud800', half of a UTF-16 surrogate pair"),
    ('{"text": "a", "label": "\\udfff"}', r"the label holds '\\udfff'"),
    ('{"text": "a", "label": {"name": "x"}}', "label {'name': 'x'} is not a class name or an integer class id"),
    ('{"text": "a", "label": ["x"]}', "label \\['x'\\] is not a class name or an integer class id"),
    ('{"text": "a", "label": NaN}', "label nan is not a class name"),
    ('{"text": "a", "label": Infinity}', "label inf is not a class name"),
    ('{"text": "a", "label": -Infinity}', "label -inf is not a class name"),
    ('{"text": "a", "label": 1e400}', "label inf is not a class name"),
    ('{"text": "a", "label": 12345678901234567890}', "label 12345678901234567890 is too long for an integer class id"),
    ('{"text": "a", "label": 1e300}', r"label 1000000000000000052\d{21}\.\.\. is too long for an integer class id"),
    ('{"text": "a", "label": true}', "label True is not a class name"),
    ('{"text": "a", "label": null}', "label None is not a class name"),
    ('{"text": NaN, "label": 1}', "'text' must be a string, got nan"),
    ('{"text": ["a"], "label": 1}', "'text' must be a string"),
    ('["text", "label"]', "each line must be a JSON object"),
    ('"text"', "each line must be a JSON object"),
    ('{"text": "a", "label": 1} {"text": "b"}', r"not valid JSON \(Extra data at column 27\)"),
    ('\ufeff{"text": "a", "label": 1}', "not valid JSON"),
])
def test_malformed_jsonl_lines_are_refused_with_their_line(tmp_path, line, message):
    p = write(tmp_path, "d.jsonl", jsonl({"text": "ok", "label": "x"}) + line + "\n")
    with pytest.raises(DeltatuneError, match=r"d\.jsonl, line 2: " + message):
        load_task(str(p))


@pytest.mark.parametrize("labels,names", [
    (["²", "1", "²"], ["1", "²"]),                  # str.isdigit() is true, int() refuses it
    (["١٢", "12", "3"], ["12", "3", "١٢"]),          # int() would merge Arabic-Indic digits with 12
    (["--5", "5", "5"], ["--5", "5"]),
])
def test_only_ascii_digit_labels_are_integers(tmp_path, labels, names):
    p = write(tmp_path, "d.csv", "text,label\n" + "".join(f"t{i},{y}\n" for i, y in enumerate(labels * 2)))
    assert load_task(str(p)).label_names == names


def test_long_digit_labels_are_refused(tmp_path):
    p = write(tmp_path, "d.csv", "text,label\na,1\nb," + "7" * 6000 + "\n")
    with pytest.raises(DeltatuneError, match=r"d\.csv, line 3: label 7{40}\.\.\. is too long for an integer class id"):
        load_task(str(p))
