"""Training data: documents -> tokenizer -> token ids (cached) -> packed examples -> batches.

The whole API:

    cfg = DataConfig(path=None, tokenizer="bpe", vocab_size=4096)   # validated on construction
    data = build_data(cfg, seq_len=256)                              # -> DataBundle
    data.train, data.val     # int32 tensors [N, seq_len + 1]: example i is tokens[i*T : i*T + T + 1]
                             # (data.format = "chat": [N, 3, seq_len + 1] conversation rows, posttrain/sft_data.py)
    data.tokenizer           # .encode(str) -> list[int], .decode(ids) -> str, .eod_id
    data.vocab_size          # every id in train/val is < vocab_size
    batches = TrainBatches(data.train, micro_batch_size, seed=0, rank=r, world_size=w)
    inputs, targets = next(batches)                                  # int64 [B, T]; targets = inputs shifted by 1
    state = batches.state_dict(); batches.load_state_dict(state)     # exact resume (launch/data/batches.py)
    for inputs, targets in ValBatches(data.val, batch_size, num_batches): ...   # same batches every time

Pipeline. Documents come from `launch/data/sources.py` (default: the Python standard library's
source, offline everywhere). They are split by document into train and validation (a fixed
permutation, `val_fraction` of the documents, at least one), the BPE is trained on the train
documents only, and both splits are tokenised with `Dataset.map(batched=True)` into Arrow files.
Documents are joined with the end-of-document token and cut into windows of T + 1 tokens with
stride T, so every token after the first is a target exactly once.

Caches, all under `cache_dir` (default $KIMI_MOE_CACHE, else ~/.cache/kimi-moe):
    tokenizers/bpe-f3-<vocab>-<corpus>.json  the trained BPE (with the chat special tokens)
    tokens/<corpus>-<tokenizer>-<split>.arrow  token ids of each split (the map's cache file)
    datasets/                                 `datasets`' own cache of the user's files
Keys are fingerprints of the documents and of the tokenizer, so a changed corpus or vocab_size
misses the cache and nothing stale is read. Concurrent builds (one per rank) take a file lock:
the first builds, the rest load its files.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field

import datasets
import filelock
import numpy as np
import pyarrow.compute as pc
import torch

from launch.data.batches import TrainBatches, ValBatches
from launch.data.config import DataConfig
from launch.data.sources import Documents, load_documents
from launch.data.tokenizer import BPETokenizer, BytesTokenizer, load_or_train_bpe
from moe.config import ConfigError

__all__ = ["DataConfig", "DataBundle", "build_data", "TrainBatches", "ValBatches"]

# Bump when the tokenised format changes, so old cache files are not read as new ones.
TOKENS_FORMAT = 1
# Which documents go to validation must not move with the training seed: the held-out set stays held out.
SPLIT_SEED = 0


@dataclass
class DataBundle:
    # int32 [N, seq_len + 1] windows of text; [N, 3, seq_len + 1] rows of conversations (posttrain/sft_data.py)
    train: torch.Tensor
    val: torch.Tensor
    tokenizer: BPETokenizer | BytesTokenizer
    vocab_size: int
    # Counts, timings and cache hits of this build, for the run log.
    stats: dict = field(default_factory=dict)


def build_data(cfg: DataConfig, seq_len: int, tokenizer=None) -> DataBundle:
    """Load, split, tokenise (cached) and pack the corpus `cfg` names into examples of seq_len + 1 tokens.

    `tokenizer`: the one a run that starts from trained weights must use (theirs); None trains or
    loads the BPE `cfg` describes. data.format = "chat" needs one (posttrain/sft_data.py)."""
    if seq_len < 1:
        raise ConfigError(f"seq_len = {seq_len} must be >= 1")
    if cfg.format == "chat":
        from posttrain.sft_data import build_chat_data

        return build_chat_data(cfg, seq_len, tokenizer)
    start = time.perf_counter()
    docs = load_documents(cfg.path, cfg.text_field, cfg.max_bytes, cfg.cache_dir)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction)
    os.makedirs(os.path.join(cfg.cache_dir, "tokens"), exist_ok=True)
    lock = os.path.join(cfg.cache_dir, "tokens", f"{docs.fingerprint}.lock")
    with filelock.FileLock(lock):
        tokenizer, tokenizer_cached = (tokenizer, True) if tokenizer is not None else _tokenizer(cfg, docs, train_docs)
        train_ids, train_cached = tokenise(train_docs, docs, tokenizer, "train", cfg)
        val_ids, val_cached = tokenise(val_docs, docs, tokenizer, "val", cfg)
    train, val = pack(train_ids, seq_len), pack(val_ids, seq_len)
    for name, examples, ids, hint in (
        ("train", train, train_ids, "use more data"),
        ("val", val, val_ids, f"raise data.val_fraction (now {cfg.val_fraction})"),
    ):
        if len(examples) == 0:
            raise ConfigError(
                f"the {name} split of {docs.description} has {len(ids)} tokens, fewer than "
                f"seq_len + 1 = {seq_len + 1}; {hint} or lower seq_len"
            )
    stats = {
        "source": docs.description, "train_docs": len(train_docs), "val_docs": len(val_docs),
        "train_tokens": len(train_ids), "val_tokens": len(val_ids), "tokenizer_cached": tokenizer_cached,
        "tokens_cached": train_cached and val_cached, "build_s": round(time.perf_counter() - start, 2),
    }
    return DataBundle(train, val, tokenizer, tokenizer.vocab_size, stats)


def split_documents(docs: Documents, val_fraction: float) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Disjoint (train, val) documents: val is round(val_fraction * n) of them (at least 1), fixed for a given n."""
    n = len(docs.dataset)
    if n < 2:
        hint = " (a .txt document is a blank-line-separated paragraph)" if n == 1 else ""
        raise ConfigError(f"{docs.description} holds {n} document{'s' * (n != 1)}{hint}; need >= 2 to hold one out")
    train, val = split_indices(n, val_fraction)
    return docs.dataset.select(train), docs.dataset.select(val)


def split_indices(n: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices of n >= 2 items: val is round(val_fraction * n) of them, at least
    one and at most n - 1, fixed for a given n (SPLIT_SEED). Pretraining documents and SFT
    conversations are held out by this one rule."""
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _tokenizer(cfg: DataConfig, docs: Documents, train_docs: datasets.Dataset):
    if cfg.tokenizer == "bytes":
        return BytesTokenizer(), True
    texts = (batch[docs.text_field] for batch in train_docs.iter(batch_size=256))
    # n and the number held out fix the split (SPLIT_SEED), and the split is part of what the BPE saw.
    fingerprint = f"{docs.fingerprint}-train{len(train_docs)}"
    return load_or_train_bpe(cfg.cache_dir, cfg.vocab_size, fingerprint, texts, length=len(train_docs))


def tokenise(split: datasets.Dataset, docs: Documents, tokenizer, name: str, cfg: DataConfig) -> tuple[torch.Tensor, bool]:
    """Token ids of `split`, each non-empty document followed by eod, as one int32 tensor; and whether
    they came from the cache. The map's output file is keyed by corpus, split and tokenizer."""
    key = f"{docs.fingerprint}-{tokenizer.fingerprint}-f{TOKENS_FORMAT}-{name}{len(split)}"
    cache_file = os.path.join(cfg.cache_dir, "tokens", f"{key}.arrow")
    cached = os.path.exists(cache_file) or any(
        f.startswith(key + "_") for f in os.listdir(os.path.dirname(cache_file))  # num_proc > 1 shards
    )
    eod = tokenizer.eod_id

    def encode(batch: dict) -> dict:
        texts = [t or "" for t in batch[docs.text_field]]
        ids = tokenizer.encode_batch(texts)
        return {"input_ids": [x + [eod] if t else [] for x, t in zip(ids, texts)]}

    tokens = split.map(
        encode,
        batched=True,
        batch_size=256,
        remove_columns=split.column_names,
        features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))}),
        cache_file_name=cache_file,
        load_from_cache_file=True,
        # Our key, not datasets' hash of `encode`: hashing a closure over a Rust tokenizer is not stable.
        # Hashed, because datasets caps a fingerprint at 64 characters and num_proc > 1 appends a
        # shard suffix ("_00000_of_00002") to it; the file name above stays readable.
        new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32],
        num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
        desc=f"tokenising {name}",
    )
    flat = pc.list_flatten(tokens.data.column("input_ids")).to_numpy()
    if not flat.flags.writeable:  # a zero-copy view of one Arrow chunk; torch wants memory it may write
        flat = flat.copy()
    return torch.from_numpy(flat), cached


def pack(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[M] tokens -> [(M - 1) // T, T + 1] windows with stride T: a view, no copy.

    Consecutive windows share one token (the last target of one is the first input of the next),
    so each token except the very first is predicted exactly once.
    """
    n = max(0, (len(ids) - 1) // seq_len)
    return ids.as_strided((n, seq_len + 1), (seq_len, 1))
