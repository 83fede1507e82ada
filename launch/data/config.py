"""What `--data.*` configures: the corpus, its tokenizer and the token cache (built by launch/data/build.py).

Kept apart from the builder so that reading a training config needs neither `datasets` nor Arrow:
launch.bench and trm.train run on synthetic or generated data, on machines without `datasets`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from launch.data.tokenizer import MIN_BPE_VOCAB
from moe.config import ConfigError, check_field_types, doc_field


@dataclass
class DataConfig:
    path: str | None = doc_field(None, "corpus: a .txt/.jsonl/.json/.parquet file, a glob or directory of them, a "
                                       "save_to_disk folder, or a dataset name in the local datasets cache; None: the "
                                       "Python standard library's source. One path holds one format: a glob or "
                                       "directory that mixes .txt and .jsonl files is refused")
    text_field: str = doc_field("text", "column holding the text in .jsonl/.json/.parquet and cached datasets")
    tokenizer: str = doc_field("bpe", "bpe: a byte-level BPE trained here on the train split; bytes: UTF-8 bytes, "
                                      "vocabulary 257")
    vocab_size: int = doc_field(4096, "BPE target size (including the special tokens); a small corpus may give "
                                      "fewer; ignored by bytes")
    max_bytes: int = doc_field(12_000_000, "cap on the default corpus (whole files, in sorted path order)")
    val_fraction: float = doc_field(0.02, "fraction of the documents held out for validation")
    cache_dir: str | None = doc_field(None, "where tokenizers and token ids are cached; None: $KIMI_MOE_CACHE, "
                                            "else ~/.cache/kimi-moe")
    # The BPE already uses every core from one process, hence 1.
    num_proc: int = doc_field(1, "processes for tokenising")
    format: str = doc_field("text", "text: documents, every token a target (pretraining); chat: a JSONL file of "
                                    "conversations, the loss on assistant tokens only, packed with per-document "
                                    "attention (posttrain/sft_data.py)")

    def __post_init__(self):
        check_field_types(self)
        if self.format not in ("text", "chat"):
            raise ConfigError(f"data.format = {self.format!r}; valid: 'text' (documents), 'chat' (conversations JSONL)")
        if self.tokenizer not in ("bpe", "bytes"):
            raise ConfigError(f"data.tokenizer = {self.tokenizer!r}; valid: 'bpe', 'bytes'")
        if self.tokenizer == "bpe" and self.vocab_size < MIN_BPE_VOCAB:
            raise ConfigError(
                f"data.vocab_size = {self.vocab_size} is too small for a byte-level BPE; "
                f"need >= {MIN_BPE_VOCAB} (256 bytes + end-of-document + the chat special tokens)"
            )
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction = {self.val_fraction} must be in (0, 1)")
        if self.max_bytes <= 0:
            raise ConfigError(f"data.max_bytes = {self.max_bytes} must be > 0")
        if self.num_proc < 1:
            raise ConfigError(f"data.num_proc = {self.num_proc} must be >= 1")
        if not self.text_field:
            raise ConfigError("data.text_field is empty; name the column that holds the text")
        if self.path == "":
            raise ConfigError("data.path is empty; give a file, glob, directory or dataset name, or leave it unset")
        if self.cache_dir is None:
            self.cache_dir = os.environ.get("KIMI_MOE_CACHE") or "~/.cache/kimi-moe"
        self.cache_dir = os.path.expanduser(self.cache_dir)
