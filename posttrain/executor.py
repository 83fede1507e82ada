"""A live tool loop: ask the policy, run the tools it calls, feed the results back, until it answers.

A policy is any callable `policy(messages, tools) -> assistant message` in OpenAI layout:
{"role": "assistant", "content": str | None, "tool_calls": [{"id", "type": "function",
"function": {"name", "arguments": JSON string}}]}; the caller adapts a model and its chat parser to it.
A parser that found a call it could not read may add "parse_errors": [str, ...] to the message.

Model output is untrusted. Each malformed call (bad JSON, unknown tool, arguments of the wrong type,
missing or extra, not an object) gets a tool message {"error": ...} answering its id, and counts as an
invalid call. Each parse error counts as an invalid call too and gets an {"error": ...} tool message
without `tool_call_id` or `name`, since it answers no call the message holds; a turn with parse errors is
never the final answer, so the model sees the error and tries again. Nothing the model emits raises here;
an exception raised by the policy itself is the adapter's bug and propagates, but for ContextFull:
a conversation that outgrew the model's context ends its episode as a failure, counted, not a crash.

One assistant turn is `take_turn(episode, reply, max_turns)`, so a caller that batches the model over
many episodes (posttrain/policy.py's `play_episodes`) advances each by exactly the logic
`run_episode` uses:

    episode = new_episode(task)
    while episode["stopped"] is None:
        take_turn(episode, policy(episode["messages"], task["tools"]), max_turns)
    summarize(tasks, episodes)            # what evaluate(policy, tasks) returns
"""

import json
import re

from posttrain.tools import preview, run_tool

MAX_ARGUMENT_CHARS = 10_000  # far above any valid call; json.loads of megabytes of model output is waste


def _decode(raw, name, arguments):
    """(payload, parsed arguments or None) for one call; arguments may be a JSON string or already parsed."""
    if not isinstance(name, str) or not name:
        return {"error": 'a tool call needs {"function": {"name": ..., "arguments": ...}}; '
                         f"got {preview(raw, 80)}"}, None
    if isinstance(arguments, str):
        if len(arguments) > MAX_ARGUMENT_CHARS:
            return {"error": f"arguments have {len(arguments)} characters; at most {MAX_ARGUMENT_CHARS}"}, None
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError) as e:  # RecursionError: thousands of nested brackets
            return {"error": f"arguments are not valid JSON: {e}"}, None
    return run_tool(name, arguments), arguments


def _call_entry(raw, default_id):
    """The tool_calls entry as recorded (OpenAI layout whatever came in), with its raw name and arguments."""
    function = raw.get("function") if isinstance(raw, dict) else None
    name, arguments = (function.get("name"), function.get("arguments")) if isinstance(function, dict) else (None, None)
    call_id = raw["id"] if isinstance(raw, dict) and isinstance(raw.get("id"), str) and raw["id"] else default_id
    entry = {"id": call_id, "type": "function", "function": {
        "name": name if isinstance(name, str) else "",
        "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, default=repr)}}
    return entry, name, arguments


def _assistant(raw):
    """(assistant message, raw tool calls, parse errors) from whatever the policy returned."""
    if not isinstance(raw, dict):
        return {"role": "assistant", "content": None}, [], [f"the model's turn is not a message: {preview(raw)}"]
    errors = raw.get("parse_errors") or []
    errors = [preview(e, 200) if not isinstance(e, str) else e[:200]
              for e in (errors if isinstance(errors, (list, tuple)) else [errors])]
    content = raw.get("content")
    message = {"role": "assistant", "content": content if content is None or isinstance(content, str) else str(content)}
    calls = raw.get("tool_calls") or []
    if not isinstance(calls, list):
        errors.append(f"tool_calls must be a list, got {preview(calls)}")
        calls = []
    return message, calls, errors


class ContextFull(Exception):
    """Raised by a policy whose model cannot read the conversation so far (it outgrew the context):
    the episode ends there, stopped "context", unanswered. Not an invalid call: the model made none."""


def new_episode(task) -> dict:
    """An episode of `task` before its first turn: what `run_episode` returns, with "stopped" None
    (still playing), "final" None and "turns" 0. `take_turn` advances it."""
    return {"messages": [dict(m) for m in task["messages"]], "calls": [], "final": None, "turns": 0,
            "stopped": None}


def check_max_turns(max_turns) -> None:
    if not isinstance(max_turns, int) or isinstance(max_turns, bool) or max_turns < 1:
        raise ValueError(f"max_turns = {max_turns!r}; it must be a positive integer")


def take_turn(episode: dict, reply, max_turns: int) -> None:
    """Apply one assistant turn, `reply` as the policy returned it, to `episode` (in place): record
    it, run its calls, append their results. The episode is over ("stopped" set) when the turn
    called nothing and had no parse errors (the answer), or when it was the max_turns-th."""
    message, raw_calls, errors = _assistant(reply)
    calls, results = episode["calls"], []
    for raw in raw_calls:
        entry, name, arguments = _call_entry(raw, f"call_{len(calls)}")
        payload, parsed = _decode(raw, name, arguments)
        calls.append({"name": entry["function"]["name"], "arguments": parsed, "ok": "result" in payload,
                      "payload": payload})
        results.append({"role": "tool", "tool_call_id": entry["id"], "name": entry["function"]["name"],
                        "content": json.dumps(payload)})
        message.setdefault("tool_calls", []).append(entry)
    for error in errors:
        calls.append({"name": None, "arguments": None, "ok": False, "payload": {"error": error}})
        results.append({"role": "tool", "content": json.dumps({"error": error})})
    if message["content"] is None and "tool_calls" not in message:
        # Output with no text and no readable call: recorded as the empty turn it rendered to, since
        # a turn with neither is no valid conversation and the next prompt could not be rendered.
        message["content"] = ""
    episode["messages"] += [message] + results
    episode["turns"] += 1
    if not results:
        episode["final"], episode["stopped"] = message["content"], "answer"
    elif episode["turns"] >= max_turns:
        episode["stopped"] = "max_turns"


def run_episode(policy, task, max_turns: int = 4) -> dict:
    """Play `task` with `policy` for at most `max_turns` assistant turns.

    Returns {"messages": the whole conversation, "calls": [{"name", "arguments", "ok", "payload"}] in
    order, "final": the answering turn's content ("" if it had none; None if it never answered),
    "turns": assistant turns taken, "stopped": "answer" | "max_turns" | "context" (the policy raised
    ContextFull)}. A call is ok when the tool returned a result; a tool that refused well-formed
    arguments (division by zero) is not ok either.
    """
    check_max_turns(max_turns)
    episode = new_episode(task)
    while episode["stopped"] is None:
        try:
            reply = policy(list(episode["messages"]), task["tools"])
        except ContextFull:
            episode["stopped"] = "context"
            break
        take_turn(episode, reply, max_turns)
    return episode


def _expected_calls(task):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for m in task["trajectory"] if m["role"] == "assistant" for c in m.get("tool_calls", [])]


def _normal(arguments):
    # Spacing is the model's choice ("378*24" is "378 * 24"); 12 and 12.0 already compare equal.
    return {k: re.sub(r"\s+", "", v) if isinstance(v, str) else v for k, v in arguments.items()}


def _in_order(needles, haystack):
    rest = iter(haystack)
    return all(any(n == h for h in rest) for n in needles)


def mentions(text: str, value: str) -> bool:
    """`value` appears in `text` as a whole number or date: "5" is not in "15", "-5", "5.5" or "2025-05-01"."""
    return re.search(rf"(?<![0-9.\-]){re.escape(value)}(?![0-9]|\.[0-9])", text) is not None


def score(task, episode) -> dict:
    """The ground-truth calls must appear, in order, among the episode's ok calls (other calls around them
    are allowed: recovering from a mistake is fine), and the final answer must mention the answer."""
    ok = [c for c in episode["calls"] if c["ok"]]
    expected = _expected_calls(task)
    right_tool = _in_order([name for name, _ in expected], [c["name"] for c in ok])
    right_arguments = _in_order([(n, _normal(a)) for n, a in expected], [(c["name"], _normal(c["arguments"])) for c in ok])
    answered = episode["final"] is not None and mentions(episode["final"], task["answer"])
    return {"valid_calls": len(ok), "invalid_calls": len(episode["calls"]) - len(ok), "called_right_tool": right_tool,
            "right_arguments": right_arguments, "answered": answered, "success": right_arguments and answered}


def evaluate(policy, tasks, max_turns: int = 4) -> dict:
    """Rates over `tasks`, one `run_episode` each: see `summarize`."""
    if not tasks:
        raise ValueError("evaluate needs at least one task")
    return summarize(tasks, [run_episode(policy, task, max_turns) for task in tasks])


def summarize(tasks, episodes) -> dict:
    """Rates over `tasks` played as `episodes` (in the same order): success, right tool, right
    arguments, answer; valid calls over all calls made; success per task family; and how many
    episodes stopped for each reason."""
    scores = [score(task, episode) for task, episode in zip(tasks, episodes, strict=True)]
    valid, invalid = sum(s["valid_calls"] for s in scores), sum(s["invalid_calls"] for s in scores)
    families = {}
    for task, s in zip(tasks, scores):
        families.setdefault(task["family"], []).append(s["success"])
    stopped = {reason: 0 for reason in ("answer", "max_turns", "context")}
    for episode in episodes:
        stopped[episode["stopped"]] += 1

    def rate(key):
        return sum(s[key] for s in scores) / len(scores)

    return {"tasks": len(tasks), "success_rate": rate("success"), "called_right_tool_rate": rate("called_right_tool"),
            "right_arguments_rate": rate("right_arguments"), "answered_rate": rate("answered"),
            "valid_call_rate": valid / (valid + invalid) if valid + invalid else 0.0,
            "valid_calls": valid, "invalid_calls": invalid,
            "success_by_family": {f: sum(v) / len(v) for f, v in sorted(families.items())}, "stopped": stopped}
