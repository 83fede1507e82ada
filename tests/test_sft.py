"""Supervised fine-tuning: packed conversation rows, the assistant-only loss, and `posttrain.sft` on
the trainer's engine (start from a run, metrics, checkpoints, resume, torchrun with EP + ZeRO).

The loss-mask test spells the expected assistant text out from the messages by hand (the layout in
posttrain/chat.py's docstring), rather than asking the renderer that made the mask.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from launch.data.batches import ValBatches
from launch.checkpoint.pretrained import load_pretrained
from launch.train import run
from moe.config import ConfigError
from moe.model import IGNORE_INDEX
from posttrain import sft
from posttrain.chat import render_conversation
from posttrain.sft_data import DOCUMENT, MASK, TOKENS, pack_conversations
from posttrain.tasks import make_tasks, write_jsonl

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from harness import tiny_chat_base_flags, torchrun  # noqa: E402


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A seconds-long pretraining run of the tiny preset with a BPE that has the chat tokens."""
    root = tmp_path_factory.mktemp("sft")
    run(sft.parse_args(tiny_chat_base_flags(root, root / "base")))
    traces = root / "traces.jsonl"
    write_jsonl(make_tasks(120, 0, "single", declare_tools=False) + make_tasks(40, 0, "multi", declare_tools=False),
                traces)
    return root, load_pretrained(str(root / "base"))


def _expected_assistant_text(message) -> str:
    """What an assistant turn writes, spelt out by hand: content, each call, then <|im_end|>."""
    text = message.get("content") or ""
    for call in message.get("tool_calls") or []:
        text += f"<|tool_call_begin|>{call['function']['name']}<|im_middle|>{call['function']['arguments']}<|tool_call_end|>"
    return text + "<|im_end|>"


def _rows(tokenizer, conversations, seq_len):
    rendered = [render_conversation(tokenizer, c["messages"], c.get("tools")) for c in conversations]
    rows, counts = pack_conversations(rendered, seq_len, tokenizer.eod_id)
    return rendered, rows, counts


def test_targets_are_exactly_the_assistant_tokens(base_run):
    _, base = base_run
    tok = base.tokenizer
    conversations = [{"messages": t["trajectory"]} for t in make_tasks(12, 1, "multi") + make_tasks(12, 1, "single")]
    _, rows, counts = _rows(tok, conversations, seq_len=400)
    assert counts == {"truncated": 0, "dropped_rows": 0} and len(rows) < len(conversations)  # several per row
    inputs, targets, documents = next(iter(ValBatches(rows, len(rows), 1)))
    decoder = tok.to_tokenizers()

    def decode(ids):  # the special tokens spelt out
        return decoder.decode(ids, skip_special_tokens=False)

    kept = []  # per document, the decoded runs of kept targets
    for r in range(len(rows)):
        for d in documents[r].unique().tolist():
            in_doc = (documents[r] == d).nonzero().flatten()
            runs, current = [], []
            for t in in_doc.tolist():
                if targets[r, t] != IGNORE_INDEX:
                    current.append(targets[r, t].item())
                elif current:
                    runs.append(decode(current))
                    current = []
            if current:
                runs.append(decode(current))
            if runs:
                kept.append(runs)
    expected = [[_expected_assistant_text(m) for m in c["messages"] if m["role"] == "assistant"] for c in conversations]
    assert kept == expected
    # Padding and every other role contribute nothing; the row tensor keeps its own mask plane honest.
    assert (targets != IGNORE_INDEX).sum() == rows[:, MASK, 1:].sum()


def test_a_tokens_loss_depends_on_its_own_conversation_only(base_run):
    """Rewrite every token of conversation 0 (same length): the per-token losses of the others in the
    packed row stay the same, as in a row where they were alone."""
    _, base = base_run
    tok, model = base.tokenizer, base.model
    conversations = [{"messages": t["trajectory"]} for t in make_tasks(3, 2, "single")]
    _, rows, _ = _rows(tok, conversations, seq_len=600)
    assert len(rows) == 1 and rows[0, DOCUMENT].max() >= 2
    changed = rows.clone()
    first = changed[0, DOCUMENT] == 0
    changed[0, TOKENS][first] = torch.randint(9, tok.vocab_size, (int(first.sum()),), generator=torch.Generator().manual_seed(0), dtype=torch.int32)

    def token_losses(rows):
        inputs, targets, documents = next(iter(ValBatches(rows, 1, 1)))
        with torch.no_grad():
            logits = model(inputs, document_ids_BT=documents).logits
        return F.cross_entropy(logits[0], targets[0], ignore_index=IGNORE_INDEX, reduction="none"), documents[0]

    before, documents = token_losses(rows)
    after, _ = token_losses(changed)
    others = documents > 0
    assert (before[others] > 0).any()
    torch.testing.assert_close(after[others], before[others], atol=1e-6, rtol=0)
    # And through autograd, with the batch's own targets: conversation 1's loss has zero gradient on
    # the embeddings of every other conversation's tokens, and a non-zero one on its own.
    inputs, targets, documents = next(iter(ValBatches(rows, 1, 1)))
    embedded = []
    handle = model.embed_tokens.register_forward_hook(lambda m, args, out: embedded.append(out) or out.retain_grad())
    try:
        logits = model(inputs, document_ids_BT=documents).logits
    finally:
        handle.remove()
    in_1 = documents[0] == 1
    F.cross_entropy(logits[0][in_1], targets[0][in_1], ignore_index=IGNORE_INDEX).backward()
    grad_TD = embedded[0].grad[0]
    assert torch.count_nonzero(grad_TD[~in_1]) == 0
    # Every token of it feeds its loss, but the last: its target would be the next conversation's.
    assert grad_TD[in_1][:-1].abs().amax(dim=-1).min() > 0


def test_long_conversations_are_cut_and_counted(base_run):
    _, base = base_run
    conversations = [{"messages": t["trajectory"], "tools": t["tools"]} for t in make_tasks(4, 3, "single")]
    rendered, rows, counts = _rows(base.tokenizer, conversations, seq_len=128)
    assert all(len(r.ids) > 129 for r in rendered)  # the tools turn alone is longer than a row
    assert counts == {"truncated": 4, "dropped_rows": 4} and len(rows) == 0


def test_sft_refuses_a_run_without_a_source_and_a_bad_file(base_run, tmp_path):
    root, _ = base_run
    with pytest.raises(ConfigError, match="--init-from is required"):
        sft.parse(["--data", str(root / "traces.jsonl"), "--out-dir", str(tmp_path / "a")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "robot", "content": "x"}]}\n')
    cfg = sft.parse(["--init-from", str(root / "base"), "--data", str(bad), "--out-dir", str(tmp_path / "b")])
    with pytest.raises(ConfigError, match=r"bad.jsonl line 2: .*role"):
        run(cfg)
    with pytest.raises(ConfigError, match="model.num_layers is given with init_from"):
        sft.parse(["--init-from", str(root / "base"), "--model.num_layers", "3"])


def _sft_flags(root, out, *extra):
    return ["--init-from", str(root / "base"), "--data", str(root / "traces.jsonl"), "--seq-len", "192",
            "--micro-batch-size", "4", "--eval-every", "5", "--eval-batches", "2", "--checkpoint-every", "5",
            "--warmup-steps", "2", "--out-dir", str(out), *extra]


def test_sft_starts_from_the_run_learns_and_resumes(base_run, tmp_path):
    root, base = base_run
    out = tmp_path / "sft"
    summary = run(sft.parse(_sft_flags(root, out, "--steps", "10")))
    assert summary["status"] == "ok" and summary["init_from"] == str(root / "base")
    assert summary["final_val_loss"] < summary["first_val_loss"] - 0.3, summary
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["optimizer"] == "muonclip" and saved["data"]["format"] == "chat"
    assert saved["resolved_model"]["num_layers"] == base.model.cfg.num_layers
    assert (out / "tokenizer.json").read_text() == (root / "base" / "tokenizer.json").read_text()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("max_logit" in r for r in records if "lm_loss" in r)  # MuonClip measured every step
    # The first validation, before any SFT step, is the base model's loss on the assistant tokens.
    first = records[0]["val_loss"]
    rows = sft_val_rows(root, base)
    with torch.no_grad():
        losses = [base.model(i, t, document_ids_BT=d).lm_loss.item() for i, t, d in ValBatches(rows, 4, 2)]
    assert first == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    # Resume to step 14: the run continues from its own checkpoint (not from the source's weights).
    resumed = run(sft.parse(["--resume", "--out-dir", str(out), "--steps", "14"]))
    assert resumed["start_step"] == 10 and resumed["status"] == "ok"
    with pytest.raises(ConfigError, match="init_from"):
        run(sft.parse(["--resume", "--out-dir", str(out), "--steps", "16", "--init-from", str(out)]))


def sft_val_rows(root, base):
    from launch.data.build import DataConfig
    from posttrain.sft_data import build_chat_data

    return build_chat_data(DataConfig(path=str(root / "traces.jsonl"), format="chat"), 192, base.tokenizer).val


def test_sft_under_torchrun_with_expert_parallelism_and_zero2(base_run, tmp_path):
    root, _ = base_run
    out = tmp_path / "sft-ep"
    torchrun(["-m", "posttrain.sft", *_sft_flags(root, out, "--steps", "4", "--ep-size", "2", "--zero-stage", "2")],
             nproc=2, timeout=400)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["world_size"] == 2 and summary["final_val_loss"] < summary["first_val_loss"]
