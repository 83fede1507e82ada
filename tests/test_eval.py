"""The eval command (launch/eval.py) through `main(argv)`, on a seconds-long launch.train run and its export.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_eval.py

References we did not write twice: the validation loss the trainer logged in metrics.jsonl (same
data, seq_len and batches), transformers' DeepseekV3ForCausalLM on the exported directory (one
text batch; every validation conversation of a chat corpus, each run on its own, so the packing
and per-document masking of the eval are checked against a model that never saw them).
"""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV3ForCausalLM

from launch.config.training import parse_args
from launch.data.build import DataConfig, build_data, split_indices
from launch.eval import main
from launch.export import main as export_main
from launch.checkpoint.pretrained import load_pretrained
from launch.data.tokenizer import train_bpe
from launch.train import run
from moe.config import preset
from moe.hf import export_hf
from moe.model import Transformer
from posttrain.chat import render_conversation, render_text
from posttrain.hf_tokenizer import config_token_ids, export_tokenizer
from posttrain.tasks import make_tasks, write_jsonl

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from harness import tiny_train_flags  # noqa: E402

# The trainer validated on the first EVAL_BATCHES batches of BATCH sequences of 64 tokens.
BATCH, EVAL_BATCHES = 8, 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(root, run directory, its Hugging Face export): the tiny preset, 4 steps on 400 kB of stdlib bytes."""
    root = tmp_path_factory.mktemp("eval")
    run(parse_args([*tiny_train_flags(root, root / "run", micro_batch_size=BATCH), "--steps", "4", "--warmup-steps", "1",
                    "--eval-every", "4", "--eval-batches", str(EVAL_BATCHES)]))
    export_main([str(root / "run" / "checkpoints"), "--hf-dir", str(root / "hf")])
    return root, root / "run", root / "hf"


def _eval(capsys, *argv) -> dict:
    main([str(a) for a in argv])
    return json.loads(capsys.readouterr().out)


def _hf_data_flags(root):
    # What the run's manifest supplies by itself: an export keeps no data config.
    return ["--data.max_bytes", "400000", "--data.cache_dir", root / "cache", "--seq-len", "64"]


def test_run_gives_the_loss_the_trainer_logged(trained, capsys):
    root, run_dir, _ = trained
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if "val_loss" in r][-1]
    assert last["step"] == 4
    result = _eval(capsys, run_dir, "--batches", EVAL_BATCHES)  # seq_len, batch size and corpus from the run
    assert (result["step"], result["split"], result["seq_len"], result["batch_size"]) == (4, "val", 64, BATCH)
    assert result["tokens"] == BATCH * EVAL_BATCHES * 64
    assert abs(result["loss"] - last["val_loss"]) < 1e-5
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["model"]["preset"] == "tiny" and result["model"]["params_total"] > 0


def test_whole_split_is_token_weighted_and_counts_bytes(trained, capsys):
    _, run_dir, _ = trained
    full = _eval(capsys, run_dir)
    data = build_data(DataConfig(tokenizer="bytes", max_bytes=400000, cache_dir=str(trained[0] / "cache")), 64)
    assert (full["sequences"], full["tokens"]) == (len(data.val), len(data.val) * 64)
    # 7 does not divide the split: a mean of batch means would weigh the short last batch too much.
    odd = _eval(capsys, run_dir, "--batch-size", 7)
    assert len(data.val) % 7 and abs(odd["loss"] - full["loss"]) < 1e-5
    # Byte-level ids: every target but end-of-document (256) is one byte.
    assert full["bytes"] == int((data.val[:, 1:] != 256).sum())
    assert full["bits_per_byte"] == pytest.approx(full["loss"] * full["tokens"] / math.log(2) / full["bytes"])
    both = _eval(capsys, run_dir, "--split", "all", "--batches", 1)
    train = _eval(capsys, run_dir, "--split", "train", "--batches", 1)
    assert both["split_sequences"] == len(data.train) + len(data.val) == train["split_sequences"] + full["split_sequences"]
    assert both["loss"] == train["loss"] != full["loss"]  # "all" starts with the training documents


def test_export_gives_the_runs_loss_and_transformers_agrees(trained, capsys, tmp_path):
    root, run_dir, hf_dir = trained
    ours = _eval(capsys, run_dir, "--out", tmp_path / "run.json")
    exported = _eval(capsys, hf_dir, *_hf_data_flags(root), "--batch-size", BATCH)
    assert exported["tokens"] == ours["tokens"] and exported["model"]["preset"] is None
    assert abs(exported["loss"] - ours["loss"]) < 1e-4
    assert json.loads((tmp_path / "run.json").read_text())["loss"] == ours["loss"]

    one = _eval(capsys, hf_dir, *_hf_data_flags(root), "--batch-size", BATCH, "--batches", 1)
    tokenizer = load_pretrained(str(hf_dir)).tokenizer
    batch = build_data(DataConfig(max_bytes=400000, cache_dir=str(root / "cache")), 64, tokenizer).val[:BATCH].long()
    hf = DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(batch[:, :-1]).logits
    theirs = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item()
    assert abs(one["loss"] - theirs) < 1e-5


def test_chat_corpus_matches_transformers_per_conversation(tmp_path, capsys):
    # No tool schemas in the system turn: conversations of ~100-300 tokens, so rows pack several.
    tasks = make_tasks(40, 0, "single", declare_tools=False) + make_tasks(20, 0, "multi", declare_tools=False)
    tokenizer = train_bpe(iter([[render_text(t["trajectory"], t["tools"]) for t in tasks]]), 400)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tokenizer.vocab_size, init_std=0.1))  # logits of a few units
    export_hf(model, tmp_path / "hf", token_ids=config_token_ids(tokenizer))
    export_tokenizer(tokenizer, tmp_path / "hf")
    write_jsonl(tasks, tmp_path / "chat.jsonl")
    result = _eval(capsys, tmp_path / "hf", "--data", tmp_path / "chat.jsonl", "--data.format", "chat",
                   "--data.val_fraction", "0.2", "--seq-len", "512", "--batch-size", "2")

    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    nats, count = 0.0, 0
    for i in split_indices(len(tasks), 0.2)[1].tolist():
        ids, mask = render_conversation(tokenizer, tasks[i]["trajectory"], tasks[i]["tools"])
        assert len(ids) <= 513  # nothing cut: the packed rows hold these conversations whole
        ids_1T, keep_T = torch.tensor([ids]), torch.tensor(mask[1:], dtype=torch.bool)
        with torch.no_grad():
            logits_TV = hf(ids_1T[:, :-1]).logits[0]
        nats += F.cross_entropy(logits_TV[keep_T], ids_1T[0, 1:][keep_T], reduction="sum").item()
        count += int(keep_T.sum())
    assert (result["format"], result["tokens"]) == ("chat", count)
    assert abs(result["loss"] - nats / count) < 1e-5


def _error(*argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    return str(exit_info.value.code)


def test_errors_name_what_to_fix(trained, tmp_path):
    root, run_dir, hf_dir = trained
    assert "holds no run of ours" in _error(tmp_path)
    assert "is not a directory" in _error(tmp_path / "nothing")
    assert "nope.txt" in _error(run_dir, "--data", tmp_path / "nope.txt")
    bare = tmp_path / "bare"
    shutil.copytree(hf_dir, bare)
    (bare / "tokenizer.json").unlink()
    assert "kept no tokenizer.json" in _error(bare, *_hf_data_flags(root))
    message = _error(run_dir, "--seq-len", 5000)
    assert "5000" in message and "max_seq_len = 4096" in message
    assert "--data.vocab_size" in _error(run_dir, "--data.vocab_size", 512)
    assert "--model.num_layers" in _error(run_dir, "--model.num_layers", 2)
    assert "--batches = 0" in _error(run_dir, "--batches", 0)
    assert "--split" in _error(run_dir, "--split", "test")


def test_out_refuses_an_existing_file_without_force(trained, tmp_path, capsys):
    _, run_dir, _ = trained
    out = tmp_path / "eval.json"
    out.write_text("an earlier result")
    assert "already exists" in _error(run_dir, "--batches", 1, "--out", out)
    assert out.read_text() == "an earlier result"
    result = _eval(capsys, run_dir, "--batches", 1, "--out", out, "--force")
    assert json.loads(out.read_text()) == result
