"""Generate from a trained model: a raw text, a file of prompts, or a chat that may call our tools.

    python -m posttrain.generate runs/my-run --prompt "The answer is" --max-new-tokens 32
    python -m posttrain.generate hf/my-model --prompts prompts.txt --json > completions.jsonl
    python -m posttrain.generate hf/my-model --prompts conversations.jsonl --batch-size 32
    python -m posttrain.generate hf/my-model --chat --tools --temperature 0.7 --seed 0
    kimi-generate hf/my-model --chat                   # the same, as the installed console script

SOURCE is what launch.checkpoint.pretrained.load_pretrained takes: a run directory (its newest good checkpoint),
one of its checkpoints, or a Hugging Face directory; the tokenizer is the one kept beside it.
Exactly one mode:
  --prompt TEXT    a raw continuation of TEXT (no chat format), ending at <|eod|> or max_new_tokens.
  --prompts FILE   a .jsonl of {"prompt": TEXT} (raw) or {"messages": [...], "tools": [...]} records
                   (rendered in the chat format with the assistant header, ending at <|im_end|>);
                   any other file holds one raw prompt per non-blank line. --batch-size prompts per
                   generate call.
  --chat           read user lines from stdin, keep the conversation, print each reply; `/exit` or
                   EOF ends. With --tools the model sees posttrain/tools.py's tools, and each call is
                   run through the executor's logic (posttrain/executor.py), its result fed back and
                   printed, until the model answers or --max-turns turns have passed.
Plain output prints each completion (special tokens spelt out, the stop token left out), a line
"---" between two. --json writes one object per prompt: prompt (or messages and tools), completion,
tokens (the stop token included), logprobs (under the distribution sampled; 0.0 when greedy),
model_logprobs (under the model itself), finish_reason ("stop" | "length") and, for chat records,
the parsed message. A chat prints "assistant: ...", "call NAME: ARGUMENTS" and "tool NAME: RESULT"
lines on stdout, notes on stderr. Runs offline, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launch.checkpoint.store import CheckpointError
from launch.checkpoint.pretrained import load_pretrained
from moe.config import ConfigError
from moe.generate import generate
from posttrain.chat import as_message, parse_assistant, render_generation_prompt
from posttrain.conversations import ConversationError
from posttrain.executor import ContextFull, check_max_turns, new_episode, take_turn
from posttrain.policy import ModelPolicy, chat_stops, generate_batched
from posttrain.tools import SCHEMAS

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m posttrain.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", metavar="SOURCE",
                        help="a run directory, one of its checkpoints, or a Hugging Face directory")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", metavar="TEXT", help="continue TEXT (raw, no chat format)")
    mode.add_argument("--prompts", metavar="FILE",
                      help=".jsonl of {prompt} or {messages, tools} records; any other file: one prompt a line")
    mode.add_argument("--chat", action="store_true", help="an interactive chat on stdin")
    parser.add_argument("--tools", action="store_true",
                        help="with --chat: offer posttrain/tools.py's tools and run the calls")
    parser.add_argument("--no-tool-schemas", action="store_true",
                        help="with --tools: leave the schemas out of the prompt (models fine-tuned without them)")
    parser.add_argument("--max-turns", type=int, default=4, help="with --chat --tools: assistant turns per user line")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, help="fixes the draws when sampling")
    parser.add_argument("--batch-size", type=int, default=32, help="with --prompts: prompts per generate call")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt instead of plain text")
    return parser


class _Text:
    """Ids to text with the special tokens spelt out (the tokenizer's own decode drops them)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer.to_tokenizers()

    def __call__(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def _read_prompts(path: str, tokenizer) -> list[dict]:
    """[{"ids", "stops", "record"}] from --prompts FILE; exits naming the file and line of a bad record."""
    file = Path(path)
    if not file.is_file():
        sys.exit(f"generate: --prompts {path!r} is not a file")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        sys.exit(f"generate: --prompts {path!r} is not UTF-8 text (byte {err.start}); save it as UTF-8")
    eod, prompts = (tokenizer.eod_id,), []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if file.suffix != ".jsonl":
            prompts.append({"ids": tokenizer.encode(line), "stops": eod, "record": {"prompt": line}})
            continue
        where = f"{path} line {n}"
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as err:
            sys.exit(f"generate: {where} is not valid JSON ({err})")
        if isinstance(record, dict) and set(record) == {"prompt"} and isinstance(record["prompt"], str):
            prompts.append({"ids": tokenizer.encode(record["prompt"]), "stops": eod, "record": record})
        elif isinstance(record, dict) and "messages" in record and set(record) <= {"messages", "tools"}:
            policy_stops = _chat_stops(tokenizer, f"{where} (a chat record)")
            try:
                ids = render_generation_prompt(tokenizer, record["messages"], record.get("tools"))
            except ConversationError as err:
                sys.exit(f"generate: {where}: {err}")
            prompts.append({"ids": ids, "stops": policy_stops, "record": record})
        else:
            sys.exit(f'generate: {where} must be {{"prompt": TEXT}} or {{"messages": [...], "tools": [...]}}; '
                     f"got {line[:80]!r}")
    if not prompts:
        sys.exit(f"generate: --prompts {path!r} holds no prompts")
    return prompts


def _chat_stops(tokenizer, what: str) -> tuple[int, int]:
    try:
        return chat_stops(tokenizer)
    except ValueError as err:
        sys.exit(f"generate: {what} needs a tokenizer with the chat tokens, but {err}")


def _complete(model, prompts: list[dict], args) -> list[dict]:
    """Generate for every prompt, one generate_batched per stop set (raw and chat records stop apart)."""
    for i, prompt in enumerate(prompts):
        if not prompt["ids"]:
            sys.exit(f"generate: prompt {i + 1} encodes to no tokens; give it some text")
    results = [None] * len(prompts)
    for stops in dict.fromkeys(p["stops"] for p in prompts):
        group = [i for i, p in enumerate(prompts) if p["stops"] == stops]
        out = generate_batched(model, [prompts[i]["ids"] for i in group], args.max_new_tokens, args.batch_size,
                               stops, args.temperature, args.top_k, args.top_p, args.seed)
        for j, i in enumerate(group):
            results[i] = {"tokens": out.tokens[j], "logprobs": out.logprobs[j],
                          "model_logprobs": out.model_logprobs[j], "finish_reason": out.finish_reasons[j]}
    return results


def _write_completions(prompts, results, tokenizer, as_json: bool, out) -> None:
    text = _Text(tokenizer)
    for i, (prompt, result) in enumerate(zip(prompts, results)):
        tokens = result["tokens"]
        shown = tokens[:-1] if result["finish_reason"] == "stop" else tokens
        if as_json:
            record = {**prompt["record"], "completion": text(shown), **result}
            if "messages" in record:
                record["message"] = as_message(parse_assistant(tokens, tokenizer))
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            out.write(("---\n" if i else "") + text(shown) + "\n")


def _show(message: dict, out) -> None:
    """One message of the chat as the user reads it."""
    if message["role"] == "tool":
        out.write(f"tool {message.get('name') or '(error)'}: {message['content']}\n")
        return
    if message.get("content") or not message.get("tool_calls"):
        out.write(f"assistant: {message.get('content') or ''}\n")
    for call in message.get("tool_calls") or []:
        out.write(f"call {call['function']['name']}: {call['function']['arguments']}\n")


def _chat(model, tokenizer, args, stdin, out) -> None:
    _chat_stops(tokenizer, "--chat")
    policy = ModelPolicy(model, tokenizer, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    # A model fine-tuned without the tools turn (the demo's, posttrain/tasks.py's declare_tools)
    # never saw the schemas: --no-tool-schemas runs the tools without showing it them.
    tools = SCHEMAS if args.tools and not args.no_tool_schemas else None
    messages = []
    if stdin.isatty():
        print(f"chatting with {args.source}; /exit or Ctrl-D ends", file=sys.stderr)
    while True:
        if stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\r\n")})
        try:
            if args.tools:
                messages = _tool_turns(policy, messages, tools, args.max_turns, out)
            else:
                reply = policy(messages, None)
                # No tools to run: the reply is kept as written; what could not be parsed is noted.
                for error in reply.pop("parse_errors", []):
                    print(f"(parse error: {error})", file=sys.stderr)
                if reply["content"] is None and "tool_calls" not in reply:
                    reply["content"] = ""
                _show(reply, out)
                messages.append(reply)
        except ContextFull as err:
            sys.exit(f"generate: {err}; start a new chat (or use a model with a longer max_seq_len)")
        out.flush()


def _tool_turns(policy, messages, tools, max_turns, out) -> list[dict]:
    """The assistant's turns after a user line, each call run and answered as executor.run_episode does."""
    episode = new_episode({"messages": messages})
    while episode["stopped"] is None:
        seen = len(episode["messages"])
        take_turn(episode, policy(episode["messages"], tools), max_turns)
        for message in episode["messages"][seen:]:
            _show(message, out)
    if episode["stopped"] == "max_turns":
        print(f"(no answer after {max_turns} turns; --max-turns gives more)", file=sys.stderr)
    return episode["messages"]


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.tools and not args.chat:
        sys.exit("generate: --tools works with --chat only (the tools are run in the chat's tool loop)")
    if args.no_tool_schemas and not args.tools:
        sys.exit("generate: --no-tool-schemas works with --tools only")
    if args.json and args.chat:
        sys.exit("generate: --json works with --prompt and --prompts; a chat prints its turns as text")
    try:
        check_max_turns(args.max_turns)
        model, tokenizer, where = load_pretrained(args.source)
    except (ValueError, ConfigError, CheckpointError) as err:
        sys.exit(f"generate: {err}")
    if tokenizer is None:
        sys.exit(f"generate: {where} has no tokenizer.json, so text cannot be turned into token ids. Export the "
                 "model from a run that kept its tokenizer (python -m launch.export RUN/checkpoints --hf-dir DIR "
                 "writes it beside the weights), or copy the run's tokenizer.json into the directory")
    try:
        # moe.generate validates the sampling settings: one token from a one-token prompt asks it
        # before a chat starts or a file is read, so a bad value fails first, not after the work.
        generate(model, [[tokenizer.eod_id]], 1, args.temperature, args.top_k, args.top_p)
        if args.chat:
            try:
                _chat(model, tokenizer, args, sys.stdin, sys.stdout)
            except KeyboardInterrupt:  # Ctrl-C ends a chat as /exit does
                print(file=sys.stderr)
            return
        if args.prompts:
            prompts = _read_prompts(args.prompts, tokenizer)
        else:
            prompts = [{"ids": tokenizer.encode(args.prompt), "stops": (tokenizer.eod_id,),
                        "record": {"prompt": args.prompt}}]
        results = _complete(model, prompts, args)
    except ValueError as err:  # moe.generate's and ModelPolicy's checks of the request: they name the value
        message = str(err)
        sys.exit(message if message.startswith("generate: ") else f"generate: {message}")
    _write_completions(prompts, results, tokenizer, args.json, sys.stdout)


if __name__ == "__main__":
    main()
