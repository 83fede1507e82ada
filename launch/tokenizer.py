"""Tokenizers that need no download: a byte-level BPE trained on the run's own corpus, and raw bytes.

Both expose the same small surface, which is all `launch/data.py` and the trainer use:

    tok.encode(text) -> list[int]          tok.encode_batch(texts) -> list[list[int]]
    tok.decode(ids) -> str                 tok.vocab_size, tok.eod_id, tok.fingerprint

`encode` never adds the end-of-document token; the data pipeline appends `eod_id` after each
document. Every id is < `vocab_size`.

The BPE is cached as `<cache_dir>/tokenizers/bpe-<vocab>-<corpus fingerprint>.json`, so a second
run on the same corpus loads the file instead of training again (`load_or_train_bpe`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOD = "<|eod|>"
# 256 byte symbols plus the end-of-document token: below this a byte-level BPE cannot exist.
MIN_BPE_VOCAB = 257


class BytesTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-document 256. For tests and tiny runs: no training, no cache."""

    vocab_size = 257
    eod_id = 256
    fingerprint = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        # The eod id is not a byte; drop it the way the BPE's decode skips its special token.
        return bytes(i for i in ids if i != self.eod_id).decode("utf-8", errors="replace")


class BPETokenizer:
    """A `tokenizers.Tokenizer` (byte-level BPE, eod as its only special token) behind the shared surface."""

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        eod = tok.token_to_id(EOD)
        if eod is None:
            raise ValueError(f"tokenizer has no {EOD!r} special token; it was not made by train_bpe")
        self.eod_id = eod
        self.vocab_size = tok.get_vocab_size()
        self.fingerprint = "bpe-" + hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast skips computing character offsets, which we never read; it runs on
        # all cores in Rust, so the data pipeline keeps num_proc at 1 by default.
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))

    def save(self, path: str) -> None:
        """Write atomically, so a reader (another rank, a crashed run) never sees half a file."""
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        self._tok.save(tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> BPETokenizer:
        return cls(Tokenizer.from_file(path))


def train_bpe(texts: Iterator[list[str]], vocab_size: int, length: int | None = None) -> BPETokenizer:
    """Train a byte-level BPE on batches of documents.

    The 256 byte symbols are seeded as the initial alphabet, so any text encodes (no unknown
    token) and decode(encode(s)) == s. On a small corpus the merges may run out before
    `vocab_size`; the tokenizer's own `vocab_size` is then smaller, and that is the one to use.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"vocab_size = {vocab_size} is below {MIN_BPE_VOCAB} (256 bytes + eod)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    return BPETokenizer(tok)


def bpe_cache_path(cache_dir: str, vocab_size: int, corpus_fingerprint: str) -> str:
    return os.path.join(cache_dir, "tokenizers", f"bpe-{vocab_size}-{corpus_fingerprint}.json")


def load_or_train_bpe(
    cache_dir: str, vocab_size: int, corpus_fingerprint: str, texts: Iterator[list[str]], length: int | None = None
) -> tuple[BPETokenizer, bool]:
    """The cached BPE for (corpus, vocab_size), training and saving it first if absent.

    Returns (tokenizer, loaded_from_cache). `texts` is only consumed when training.
    """
    path = bpe_cache_path(cache_dir, vocab_size, corpus_fingerprint)
    if os.path.exists(path):
        return BPETokenizer.load(path), True
    tok = train_bpe(texts, vocab_size, length)
    tok.save(path)
    return tok, False
