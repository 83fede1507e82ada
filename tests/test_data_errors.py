"""A corpus of several files with one bad file: the error names that file (and its line for JSON lines),
and nothing is tokenised. `datasets` itself says only that "an error occurred while generating"."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launch.data import tokenizer as tok_mod
from launch.data.build import DataConfig, build_data
from moe.config import ConfigError


def _jsonl(k, field="text"):
    return "".join(json.dumps({field: f"document {k}.{i}: the quick brown fox"}) + "\n" for i in range(6))


def _parquet(path, column="text"):
    pq.write_table(pa.table({column: [f"document {i}: the quick brown fox" for i in range(6)]}), path)


def _write(folder, name, content):
    if content == "parquet":
        _parquet(folder / name)
    elif isinstance(content, bytes):
        (folder / name).write_bytes(content)
    else:
        (folder / name).write_text(content)


# (three files, sorted: the bad one in the middle unless said; what the message must say after the file's name)
CORPORA = {
    "jsonl_bad_line": (
        [("p0.jsonl", _jsonl(0)), ("p1.jsonl", _jsonl(1) + '{"text": \n' + _jsonl(1)), ("p2.jsonl", _jsonl(2))],
        "p1.jsonl", r"', line 7: Expecting value \(column 10\)",
    ),
    "jsonl_not_an_object": (
        [("p0.jsonl", _jsonl(0)), ("p1.jsonl", _jsonl(1) + "[1, 2]\n"), ("p2.jsonl", _jsonl(2))],
        "p1.jsonl", r"', line 7: a JSON list, not an object",
    ),
    "jsonl_other_columns": (
        [("p0.jsonl", _jsonl(0)), ("p1.jsonl", _jsonl(1, field="body")), ("p2.jsonl", _jsonl(2))],
        "p1.jsonl", r"' has columns body: Value\('string'\) but file '.*p0.jsonl' has text: Value\('string'\); every file",
    ),
    "jsonl_other_types": (  # the first file's numbers set the type; the others' text cannot be cast to it
        [("p0.jsonl", '{"text": 1}\n{"text": 2}\n'), ("p1.jsonl", _jsonl(1)), ("p2.jsonl", _jsonl(2))],
        "p1.jsonl", r"' has columns text: Value\('string'\) but file '.*p0.jsonl' has text: Value\('int64'\)",
    ),
    "jsonl_bad_first_file": (  # read by datasets to infer the schema, outside its generation step
        [("p0.jsonl", '{"text": "a"}\n{"text": \n'), ("p1.jsonl", _jsonl(1)), ("p2.jsonl", _jsonl(2))],
        "p0.jsonl", r"', line 2: Expecting value",
    ),
    "json_document_syntax": (
        [("p0.json", json.dumps([{"text": "a"}] * 4)), ("p1.json", '[\n  {"text": "a"},\n  {"text" "b"}\n]\n'),
         ("p2.json", json.dumps([{"text": "c"}] * 4))],
        "p1.json", r"', line 3: Expecting ':' delimiter \(column 11\)",
    ),
    "parquet_garbage": (
        [("p0.parquet", "parquet"), ("p1.parquet", b"PAR1 not really a parquet file"), ("p2.parquet", "parquet")],
        "p1.parquet", r"': .*[Pp]arquet",
    ),
    "parquet_garbage_first": (
        [("p0.parquet", b"garbage"), ("p1.parquet", "parquet"), ("p2.parquet", "parquet")],
        "p0.parquet", r"': .*[Pp]arquet",
    ),
    "txt_not_utf8": (
        [("p0.txt", "one\n\ntwo\n"), ("p1.txt", b"three\n\n\xff\xfe bad bytes\n"), ("p2.txt", "four\n\nfive\n")],
        "p1.txt", r"': .*utf-8",
    ),
}


@pytest.mark.parametrize("case", list(CORPORA))
def test_the_bad_file_of_three_is_named(tmp_path, monkeypatch, case):
    files, bad, detail = CORPORA[case]

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer ran before the input was checked")

    monkeypatch.setattr(tok_mod, "train_bpe", refuse)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, content in files:
        _write(folder, name, content)
    cfg = DataConfig(path=str(folder), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as caught:
        build_data(cfg, 16)
    message = str(caught.value)
    assert message.startswith(f"data.path = {str(folder)!r} (3 ")
    assert re.search(rf"could not be read: file '{re.escape(str(folder / bad))}{detail}", message), message
    # Only files before the bad one are read again, and only the first may be named (the columns to match).
    assert not any(str(folder / name) in message for name, _ in files if name > bad), message
