"""Conversations -> packed rows for supervised fine-tuning (`data.format = "chat"`).

    bundle = build_chat_data(cfg, seq_len, tokenizer)     # cfg: launch.data.build.DataConfig, path = a JSONL file
    bundle.train, bundle.val                              # int32 [N, 3, T + 1]: token ids, loss mask, document ids

Shapes: N rows, T = seq_len. Each row is its own example (no stride as in pretraining): whole
conversations back to back, rendered by posttrain/chat.py, then padding (end-of-document ids, mask
0, a document of its own). Row r's planes:

    [r, 0] token ids       [r, 1] 1 where the token is one an assistant turn writes      [r, 2] document id

`launch/data/batches.py` turns a batch of rows into (inputs, targets, document ids): targets are the
next tokens where the mask is 1 and the next token is in the same document, -100 (ignored by the
loss) elsewhere; so the loss covers the assistant's text, calls and closing <|im_end|> only, and the
model's per-document attention (document_ids_BT) keeps every conversation from seeing another.

Conversations are split into train and validation by `val_fraction` with the rule that holds out
pretraining documents (launch/data/build.py's split_indices), then packed greedily in file
order. A conversation longer than T + 1 tokens is cut to its first T + 1 and counted in `stats`;
a row left with no assistant token (a cut that kept only the prompt) is dropped, since its loss
would be 0/0.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from moe.config import ConfigError
from posttrain.chat import chat_ids, render_conversation
from posttrain.conversations import ConversationError, load_conversations

TOKENS, MASK, DOCUMENT = range(3)


def pack_conversations(rendered, seq_len: int, pad_id: int) -> tuple[torch.Tensor, dict]:
    """Rendered conversations (ids, mask) -> (int32 [N, 3, T + 1] rows, counts)."""
    width = seq_len + 1
    rows, row, truncated, dropped = [], [], 0, 0

    def close():
        nonlocal row, dropped
        if not row:
            return
        tokens = np.full(width, pad_id, dtype=np.int32)
        mask = np.zeros(width, dtype=np.int32)
        document = np.full(width, len(row), dtype=np.int32)  # padding: a document of its own
        at = 0
        for d, (ids, m) in enumerate(row):
            tokens[at:at + len(ids)], mask[at:at + len(ids)], document[at:at + len(ids)] = ids, m, d
            at += len(ids)
        # A target counts only inside its document: the first token of a conversation is never an
        # assistant token, so this drops nothing that the mask kept; it guards the invariant anyway.
        if (mask[1:] & (document[1:] == document[:-1])).any():
            rows.append(np.stack([tokens, mask, document]))
        else:
            dropped += 1
        row = []

    used = 0
    for ids, mask in rendered:
        if len(ids) > width:
            ids, mask, truncated = ids[:width], mask[:width], truncated + 1
        if used + len(ids) > width:
            close()
            used = 0
        row.append((ids, mask))
        used += len(ids)
    close()
    packed = torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, 3, width, dtype=torch.int32)
    return packed, {"truncated": truncated, "dropped_rows": dropped}


def build_chat_data(cfg, seq_len: int, tokenizer):
    """A launch.data.build.DataBundle of packed conversation rows from the JSONL file `cfg.path`."""
    from launch.data.build import DataBundle, split_indices

    if cfg.path is None:
        raise ConfigError("data.format = 'chat' needs data.path: a JSONL file of conversations "
                          '({"messages": [...], "tools": [...]} per line)')
    if tokenizer is None:
        raise ConfigError("data.format = 'chat' needs the tokenizer of the model it fine-tunes: set init_from "
                          "(a run, checkpoint or Hugging Face directory that kept its tokenizer)")
    try:
        chat_ids(tokenizer)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    start = time.perf_counter()
    try:
        records = load_conversations(cfg.path)
    except (ConversationError, OSError) as err:
        raise ConfigError(f"data.path = {cfg.path!r}: {err}") from None
    if len(records) < 2:
        raise ConfigError(f"{cfg.path} holds {len(records)} conversation(s); need >= 2 to hold one out for validation")
    train_index, val_index = split_indices(len(records), cfg.val_fraction)
    splits, stats = {}, {"source": cfg.path, "conversations": len(records)}
    for name, index in (("train", train_index), ("val", val_index)):
        rendered = [render_conversation(tokenizer, records[i]["messages"], records[i].get("tools")) for i in index.tolist()]
        rows, counts = pack_conversations(rendered, seq_len, tokenizer.eod_id)
        if len(rows) == 0:
            raise ConfigError(f"the {name} split of {cfg.path} packs into no row with an assistant token; "
                              f"raise seq_len (now {seq_len})")
        splits[name] = rows
        stats.update({f"{name}_conversations": len(index), f"{name}_rows": len(rows),
                      f"{name}_loss_tokens": int(rows[:, MASK, 1:].sum()),
                      f"{name}_truncated": counts["truncated"], f"{name}_dropped_rows": counts["dropped_rows"]})
    stats["build_s"] = round(time.perf_counter() - start, 2)
    return DataBundle(splits["train"], splits["val"], tokenizer, tokenizer.vocab_size, stats)
