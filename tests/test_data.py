"""Data pipeline: packing, document split, caches, tokenizers, user files, input errors, batch iteration.

Every build uses a tmp_path cache and a corpus of a few hundred KB, so the file runs in seconds.
"""

import json
import os

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from launch.data import tokenizer as tok_mod
from launch.data import sources as data_sources
from launch.data.build import DataConfig, TrainBatches, ValBatches, build_data, pack, split_documents
from launch.data.tokenizer import BytesTokenizer
from moe.config import ConfigError

# Hard cases for a tokenizer: multi-byte UTF-8 (2, 3 and 4 bytes), tabs, CRLF, runs of spaces, a trailing space.
AWKWARD = "déjà vu\tπ≈3.14\r\n    def f(x):  # 日本語 🙂\n\n\nend "


def _cfg(tmp_path, **kw):
    return DataConfig(cache_dir=str(tmp_path / "cache"), **{"max_bytes": 300_000, **kw})


# ---------------------------------------------------------------- packing and batches


def test_pack_windows_share_one_token_and_targets_are_inputs_shifted():
    ids = torch.arange(11, dtype=torch.int32)
    ex = pack(ids, 3)
    # (11 - 1) // 3 = 3 windows of 4 tokens, stride 3; token 10 is left over (never a target).
    assert ex.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    inputs, targets = next(iter(ValBatches(ex, batch_size=3, num_batches=1)))
    assert inputs.dtype == targets.dtype == torch.int64
    assert inputs.shape == targets.shape == (3, 3)
    assert torch.equal(inputs, ex[:, :-1].long()) and torch.equal(targets, ex[:, 1:].long())
    assert pack(torch.arange(4, dtype=torch.int32), 3).shape == (1, 4)
    assert pack(torch.arange(3, dtype=torch.int32), 3).shape == (0, 4)  # too short for one example


def _rows(n, width=2):
    # Example i is [i, 1000 + i], so a batch's inputs[:, 0] names the examples it holds.
    return torch.stack([torch.arange(n), 1000 + torch.arange(n)], 1).to(torch.int32)[:, :width]


def _ids(batch):
    return batch[0][:, 0].tolist()


def test_train_batches_resume_is_exact_across_epochs():
    ex = _rows(23)
    straight = TrainBatches(ex, 4, seed=7)
    expected = [_ids(next(straight)) for _ in range(20)]  # 5 batches an epoch (3 left over): 4 epochs
    first = TrainBatches(ex, 4, seed=7)
    got = [_ids(next(first)) for _ in range(7)]
    state = json.loads(json.dumps(first.state_dict()))  # it must survive a JSON/YAML round trip
    assert state == {"epoch": 1, "offset": 8, "seed": 7, "num_examples": 23}
    resumed = TrainBatches(ex, 4, seed=7)
    resumed.load_state_dict(state)
    got += [_ids(next(resumed)) for _ in range(13)]
    assert got == expected
    # Each epoch is a permutation: 5 batches of 4 distinct examples, 3 left out, and epochs differ.
    epochs = [sum(expected[5 * e : 5 * e + 5], []) for e in range(4)]
    assert all(len(set(e)) == 20 for e in epochs)
    assert epochs[0] != epochs[1]
    assert TrainBatches(ex, 4, seed=8).__next__()[0].tolist() != TrainBatches(ex, 4, seed=7).__next__()[0].tolist()


def test_rank_shards_are_disjoint_and_match_one_process_with_w_times_the_batch():
    ex = _rows(50)
    single = TrainBatches(ex, 6, seed=3)  # one process, micro-batch 2 * 3 ranks
    ranks = [TrainBatches(ex, 2, seed=3, rank=r, world_size=3) for r in range(3)]
    for _ in range(20):  # 8 rows an epoch: crosses two epoch boundaries
        shards = [_ids(next(it)) for it in ranks]
        flat = sum(shards, [])
        assert len(set(flat)) == 6
        assert flat == _ids(next(single))


def test_resume_with_a_different_world_size_neither_skips_nor_repeats():
    ex = _rows(40)
    one = TrainBatches(ex, 4, seed=1)
    seen = sum((_ids(next(one)) for _ in range(3)), [])  # 12 of epoch 0
    twos = [TrainBatches(ex, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    for it in twos:
        it.load_state_dict(one.state_dict())
    for _ in range(4):  # 4 rows of 6: 24 more, 36 in all, 4 left over
        for it in twos:
            seen += _ids(next(it))
    assert len(seen) == len(set(seen)) == 36


def test_load_state_dict_rejects_other_seed_or_data():
    it = TrainBatches(_rows(10), 2, seed=1)
    with pytest.raises(ConfigError, match=r"seed = 2 .* this run has 1"):
        it.load_state_dict({**it.state_dict(), "seed": 2})
    with pytest.raises(ConfigError, match=r"num_examples = 11 .* this run has 10"):
        it.load_state_dict({**it.state_dict(), "num_examples": 11})
    with pytest.raises(ConfigError, match=r"micro_batch_size \* world_size = 4 \* 3 exceeds the 10"):
        TrainBatches(_rows(10), 4, world_size=3)


def test_val_batches_are_the_same_every_call():
    val = ValBatches(_rows(7), batch_size=3, num_batches=5)
    first = [_ids(b) for b in val]
    assert first == [[0, 1, 2], [3, 4, 5], [6]] == [_ids(b) for b in val]
    assert len(val) == 3
    assert [_ids(b) for b in ValBatches(_rows(7), 2, 2)] == [[0, 1], [2, 3]]


# ---------------------------------------------------------------- tokenizers


def test_bytes_and_bpe_round_trip(tmp_path):
    b = BytesTokenizer()
    assert b.decode(b.encode(AWKWARD)) == AWKWARD
    assert max(b.encode(AWKWARD)) < b.vocab_size == 257 and b.eod_id == 256
    bundle = build_data(_cfg(tmp_path, vocab_size=600), 32)
    bpe = bundle.tokenizer
    ids = bpe.encode(AWKWARD)
    assert bpe.decode(ids) == AWKWARD
    assert bpe.vocab_size == bundle.vocab_size == 600
    assert bpe.eod_id not in ids and max(ids) < 600
    # Trained on Python source: a common keyword line is fewer tokens than bytes.
    assert len(bpe.encode("    def __init__(self):\n        return None\n")) < 20


# ---------------------------------------------------------------- default corpus, split, cache


def test_stdlib_corpus_is_sorted_library_code_under_the_cap():
    files = data_sources.stdlib_files(2_000_000)
    rels = [rel for rel, _ in files]
    assert rels == sorted(rels) and len(rels) > 20
    assert sum(os.path.getsize(p) for _, p in files) <= 2_000_000
    assert not [r for r in rels if set(r.split(os.sep)) & {"test", "tests", "idle_test", "site-packages"}]
    # A prefix: a larger cap only appends files.
    assert data_sources.stdlib_files(3_000_000)[: len(files)] == files


def test_split_is_disjoint_by_document_and_covers_the_corpus():
    docs = data_sources.stdlib_documents(600_000)
    n = len(docs.dataset)
    train, val = split_documents(docs, 0.1)
    assert len(val) == round(0.1 * n) and len(train) + len(val) == n
    train_texts, val_texts = list(train["text"]), list(val["text"])
    assert not set(train_texts) & set(val_texts)
    assert sorted(train_texts + val_texts) == sorted(docs.dataset["text"])
    assert len(split_documents(docs, 1e-6)[1]) == 1  # at least one held-out document
    assert list(split_documents(docs, 0.1)[1]["text"]) == val_texts  # deterministic


def test_val_tokens_are_exactly_the_val_documents(tmp_path):
    cfg = _cfg(tmp_path, tokenizer="bytes", val_fraction=0.05)
    bundle = build_data(cfg, 64)
    _, val_docs = split_documents(data_sources.stdlib_documents(cfg.max_bytes), cfg.val_fraction)
    stream = b"".join(t.encode() + b"\0" for t in list(val_docs["text"]))  # eod drawn as NUL
    # The packed windows cover the stream's first 1 + 64 * N tokens, shared edges counted once.
    covered = torch.cat([bundle.val[0, :1], bundle.val[:, 1:].reshape(-1)])
    assert bytes(0 if i == 256 else i for i in covered.tolist()) == stream[: len(covered)]
    assert bundle.stats["val_docs"] == len(val_docs) and bundle.stats["val_tokens"] == len(stream)


def test_second_build_neither_retrains_nor_retokenises(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, vocab_size=512)
    first = build_data(cfg, 64)
    assert (first.stats["tokenizer_cached"], first.stats["tokens_cached"]) == (False, False)
    cache_files = sorted((tmp_path / "cache").rglob("*.arrow")) + sorted((tmp_path / "cache").rglob("bpe-*.json"))
    assert len(cache_files) == 3  # train ids, val ids, tokenizer
    mtimes = [p.stat().st_mtime_ns for p in cache_files]

    def refuse(*args, **kwargs):
        raise AssertionError("cache miss: the second build called the tokenizer")

    monkeypatch.setattr(tok_mod, "train_bpe", refuse)
    monkeypatch.setattr(tok_mod.BPETokenizer, "encode_batch", refuse)
    second = build_data(cfg, 64)
    assert (second.stats["tokenizer_cached"], second.stats["tokens_cached"]) == (True, True)
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    assert [p.stat().st_mtime_ns for p in cache_files] == mtimes
    assert int(second.train.max()) < second.vocab_size == 512
    # Another vocab size is another tokenizer: the cache must miss, not serve the 512 one.
    monkeypatch.undo()
    assert build_data(_cfg(tmp_path, vocab_size=300), 64).vocab_size == 300


def test_num_proc_2_gives_the_same_token_ids_as_one_process(tmp_path):
    """Two tokenising processes (each writing a shard of the map's cache) vs one, separate caches, same BPE."""
    one = build_data(_cfg(tmp_path / "one", vocab_size=300), 16)
    two_cfg = _cfg(tmp_path / "two", vocab_size=300, num_proc=2)
    two = build_data(two_cfg, 16)
    assert not two.stats["tokens_cached"] and two.stats["train_docs"] >= 4  # enough documents for 2 shards
    assert torch.equal(one.train, two.train) and torch.equal(one.val, two.val)
    again = build_data(two_cfg, 16)  # and the shards are found again
    assert again.stats["tokens_cached"] and torch.equal(again.train, one.train)


def test_cache_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KIMI_MOE_CACHE", str(tmp_path / "env"))
    assert DataConfig().cache_dir == str(tmp_path / "env")
    assert DataConfig(cache_dir="/x").cache_dir == "/x"
    monkeypatch.delenv("KIMI_MOE_CACHE")
    assert DataConfig().cache_dir == os.path.expanduser("~/.cache/kimi-moe")


# ---------------------------------------------------------------- user data


def _paragraphs(k):
    return [f"paragraph {i}: " + "the quick brown fox jumps over the lazy dog. " * 3 for i in range(k)]


def _decoded_docs(bundle, split="train"):
    examples = getattr(bundle, split)
    stream = torch.cat([examples[0, :1], examples[:, 1:].reshape(-1)]).tolist()
    return bundle.tokenizer.decode(stream)


def test_txt_file_one_document_per_paragraph(tmp_path):
    paras = _paragraphs(40)
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paras) + "\n")
    bundle = build_data(_cfg(tmp_path, path=str(path), tokenizer="bytes", val_fraction=0.1), 16)
    assert (bundle.stats["train_docs"], bundle.stats["val_docs"]) == (36, 4)
    train, val = _decoded_docs(bundle, "train"), _decoded_docs(bundle, "val")
    in_train = {p for p in paras if p in train}
    in_val = {p for p in paras if p in val}
    assert not in_train & in_val
    # Only the last document of each split may be cut short by the final partial window.
    assert len(in_train) >= 35 and len(in_val) >= 3


def test_jsonl_with_custom_text_field_directory_and_glob(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    paras = _paragraphs(30)
    for shard in range(3):
        rows = [{"content": p, "id": i} for i, p in enumerate(paras[shard::3])]
        (folder / f"part{shard}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for path in (str(folder), str(folder / "part*.jsonl")):
        bundle = build_data(_cfg(tmp_path, path=path, text_field="content", vocab_size=300), 16)
        assert bundle.stats["train_docs"] + bundle.stats["val_docs"] == 30
        assert "quick brown fox" in _decoded_docs(bundle)
        assert int(bundle.train.max()) < bundle.vocab_size


def test_parquet_file(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": _paragraphs(25), "n": list(range(25))}), path)
    bundle = build_data(_cfg(tmp_path, path=str(path), tokenizer="bytes"), 16)
    assert bundle.stats["train_docs"] + bundle.stats["val_docs"] == 25
    assert bundle.stats["val_docs"] == 1  # round(0.02 * 25) = 0, raised to the minimum of 1


def test_dataset_name_from_the_local_cache(tmp_path, monkeypatch):
    hf_cache = tmp_path / "hf"
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": _paragraphs(20)}), path)
    # Load local files, then move the result to where load_dataset("someone/stories") would have left
    # a download: <cache>/someone___stories/default/<version>/<hash>/.
    datasets.load_dataset("parquet", data_files=str(path), cache_dir=str(hf_cache))
    (built,) = [p for p in (hf_cache / "parquet").glob("*/*/*") if p.is_dir()]
    target = hf_cache / "someone___stories" / "default" / built.parent.name / built.name
    target.parent.mkdir(parents=True)
    built.rename(target)
    (target / "parquet-train.arrow").rename(target / "stories-train.arrow")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(hf_cache))
    bundle = build_data(_cfg(tmp_path, path="someone/stories", tokenizer="bytes"), 16)
    assert bundle.stats["source"] == "cached dataset 'someone/stories'"
    assert bundle.stats["train_docs"] + bundle.stats["val_docs"] == 20
    with pytest.raises(ConfigError, match=r"data.path = 'someone/absent' is not a file, directory or glob"):
        build_data(_cfg(tmp_path, path="someone/absent"), 16)


# ---------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"vocab_size": 100}, r"data.vocab_size = 100 is too small .* need >= 265"),
        ({"vocab_size": "big"}, r"DataConfig.vocab_size = 'big' has type str; expected int"),
        ({"tokenizer": "sentencepiece"}, r"data.tokenizer = 'sentencepiece'; valid: 'bpe', 'bytes'"),
        ({"val_fraction": 1.0}, r"data.val_fraction = 1.0 must be in \(0, 1\)"),
        ({"path": ""}, r"data.path is empty"),
    ],
)
def test_bad_config_names_field_and_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**kwargs)


# (file name, its content or None for no file, the path given, what the error must say)
BAD_DATA = [
    ("corpus.txt", None, "nope/corpus.txt", r"data.path = '.*nope/corpus.txt' does not exist"),
    ("table.csv", "text\nhello\n", "table.csv", r"table.csv' has unsupported format '.csv'; supported: .txt, .jsonl"),
    ("empty.txt", "", "empty.txt", r"empty.txt': the corpus is empty \(1 file of 0 bytes\)"),
    ("blank.txt", "\n\n\n\n", "blank.txt", r"blank.txt' \(1 text file\) holds 0 documents; need >= 2"),
    ("broken.jsonl", '{"text": "a"}\n{"text": \n', "broken.jsonl", r"broken.jsonl' \(1 json file\) could not be read"),
    ("rows.jsonl", '{"body": "a"}\n', "rows.jsonl", r"data.text_field = 'text' is not a column of .*rows.jsonl.*; columns: body"),
    ("nums.jsonl", '{"text": 1}\n{"text": 2}\n', "nums.jsonl", r"data.text_field = 'text' in .*nums.jsonl.* holds Value\('int64'\)"),
    ("a.txt", "some text", "*.md", r"data.path = '.*\*.md' matches no files"),
]


@pytest.mark.parametrize("name, content, given, message", BAD_DATA, ids=[row[0] for row in BAD_DATA])
def test_bad_data_is_refused_before_any_work(tmp_path, monkeypatch, name, content, given, message):
    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer ran before the input was checked")

    monkeypatch.setattr(tok_mod, "train_bpe", refuse)
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=message):
        build_data(_cfg(tmp_path, path=str(tmp_path / given)), 16)


def test_too_little_validation_text_names_val_fraction(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("\n\n".join(f"paragraph {i} is short" for i in range(10)))  # ~19 bytes each
    # One held-out paragraph (~20 tokens) cannot fill one example of 65; nine train ones can.
    with pytest.raises(ConfigError, match=r"the val split .* fewer than seq_len \+ 1 = 65; raise data.val_fraction \(now 0.1\)"):
        build_data(_cfg(tmp_path, path=str(path), tokenizer="bytes", val_fraction=0.1), 64)
