"""Conversations in the OpenAI messages layout, checked at the edge: `load_conversations(path)` reads JSONL.

One record per line: {"messages": [...], "tools": [...]}, "tools" optional. A message is
    {"role": "system" | "user", "content": str}
    {"role": "assistant", "content": str | None, "tool_calls": [{"id"?, "type"?: "function",
                                                   "function": {"name": str, "arguments": JSON object as str or dict}}]}
    {"role": "tool", "content": str, "tool_call_id"?: str, "name"?: str}
and a tool is {"type": "function", "function": {"name": str, ...JSON schema...}}.

Strict about keys: a key we do not render (a user "name", "reasoning_content", a misspelt "tool_call")
would be dropped without a word and the model trained on less than the file says, so it is an error
that lists the keys that are valid. A tool message must answer the assistant turn before it: it
follows that turn or another tool message, and a `tool_call_id` must name one of that turn's calls.
One without id or name is allowed: it is how posttrain/executor.py answers output it could not parse.
"""

from __future__ import annotations

import json

ROLES = ("system", "user", "assistant", "tool")
RECORD_KEYS = ("messages", "tools")
MESSAGE_KEYS = {
    "system": ("role", "content"),
    "user": ("role", "content"),
    "assistant": ("role", "content", "tool_calls"),
    "tool": ("role", "content", "tool_call_id", "name"),
}
MAX_REPORTED = 20  # a wholly broken file names its first problems, not ten thousand


class ConversationError(ValueError):
    """Malformed conversations; the message names file, line and field of each problem."""


def _show(value, limit=60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unknown_keys(obj: dict, valid, where: str, what: str) -> list[str]:
    return [f"{where} has key {_show(k)}, which {what} does not take; valid: {', '.join(valid)}"
            for k in obj if k not in valid]


def _json_error(e: Exception) -> str:
    # The column alone: json's own "line 1 column 9" would read as a line of the file.
    return f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e) or type(e).__name__


def parse_arguments(arguments) -> tuple[dict | None, str | None]:
    """(the arguments as a dict, None) or (None, why not): a JSON object given as text or already parsed."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError) as e:  # RecursionError: thousands of nested brackets
            return None, f"not valid JSON ({_json_error(e)})"
    if not isinstance(arguments, dict):
        return None, f"not a JSON object but {type(arguments).__name__}"
    return arguments, None


def _check_call(call, where: str) -> list[str]:
    if not isinstance(call, dict):
        return [f"{where} = {_show(call)}; a tool call is an object {{\"function\": {{\"name\", \"arguments\"}}}}"]
    errors = _unknown_keys(call, ("id", "type", "function"), where, "a tool call")
    if call.get("type", "function") != "function":
        errors.append(f"{where}.type = {_show(call['type'])}; valid: 'function'")
    if "id" in call and not isinstance(call["id"], str):
        errors.append(f"{where}.id = {_show(call['id'])}; it must be a string")
    function = call.get("function")
    if not isinstance(function, dict):
        return errors + [f"{where}.function = {_show(function)}; it must be an object with name and arguments"]
    errors += _unknown_keys(function, ("name", "arguments"), f"{where}.function", "a function call")
    if not isinstance(function.get("name"), str) or not function["name"]:
        errors.append(f"{where}.function.name = {_show(function.get('name'))}; it must be a non-empty string")
    _, why = parse_arguments(function.get("arguments"))
    if why:
        errors.append(f"{where}.function.arguments = {_show(function.get('arguments'))}; {why}")
    return errors


def _check_tool_result(message: dict, where: str, turn: dict | None, turn_index: int) -> list[str]:
    if turn is None:
        return [f"{where} is a tool result with no assistant turn before it to answer"]
    calls = {c.get("id"): c for c in turn.get("tool_calls") or [] if isinstance(c, dict) and "id" in c}
    errors = []
    if "tool_call_id" in message:
        call_id = message["tool_call_id"]
        if call_id not in calls:
            valid = ", ".join(map(_show, calls)) or f"none, messages[{turn_index}] has no call ids"
            return [f"{where}.tool_call_id = {_show(call_id)} answers no call of messages[{turn_index}]; valid: {valid}"]
        called = (calls[call_id].get("function") or {}).get("name")
        if message.get("name", called) != called:
            errors.append(f"{where}.name = {_show(message['name'])}, but call {_show(call_id)} is to {_show(called)}")
    if "name" in message and not isinstance(message["name"], str):
        errors.append(f"{where}.name = {_show(message['name'])}; it must be a string")
    return errors


def _check_message(message, where: str) -> list[str]:
    if not isinstance(message, dict):
        return [f"{where} = {_show(message)}; a message is an object with role and content"]
    role = message.get("role")
    if role not in ROLES:
        return [f"{where}.role = {_show(role)}; valid: {', '.join(ROLES)}"]
    errors = _unknown_keys(message, MESSAGE_KEYS[role], where, f"a {role} message")
    content = message.get("content")
    if role == "assistant":
        calls = message.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            errors.append(f"{where}.tool_calls = {_show(calls)}; it must be a list")
            calls = None
        if content is not None and not isinstance(content, str):
            errors.append(f"{where}.content = {_show(content)}; it must be a string or null")
        elif content is None and not calls:
            errors.append(f"{where} has neither content nor tool_calls")
        ids = []
        for j, call in enumerate(calls or []):
            errors += _check_call(call, f"{where}.tool_calls[{j}]")
            if isinstance(call, dict) and isinstance(call.get("id"), str):
                if call["id"] in ids:
                    errors.append(f"{where}.tool_calls[{j}].id = {_show(call['id'])} repeats an earlier call's id")
                ids.append(call["id"])
    elif not isinstance(content, str):
        errors.append(f"{where}.content = {_show(content)}; a {role} message's content must be a string")
    return errors


def _check_tools(tools) -> list[str]:
    if not isinstance(tools, list):
        return [f"tools = {_show(tools)}; it must be a list of {{\"type\": \"function\", \"function\": {{...}}}}"]
    errors = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            errors.append(f"{where} = {_show(tool)}; a tool is an object {{\"type\": \"function\", \"function\": {{...}}}}")
            continue
        errors += _unknown_keys(tool, ("type", "function"), where, "a tool")
        if tool.get("type") != "function":
            errors.append(f"{where}.type = {_show(tool.get('type'))}; valid: 'function'")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            errors.append(f"{where}.function.name is missing; a tool's function needs a non-empty name")
    return errors


def check_conversation(messages, tools=None) -> list[str]:
    """Every problem of one conversation, each naming its field (`messages[2].role = 'robot'; valid: ...`)."""
    if not isinstance(messages, list) or not messages:
        return [f"messages = {_show(messages)}; it must be a non-empty list of messages"]
    errors = _check_tools(tools) if tools is not None else []
    turn, turn_index = None, -1  # the assistant turn that tool messages answer
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        problems = _check_message(message, where)
        errors += problems
        role = message.get("role") if isinstance(message, dict) else None
        if role == "tool" and not problems:
            errors += _check_tool_result(message, where, turn, turn_index)
        elif role == "assistant":
            turn, turn_index = message, i
        elif role != "tool":
            turn = None
    return errors


def check_record(record) -> list[str]:
    """Every problem of one JSONL record {"messages": [...], "tools": [...]}."""
    if not isinstance(record, dict):
        return [f"the record is {type(record).__name__}, not an object {{\"messages\": [...], \"tools\": [...]}}"]
    errors = _unknown_keys(record, RECORD_KEYS, "the record", "a conversation")
    if "messages" not in record:
        return errors + ["messages is missing"]
    return errors + check_conversation(record["messages"], record.get("tools"))


def load_conversations(path: str) -> list[dict]:
    """The records of a JSONL file of conversations, all of them checked; blank lines are skipped.

    Raises ConversationError listing each problem as `<path> line <n>: <field> ...` (the first
    MAX_REPORTED of them, and how many more), so one pass over the file finds them all.
    """
    records, errors = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))  # so an error's column is on this line
            except (ValueError, RecursionError) as e:
                errors.append(f"{path} line {n}: not valid JSON ({_json_error(e)})")
                continue
            errors += [f"{path} line {n}: {problem}" for problem in check_record(record)]
            records.append(record)
    if errors:
        more = f"\n... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
        raise ConversationError(f"{len(errors)} problem(s) in {path}:\n" + "\n".join(errors[:MAX_REPORTED]) + more)
    if not records:
        raise ConversationError(f"{path} holds no conversations")
    return records
