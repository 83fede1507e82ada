"""Tokenizers that need no download: a byte-level BPE trained on the run's own corpus, and raw bytes.

Both expose the same small surface, which is all `launch/data/build.py` and the trainer use:

    tok.encode(text) -> list[int]          tok.encode_batch(texts) -> list[list[int]]
    tok.decode(ids) -> str                 tok.vocab_size, tok.eod_id, tok.fingerprint

`encode` never adds the end-of-document token; the data pipeline appends `eod_id` after each
document. Every id is < `vocab_size`.

Special tokens: the BPE carries `SPECIALS`, end-of-document first (id 0) and then the chat format's
role and tool-call delimiters (ids 1..8, see posttrain/chat.py), so one trained tokenizer serves
pretraining and chat. Only code places them: `encode` reads every string as text, so a document or
a user message holding "<|im_end|>" gets ordinary tokens, never the id that closes a turn. The bytes
tokenizer has only eod (256) and no chat tokens: it is for tests and tiny pretraining runs.

The BPE is cached as `<cache_dir>/tokenizers/bpe-f<format>-<vocab>-<corpus fingerprint>.json`, so a
second run on the same corpus loads the file instead of training again (`load_or_train_bpe`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOD = "<|eod|>"
# Turn and tool-call delimiters of the chat format (posttrain/chat.py writes the layout). Their ids
# follow eod in this order; appending keeps existing ids, anything else is a new FORMAT.
CHAT_TOKENS = (
    "<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_tool|>",  # open a turn of that role
    "<|im_middle|>",  # ends a header: the tool name of a call or result, "tools" of the declaration
    "<|im_end|>",  # closes every turn
    "<|tool_call_begin|>", "<|tool_call_end|>",  # around one call: name <|im_middle|> JSON arguments
)
SPECIALS = (EOD, *CHAT_TOKENS)
# Bump when what a trained BPE holds changes (FORMAT 2: the chat tokens; 3: digits split one by
# one), so an old cached file is not read as a new one.
FORMAT = 3
# 256 byte symbols plus the special tokens: below this a byte-level BPE cannot exist.
MIN_BPE_VOCAB = 256 + len(SPECIALS)


class BytesTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-document 256. For tests and tiny runs: no training, no cache."""

    vocab_size = 257
    eod_id = 256
    fingerprint = "bytes"
    special_ids = {EOD: 256}  # no chat tokens: ids 257.. would change every byte model's vocabulary

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        # The eod id is not a byte; drop it the way the BPE's decode skips its special token.
        return bytes(i for i in ids if i != self.eod_id).decode("utf-8", errors="replace")

    def to_tokenizers(self) -> Tokenizer:
        """The same ids as a `tokenizers.Tokenizer`, for files others read (run directory, HF export):
        a byte-level BPE without merges maps each byte to the symbol whose id is that byte."""
        symbols = {s: b for b, s in _byte_symbols().items()}
        tok = Tokenizer(models.BPE(vocab=symbols, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([EOD])
        return tok


def _byte_symbols() -> dict[int, str]:
    """Byte -> the character the ByteLevel pre-tokenizer writes for it: GPT-2's `bytes_to_unicode`
    (openai/gpt-2 src/encoder.py), printable Latin-1 as itself, the other bytes in order from U+0100."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    moved = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(moved)) for b in range(256)}


class BPETokenizer:
    """A `tokenizers.Tokenizer` (byte-level BPE with `SPECIALS`) behind the shared surface.

    A BPE of FORMAT 1 (eod only) still loads and pretrains; `special_ids` then lacks the chat tokens
    and posttrain/chat.py refuses it by name.
    """

    def __init__(self, tok: Tokenizer):
        eod = tok.token_to_id(EOD)
        if eod is None:
            raise ValueError(f"tokenizer has no {EOD!r} special token; it was not made by train_bpe")
        self.eod_id = eod
        self.special_ids = {t: tok.token_to_id(t) for t in SPECIALS if tok.token_to_id(t) is not None}
        self.vocab_size = tok.get_vocab_size()
        self.fingerprint = "bpe-" + hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
        # The library matches added tokens inside any text it encodes, add_special_tokens=False or
        # not; this switch makes it read them as characters. It is not saved with the file, so
        # Hugging Face, given the exported tokenizer.json, still finds them in a rendered template.
        tok.encode_special_tokens = True
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast skips computing character offsets, which we never read; it runs on
        # all cores in Rust, so the data pipeline keeps num_proc at 1 by default.
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))

    def to_tokenizers(self) -> Tokenizer:
        """A copy of the underlying `tokenizers.Tokenizer` as saved: it matches special tokens in text."""
        return Tokenizer.from_str(self._tok.to_str())

    def save(self, path: str) -> None:
        save_tokenizer_file(self._tok, path)

    @classmethod
    def load(cls, path: str) -> BPETokenizer:
        return cls(Tokenizer.from_file(path))


def save_tokenizer_file(tok: Tokenizer, path: str) -> None:
    """Write atomically, so a reader (another rank, a crashed run) never sees half a file; mode 0644
    (mkstemp makes 0600), so the people who share a run directory can read which tokenizer it used."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    tok.save(tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def train_bpe(texts: Iterator[list[str]], vocab_size: int, length: int | None = None) -> BPETokenizer:
    """Train a byte-level BPE on batches of documents.

    The 256 byte symbols are seeded as the initial alphabet, so any text encodes (no unknown
    token) and decode(encode(s)) == s. On a small corpus the merges may run out before
    `vocab_size`; the tokenizer's own `vocab_size` is then smaller, and that is the one to use.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"vocab_size = {vocab_size} is below {MIN_BPE_VOCAB} (256 bytes + {len(SPECIALS)} special tokens)")
    tok = Tokenizer(models.BPE())
    # Every digit its own token (as Llama's tokenizers do): a number in a request, a tool call and
    # a tool result is then the same short run of ten well-trained symbols wherever it appears,
    # where a BPE would cut "8510" and "851" into unrelated chunks. Copying numbers between turns is
    # most of what a tool-using model writes; measured in README "Tool use after SFT".
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),  # ids 0.. in this order, counted in vocab_size
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    return BPETokenizer(tok)


def bpe_cache_path(cache_dir: str, vocab_size: int, corpus_fingerprint: str) -> str:
    return os.path.join(cache_dir, "tokenizers", f"bpe-f{FORMAT}-{vocab_size}-{corpus_fingerprint}.json")


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


def save_run_tokenizer(tokenizer: BPETokenizer | BytesTokenizer, run_dir: str) -> str:
    """Write `<run_dir>/tokenizer.json` (readable by all, unlike the cache's files were): the run then
    says which tokenizer its token ids mean, whatever happens to the cache. Returns the path."""
    path = os.path.join(run_dir, "tokenizer.json")
    save_tokenizer_file(tokenizer.to_tokenizers(), path)
    return path
