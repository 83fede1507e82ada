"""The generate command (posttrain/generate.py) on a tiny random model, through `main(argv)`.

    python -m pytest -q tests/test_generate_cli.py

Sources: a Hugging Face directory with our BPE (chat tokens), the same without tokenizer files,
and a two-step launch.train run (bytes tokenizer: no chat tokens). What the command prints is
checked against moe.generate run on the same loaded model.
"""

import io
import json
import sys
from pathlib import Path

import pytest
import torch

import posttrain.policy as policy_module
from launch.config.training import parse_args
from launch.checkpoint.pretrained import load_pretrained
from launch.data.tokenizer import train_bpe
from launch.train import run
from moe.config import preset
from moe.generate import Generation, generate
from moe.hf import export_hf
from moe.model import Transformer
from posttrain.chat import as_message, chat_ids, parse_assistant, render_generation_prompt, render_text
from posttrain.generate import main
from posttrain.hf_tokenizer import config_token_ids, export_tokenizer
from posttrain.tasks import make_tasks
from posttrain.tools import SCHEMAS

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from harness import tiny_train_flags  # noqa: E402
from test_policy import one_thread  # noqa: E402, F401  (an autouse fixture: one intra-op thread here too)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    tasks = make_tasks(150, 0, "single") + make_tasks(150, 0, "multi")
    tok = train_bpe(iter([[render_text(t["trajectory"], t["tools"]) for t in tasks]]), 400)
    torch.manual_seed(0)
    # init_std 0.1: logits of a few units, so greedy output varies with the prompt.
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size, init_std=0.1))
    out = tmp_path_factory.mktemp("hf") / "model"
    export_hf(model, out, token_ids=config_token_ids(tok))
    export_tokenizer(tok, out)
    return out


@pytest.fixture(scope="module")
def loaded(hf_dir):
    return load_pretrained(str(hf_dir))


def _run(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    main([str(a) for a in argv])
    return capsys.readouterr()


def _fails(capsys, *argv) -> str:
    """The message the command exits with (sys.exit's text, or argparse's on stderr)."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    assert exit_.value.code not in (0, None)
    return exit_.value.code if isinstance(exit_.value.code, str) else capsys.readouterr().err


def _spelt(tok, ids):
    return tok.to_tokenizers().decode(ids, skip_special_tokens=False)


def test_prompt_plain_and_json(hf_dir, loaded, capsys):
    model, tok, _ = loaded
    text = "What is 2 + 3?"
    expected = generate(model, [tok.encode(text)], 12, stop_tokens=[tok.eod_id])
    assert expected.finish_reasons == ["length"]
    assert _run(capsys, hf_dir, "--prompt", text, "--max-new-tokens", 12).out == _spelt(tok, expected.tokens[0]) + "\n"
    [line] = _run(capsys, hf_dir, "--prompt", text, "--max-new-tokens", 12, "--json").out.splitlines()
    record = json.loads(line)
    assert record == {"prompt": text, "completion": _spelt(tok, expected.tokens[0]), "tokens": expected.tokens[0],
                      "logprobs": [0.0] * 12, "model_logprobs": pytest.approx(expected.model_logprobs[0], abs=1e-5),
                      "finish_reason": "length"}


def test_prompts_from_txt_and_jsonl_in_batches(hf_dir, loaded, capsys, tmp_path):
    model, tok, _ = loaded
    lines = ["The answer is", "Convert 12 km to m.", "x"]
    txt = tmp_path / "prompts.txt"
    txt.write_text(f"{lines[0]}\n\n{lines[1]}\n{lines[2]}\n")  # the blank line is no prompt
    records = [json.loads(line) for line in _run(capsys, hf_dir, "--prompts", txt, "--batch-size", 2,
                                                 "--max-new-tokens", 6, "--json").out.splitlines()]
    assert [r["prompt"] for r in records] == lines
    for record, line in zip(records, lines):
        assert record["tokens"] == generate(model, [tok.encode(line)], 6, stop_tokens=[tok.eod_id]).tokens[0]
    plain = _run(capsys, hf_dir, "--prompts", txt, "--max-new-tokens", 6).out
    assert plain == "---\n".join(r["completion"] + "\n" for r in records)

    task = make_tasks(1, 0)[0]
    chat = {"messages": task["messages"], "tools": task["tools"]}
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [{"prompt": lines[0]}, chat, {"messages": task["messages"]}]))
    raw, with_tools, without = [json.loads(line) for line in _run(
        capsys, hf_dir, "--prompts", jsonl, "--batch-size", 1, "--max-new-tokens", 6, "--json").out.splitlines()]
    assert raw["tokens"] == records[0]["tokens"] and "message" not in raw
    stops = [chat_ids(tok)["<|im_end|>"], tok.eod_id]
    for record, tools in ((with_tools, task["tools"]), (without, None)):
        ids = generate(model, [render_generation_prompt(tok, task["messages"], tools)], 6, stop_tokens=stops).tokens[0]
        assert record["tokens"] == ids and record["messages"] == task["messages"]
        assert record["message"] == as_message(parse_assistant(ids, tok))
    assert with_tools["tools"] == task["tools"] and with_tools["tokens"] != without["tokens"]


def test_chat_keeps_the_conversation_until_exit(hf_dir, loaded, capsys, monkeypatch):
    model, tok, _ = loaded
    out = _run(capsys, hf_dir, "--chat", "--max-new-tokens", 8,
               stdin="What is 2 + 3?\n\nAnd 4 + 4?\n/exit\nnever read\n", monkeypatch=monkeypatch).out
    stops = [chat_ids(tok)["<|im_end|>"], tok.eod_id]

    def reply(messages):
        ids = generate(model, [render_generation_prompt(tok, messages)], 8, stop_tokens=stops).tokens[0]
        return {"role": "assistant", "content": as_message(parse_assistant(ids, tok))["content"] or ""}

    # The second reply continues the whole conversation, the first reply included.
    first = reply([{"role": "user", "content": "What is 2 + 3?"}])
    second = reply([{"role": "user", "content": "What is 2 + 3?"}, first, {"role": "user", "content": "And 4 + 4?"}])
    # Two replies: the blank line is skipped. (A random model's reply may hold newlines of its own.)
    assert out == f"assistant: {first['content']}\nassistant: {second['content']}\n"
    assert reply([{"role": "user", "content": "And 4 + 4?"}]) != second  # the test can tell


def test_chat_with_tools_runs_the_calls_and_feeds_the_results_back(hf_dir, loaded, capsys, monkeypatch):
    _, tok, _ = loaded
    ids = chat_ids(tok)
    call = ([ids["<|tool_call_begin|>"]] + tok.encode("calculator") + [ids["<|im_middle|>"]]
            + tok.encode('{"expression": "2 + 3"}') + [ids["<|tool_call_end|>"], ids["<|im_end|>"]])
    answer = tok.encode("The answer is 5.") + [ids["<|im_end|>"]]
    seen = []

    def scripted(model, prompts, max_new_tokens, *args):  # the model: call the calculator, then answer
        [prompt] = prompts
        seen.append(prompt)
        out = call if prompt.count(ids["<|im_tool|>"]) == 0 else answer
        return Generation([out], [[0.0] * len(out)], [[0.0] * len(out)], ["stop"])

    monkeypatch.setattr(policy_module, "generate", scripted)
    out = _run(capsys, hf_dir, "--chat", "--tools", stdin="What is 2 + 3?\n", monkeypatch=monkeypatch).out
    assert out.splitlines() == ['call calculator: {"expression": "2 + 3"}', 'tool calculator: {"result": 5}',
                                "assistant: The answer is 5."]
    assert seen[0] == render_generation_prompt(tok, [{"role": "user", "content": "What is 2 + 3?"}], SCHEMAS)
    # --no-tool-schemas: the same loop, with no tools turn in the prompt (models fine-tuned without one).
    seen.clear()
    out = _run(capsys, hf_dir, "--chat", "--tools", "--no-tool-schemas", stdin="What is 2 + 3?\n", monkeypatch=monkeypatch).out
    assert out.splitlines()[-1] == "assistant: The answer is 5."
    assert seen[0] == render_generation_prompt(tok, [{"role": "user", "content": "What is 2 + 3?"}], None)


def test_chat_with_tools_stops_after_max_turns_on_garbage(hf_dir, capsys, monkeypatch):
    result = _run(capsys, hf_dir, "--chat", "--tools", "--max-turns", 2, "--max-new-tokens", 6,
                  stdin="What is 2 + 3?\n", monkeypatch=monkeypatch)
    # The messages' first lines (a random model's reply may hold newlines of its own).
    lines = [line for line in result.out.splitlines() if line.startswith(("assistant: ", "tool "))]
    # A random model writes no <|im_end|> in 6 tokens: two turns, each answered with a parse error.
    assert [line.split(":")[0] for line in lines] == ["assistant", "tool (error)"] * 2
    assert "truncated?" in lines[1] and "(no answer after 2 turns" in result.err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    run(parse_args([*tiny_train_flags(tmp, tmp / "run"), "--steps", "2", "--eval-batches", "1",
                    "--data.max_bytes", "100000"]))
    return tmp / "run"


def test_a_run_directory_is_a_source_and_its_bytes_tokenizer_cannot_chat(run_dir, capsys):
    model, tok, source = load_pretrained(str(run_dir))
    assert source.endswith("step_00000002") and tok.vocab_size == 257
    expected = generate(model, [list(b"def ")], 5, stop_tokens=[tok.eod_id])
    assert _run(capsys, run_dir, "--prompt", "def ", "--max-new-tokens", 5).out == _spelt(tok, expected.tokens[0]) + "\n"
    assert "--chat needs a tokenizer with the chat tokens, but tokenizer bpe-" in _fails(capsys, run_dir, "--chat")


def test_errors_name_the_problem(hf_dir, capsys, tmp_path):
    assert "is not a directory" in _fails(capsys, tmp_path / "missing", "--prompt", "x")
    assert "holds no run of ours" in _fails(capsys, tmp_path, "--prompt", "x")
    bare = tmp_path / "bare"  # a model exported without its tokenizer
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((hf_dir / name).read_bytes())
    assert "has no tokenizer.json, so text cannot be turned into token ids" in _fails(capsys, bare, "--prompt", "x")
    assert "argument --chat: not allowed with argument --prompt" in _fails(capsys, hf_dir, "--prompt", "x", "--chat")
    assert "one of the arguments --prompt --prompts --chat is required" in _fails(capsys, hf_dir)
    assert "--tools works with --chat only" in _fails(capsys, hf_dir, "--prompt", "x", "--tools")
    assert "--no-tool-schemas works with --tools only" in _fails(capsys, hf_dir, "--chat", "--no-tool-schemas")
    assert "--json works with --prompt and --prompts" in _fails(capsys, hf_dir, "--chat", "--json")
    assert _fails(capsys, hf_dir, "--prompt", "x", "--temperature", -1) == "generate: temperature = -1.0 must be >= 0 (0: greedy)"
    assert "top_p = 1.5 must be in (0, 1]" in _fails(capsys, hf_dir, "--chat", "--top-p", 1.5)
    assert "exceeds ModelConfig.max_seq_len = 4096" in _fails(capsys, hf_dir, "--prompt", "x", "--max-new-tokens", 4096)
    assert "max_new_tokens = 4096; it must be an int in [1, 4096)" in _fails(capsys, hf_dir, "--chat", "--max-new-tokens", 4096)
    assert "max_turns = 0" in _fails(capsys, hf_dir, "--chat", "--tools", "--max-turns", 0)
    assert "prompt 1 encodes to no tokens" in _fails(capsys, hf_dir, "--prompt", "")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": 5}\n')
    assert f'{prompts} line 2 must be {{"prompt": TEXT}} or' in _fails(capsys, hf_dir, "--prompts", prompts)
    prompts.write_text('{"prompt": "a"}\n{"messages": [{"role": "robot", "content": "x"}]}\n')
    assert f"{prompts} line 2: messages[0].role = 'robot'" in _fails(capsys, hf_dir, "--prompts", prompts)
    prompts.write_text('{"prompt": "a"}\n')
    assert "batch_size = 0; it must be a positive integer" in _fails(capsys, hf_dir, "--prompts", prompts, "--batch-size", 0)
    assert "is not a file" in _fails(capsys, hf_dir, "--prompts", tmp_path / "none.txt")
