"""The chat format: conversations to token ids with a loss mask, and the model's turn back to calls.

One turn per message, each opened by its role's token and closed by <|im_end|>; <|im_middle|> ends
a header (after Kimi K2's format, with the role names dropped: the role token already says it):

    <|im_system|>tools<|im_middle|>[{"type": "function", ...}, ...]<|im_end|>     only when tools are given
    <|im_system|>You are terse.<|im_end|>
    <|im_user|>What is 2 + 3?<|im_end|>
    <|im_assistant|>Let me check.<|tool_call_begin|>calculator<|im_middle|>{"expression": "2 + 3"}<|tool_call_end|><|im_end|>
    <|im_tool|>calculator<|im_middle|>{"result": 5}<|im_end|>
    <|im_assistant|>The answer is 5.<|im_end|>

The loss mask is 1 on what the model writes in an assistant turn: its text, its calls and the
<|im_end|> that ends the turn (so it learns to stop); 0 on the <|im_assistant|> header (the prompt
supplies it, `render_generation_prompt` ends with it) and on every other turn.

Text is encoded as text (`tokenizer.encode` never yields a special id), so no message, tool name,
argument or schema can forge a delimiter; a special token spelt inside text is encoded on its own,
as text. posttrain/hf_tokenizer.py's Jinja template renders the
same string, and transformers' `apply_chat_template(..., sanitize_control_tokens=True)` then gives
the same ids; without that flag transformers reads a "<|im_end|>" typed by a user as the token.

Arguments given as a JSON string are written as they are, a dict as json.dumps(ensure_ascii=False):
what the template's `tojson` writes. A tool result names the tool: its `name`, else that of the
call its `tool_call_id` answers, else nothing (an error reply to unparseable output).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import NamedTuple

from launch.data.tokenizer import CHAT_TOKENS, SPECIALS
from posttrain.conversations import ConversationError, check_conversation, parse_arguments

SYSTEM, USER, ASSISTANT, TOOL, MIDDLE, END, CALL_BEGIN, CALL_END = CHAT_TOKENS
_OPEN = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "tool": TOOL}
# Any special token's spelling, longest first (as transformers matches them).
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in sorted(SPECIALS, key=len, reverse=True)) + ")")


class Rendered(NamedTuple):
    ids: list[int]
    mask: list[int]  # 1 where the loss is taken: the tokens an assistant turn writes


def chat_ids(tokenizer) -> dict[str, int]:
    """Special token -> id, or ValueError if `tokenizer` predates the chat tokens."""
    missing = [t for t in CHAT_TOKENS if t not in tokenizer.special_ids]
    if missing:
        raise ValueError(
            f"tokenizer {tokenizer.fingerprint} has no chat tokens ({', '.join(missing)}): the bytes tokenizer and "
            "BPEs trained before them have none; train a BPE (data.tokenizer = 'bpe') to use the chat format"
        )
    return {t: tokenizer.special_ids[t] for t in CHAT_TOKENS}


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _result_name(messages: list[dict], i: int) -> str:
    message = messages[i]
    if message.get("name"):
        return message["name"]
    found = ""
    for previous in messages[:i]:  # the last call with that id, as the template's loop finds it
        for call in previous.get("tool_calls") or []:
            if call.get("id") is not None and call.get("id") == message.get("tool_call_id"):
                found = call["function"]["name"]
    return found


def pieces(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False, start: int = 0):
    """The conversation as (string, is_special, trained) pieces, in order; raises ConversationError.

    With start > 0, only the pieces of messages[start:] (and the generation prompt): what follows
    the first `start` messages in the whole conversation's rendering, the tools turn included in those."""
    errors = check_conversation(messages, tools)
    if errors:
        raise ConversationError("; ".join(errors))
    out = []

    def special(token, trained=False):
        out.append((token, True, trained))

    def text(value, trained=False):  # never a delimiter, whatever it spells
        if value:
            out.append((value, False, trained))

    def header(name):  # a header's text, then the token that ends it
        text(name)
        special(MIDDLE)

    if tools and start == 0:
        special(SYSTEM)
        header("tools")
        text(_text(tools))
        special(END)
    for i, m in enumerate(messages):
        if i < start:
            continue
        special(_OPEN[m["role"]])
        if m["role"] == "assistant":
            text(m.get("content") or "", True)
            for call in m.get("tool_calls") or []:
                special(CALL_BEGIN, True)
                text(call["function"]["name"], True)
                special(MIDDLE, True)
                text(_text(call["function"]["arguments"]), True)
                special(CALL_END, True)
            special(END, True)
            continue
        if m["role"] == "tool":
            header(_result_name(messages, i))
        text(m["content"])
        special(END)
    if add_generation_prompt:
        special(ASSISTANT)
    return out


def render_text(messages, tools=None, add_generation_prompt: bool = False) -> str:
    """The rendered conversation as one string: what the exported chat template renders."""
    return "".join(text for text, _, _ in pieces(messages, tools, add_generation_prompt))


def _encode(tokenizer, parts) -> Rendered:
    special = chat_ids(tokenizer)
    ids, mask = [], []
    for text, is_special, trained in parts:
        if is_special:
            new = [special[text]]
        else:
            # Every text lies between two delimiters, so encoding it alone is what transformers does
            # to the joined string. A special token spelt inside it is encoded apart from the text
            # around it, as sanitize_control_tokens does, so the two agree on any text.
            new = [i for part in _SPECIAL_RE.split(text) if part for i in tokenizer.encode(part)]
        ids += new
        mask += [int(trained)] * len(new)
    return Rendered(ids, mask)


def render_conversation(tokenizer, messages, tools=None) -> Rendered:
    """Token ids of a whole conversation and its loss mask (module docstring); for SFT."""
    return _encode(tokenizer, pieces(messages, tools))


def render_generation_prompt(tokenizer, messages, tools=None) -> list[int]:
    """Token ids of the conversation so far followed by <|im_assistant|>: the model writes the next turn."""
    return _encode(tokenizer, pieces(messages, tools, add_generation_prompt=True)).ids


def continuation_ids(tokenizer, messages, start: int) -> list[int]:
    """Token ids of messages[start:] followed by <|im_assistant|>: what a multi-turn rollout appends
    after the model's own tokens for messages[:start] (its turn, as it wrote it), e.g. the results
    of the tools it called, so the model writes its next turn. The same ids the whole conversation's
    generation prompt ends with (text between delimiters is encoded on its own)."""
    if not isinstance(start, int) or not 0 < start <= len(messages):
        raise ValueError(f"continuation_ids: start = {start!r}; it must be in [1, {len(messages)}]")
    return _encode(tokenizer, pieces(messages, None, add_generation_prompt=True, start=start)).ids


# ---------------------------------------------------------------- parsing the model's turn


def _segments(output, tokenizer) -> tuple[list[tuple[bool, str]], list[str]]:
    """(is_special, string) runs of a model output, and the ids that could not be read."""
    if isinstance(output, str):
        parts = _SPECIAL_RE.split(output)  # text, token, text, ..., text
        return [(k % 2 == 1, part) for k, part in enumerate(parts) if part], []
    special = {i: t for t, i in tokenizer.special_ids.items()}
    segments, run, errors = [], [], []
    for pos, i in enumerate(output):
        i = int(i) if hasattr(i, "__index__") else i  # numpy / torch integers
        if not isinstance(i, int) or not 0 <= i < tokenizer.vocab_size:
            errors.append(f"token {pos} = {i!r} is not an id of this tokenizer (0..{tokenizer.vocab_size - 1})")
        elif i in special:
            if run:
                segments.append((False, tokenizer.decode(run)))
                run = []
            segments.append((True, special[i]))
        else:
            run.append(i)
    if run:
        segments.append((False, tokenizer.decode(run)))
    return segments, errors


def _cut(text: str, limit: int = 80) -> str:
    return repr(text) if len(text) <= limit else repr(text[: limit - 3] + "...")


def parse_assistant(output: str | Sequence[int], tokenizer=None) -> dict:
    """The assistant turn the model wrote, from what follows <|im_assistant|>: token ids (with the
    tokenizer) or text with the special tokens spelt out.

    Returns {"content": str, "tool_calls": [{"name": str, "arguments": dict}], "errors": [str]}.
    Never raises on model output: a call it cannot read (no name, arguments that are not a JSON
    object, no <|tool_call_end|>) is left out and described in `errors`, as is a missing <|im_end|>
    (a truncated output) or a delimiter that has no place in an assistant turn. Output after
    <|im_end|> is ignored. Ids are the exact reading; text is ambiguous where a message or an
    argument spells a special token.
    """
    segments, errors = _segments(output, tokenizer)
    content, calls = [], []
    state, name, arguments = "content", "", ""  # states: content, name, arguments, between (calls)
    ended, number = False, 0  # number: of the call being read, counting the unreadable ones

    def finish():
        if not name:
            errors.append(f"tool call {number} has no name")
            return
        parsed, why = parse_arguments(arguments)
        if why:
            errors.append(f"tool call {number} ({_cut(name)}): arguments {_cut(arguments)} are {why}")
        else:
            calls.append({"name": name, "arguments": parsed})

    for is_special, text in segments:
        if not is_special:
            if state == "content":
                content.append(text)
            elif state == "name":
                name += text
            elif state == "arguments":
                arguments += text
            elif text.strip():
                errors.append(f"text between tool calls is ignored: {_cut(text)}")
            continue
        if text == END:
            if state in ("name", "arguments"):
                errors.append(f"the turn ended inside a tool call ({_cut(name)}) before {CALL_END}")
            ended = True
            break
        if text == CALL_BEGIN and state in ("content", "between"):
            state, name, arguments, number = "name", "", "", number + 1
        elif text == MIDDLE and state == "name":
            state = "arguments"
        elif text == CALL_END and state == "arguments":
            finish()
            state = "between"
        else:
            errors.append(f"unexpected {text} in the assistant turn; the rest of the output is ignored")
            ended = True
            break
    if not ended:
        where = f" inside a tool call ({_cut(name)})" if state in ("name", "arguments") else ""
        errors.append(f"the output ends{where} without {END}: truncated?")
    return {"content": "".join(content), "tool_calls": calls, "errors": errors}


def as_message(parsed: dict) -> dict:
    """A parse_assistant result as the OpenAI assistant message posttrain/executor.py takes (ids are
    its to give). Re-rendered, dict arguments come out as json.dumps writes them, which may differ in
    spacing from what the model wrote: train on the generated ids, not on this."""
    message = {"role": "assistant", "content": parsed["content"] or None}
    if parsed["tool_calls"]:
        message["tool_calls"] = [{"type": "function", "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
                                 for c in parsed["tool_calls"]]
    if parsed["errors"]:
        message["parse_errors"] = list(parsed["errors"])
    return message
