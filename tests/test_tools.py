"""Tools, argument validation, the task generator and the live tool loop (posttrain/)."""

import copy
import inspect
import json
import re

import pytest

from posttrain.executor import MAX_ARGUMENT_CHARS, evaluate, mentions, run_episode, score
from posttrain.tasks import FAMILIES, make_tasks, split_of, write_jsonl
from posttrain.tools import (TOOLS, ToolError, calculator, convert_units, date_add, days_between, lookup_city,
                             run_tool, validate_arguments)


# ---- tools
@pytest.mark.parametrize("expression, value", [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("2 * 3 + 1", 7),
    ("10 - 4 - 3", 3), ("100 / 10 / 5", 2),  # left-associative
    ("-3 + 5", 2), ("2 * -3", -6), ("--4", 4), ("-(2 + 3) * 2", -10), ("+7", 7),
    ("1.5 + 2.25", 3.75), ("0.1 + 0.2", 0.3),  # exact: floats give 0.30000000000000004
    ("7 / 2", 3.5), ("1 / 3", 0.33), ("2 / 3", 0.67), (".5 * 4", 2), ("3.0", 3), (" 12\t", 12),
    ("((((2))))", 2), ("999 * 999 * 999", 997002999),
])
def test_calculator(expression, value):
    assert calculator(expression) == value and type(calculator(expression)) is type(value)


@pytest.mark.parametrize("expression, message", [
    ("1 / 0", "division by zero"), ("5 / (3 - 3)", "division by zero"), ("0 / 0.0", "division by zero"),
    ("", r"expected a number or '\(' at the end"), ("1 +", "at the end"), ("2 * (3", r"expected '\)' at the end"),
    ("3)", r"expected an operator at position 1, found '\)'"), ("2(3)", "expected an operator at position 1"),
    ("2 ** 3", "position 3, found '\\*'"), ("1 2", "expected an operator at position 2, found '2'"),
    ("abc", "unexpected character 'a' at position 0"), ("1e5", "unexpected character 'e'"),
    ("__import__('os')", "unexpected character '_'"), ("\u0663 + 1", "unexpected character"),  # Arabic-Indic 3
    ("3.", "unexpected character '.' at position 1"),
    ("(" * 60 + "1" + ")" * 60, "nests deeper than 50"), ("-" * 60 + "1", "nests deeper than 50"),
    ("1+" * 150 + "1", "301 characters; at most 200"),
])
def test_calculator_refuses(expression, message):
    with pytest.raises(ToolError, match=message):
        calculator(expression)
    assert re.search(message, run_tool("calculator", {"expression": expression})["error"])


@pytest.mark.parametrize("value, a, b, out", [
    (12, "km", "m", 12000), (1, "mi", "km", 1.61), (1, "ft", "in", 12), (5, "mm", "cm", 0.5), (3, "m", "m", 3),
    (1, "lb", "kg", 0.45), (16, "oz", "lb", 1), (2.5, "kg", "g", 2500),
    (100, "C", "F", 212), (32, "F", "C", 0), (-40, "C", "F", -40), (-40, "F", "C", -40), (0, "C", "K", 273.15),
    (300, "K", "F", 80.33), (19.31, "km", "m", 19310),  # 19.31 as written, not its binary neighbour
])
def test_convert_units(value, a, b, out):
    assert convert_units(value, a, b) == out


def test_convert_units_across_dimensions():
    assert run_tool("convert_units", {"value": 1, "from_unit": "km", "to_unit": "kg"}) == {
        "error": "cannot convert km (length) to kg (mass)"}


def test_lookup_city():
    assert (lookup_city("Alder", "population"), lookup_city("Alder", "area"), lookup_city("Hollin", "elevation")) == (412, 96, 5)
    assert run_tool("lookup_city", {"city": "Paris", "field": "area"})["error"].startswith(
        'argument \'city\' is "Paris"; valid: Alder, Brindle,')


@pytest.mark.parametrize("date, days, out", [
    ("2024-02-28", 1, "2024-02-29"), ("2023-02-28", 1, "2023-03-01"), ("2024-03-01", -1, "2024-02-29"),
    ("2000-02-28", 1, "2000-02-29"), ("1900-02-28", 1, "1900-03-01"),  # 2000 is a leap year, 1900 is not
    ("2024-12-31", 1, "2025-01-01"), ("2024-01-01", 366, "2025-01-01"), ("2024-05-05", 0, "2024-05-05"),
])
def test_date_add(date, days, out):
    assert date_add(date, days) == out


@pytest.mark.parametrize("start, end, days", [
    ("2024-02-01", "2024-03-01", 29), ("2023-02-01", "2023-03-01", 28), ("2024-01-01", "2025-01-01", 366),
    ("2025-01-01", "2024-01-01", -366), ("2024-07-04", "2024-07-04", 0),
])
def test_days_between(start, end, days):
    assert days_between(start, end) == days


@pytest.mark.parametrize("args, message", [
    ({"date": "2023-02-29", "days": 1}, r'"2023-02-29" is not a valid date: day is out of range'),
    ({"date": "2024/01/01", "days": 1}, "not a date in YYYY-MM-DD form"),
    ({"date": "20240101", "days": 1}, "not a date in YYYY-MM-DD form"),  # date.fromisoformat would take it
    ({"date": "9999-12-31", "days": 1}, "outside years 1-9999"), ({"date": "2024-01-01", "days": 10 ** 30}, "outside"),
])
def test_dates_refuse(args, message):
    assert re.search(message, run_tool("date_add", args)["error"])


def test_schemas_match_functions():
    jsonschema = pytest.importorskip("jsonschema")
    for name, (schema, fn) in TOOLS.items():
        function = schema["function"]
        assert schema["type"] == "function" and function["name"] == name == fn.__name__
        jsonschema.Draft202012Validator.check_schema(function["parameters"])
        assert list(function["parameters"]["properties"]) == list(inspect.signature(fn).parameters)


# ---- argument validation
CONVERT = TOOLS["convert_units"][0]["function"]["parameters"]
DATE_ADD = TOOLS["date_add"][0]["function"]["parameters"]
VALIDATION = [  # (schema, arguments, the errors)
    (CONVERT, {"value": 12, "from_unit": "km", "to_unit": "m"}, []),
    (CONVERT, {"value": 1.5, "from_unit": "km", "to_unit": "m"}, []),
    (CONVERT, {"value": "12", "from_unit": "km", "to_unit": "m"}, ["argument 'value' must be a number, got string \"12\""]),
    (CONVERT, {"value": True, "from_unit": "km", "to_unit": "m"}, ["argument 'value' must be a number, got boolean true"]),
    (CONVERT, {"value": None, "from_unit": "km", "to_unit": "m"}, ["argument 'value' must be a number, got null"]),
    (CONVERT, {"value": 1, "from_unit": "furlong", "to_unit": "m"},
     ['argument \'from_unit\' is "furlong"; valid: mm, cm, m, km, in, ft, mi, g, kg, oz, lb, C, F, K']),
    (CONVERT, {"value": 1, "from_unit": "km"}, ["missing required argument 'to_unit'"]),
    (CONVERT, {"value": 1, "from_unit": "km", "to_unit": "m", "precision": 2},
     ['unexpected argument "precision"; expected value, from_unit, to_unit']),
    (CONVERT, {}, ["missing required argument 'value'", "missing required argument 'from_unit'",
                   "missing required argument 'to_unit'"]),
    (CONVERT, [12, "km", "m"], ['arguments must be a JSON object, got array [12, "km", "m"]']),
    (CONVERT, None, ["arguments must be a JSON object, got null"]),
    (DATE_ADD, {"date": "2024-01-01", "days": 2}, []),
    (DATE_ADD, {"date": "2024-01-01", "days": 2.5}, ["argument 'days' must be an integer, got number 2.5"]),
    (DATE_ADD, {"date": 20240101, "days": 2}, ["argument 'date' must be a string, got integer 20240101"]),
    (DATE_ADD, {"date": "2024-01-01", "days": [2]}, ["argument 'days' must be an integer, got array [2]"]),
]


@pytest.mark.parametrize("schema, args, errors", VALIDATION)
def test_validate_arguments(schema, args, errors):
    assert validate_arguments(schema, args) == errors


@pytest.mark.parametrize("schema, args, errors", VALIDATION)
def test_validate_arguments_agrees_with_jsonschema(schema, args, errors):
    jsonschema = pytest.importorskip("jsonschema")
    assert jsonschema.Draft202012Validator(schema).is_valid(args) == (not errors)


def test_validate_arguments_stricter_than_jsonschema():
    # JSON schema takes 3.0 as an integer and NaN as a number; a tool given either would misbehave.
    assert validate_arguments(DATE_ADD, {"date": "2024-01-01", "days": 3.0}) == [
        "argument 'days' must be an integer, got number 3.0"]
    assert validate_arguments(CONVERT, {"value": float("nan"), "from_unit": "km", "to_unit": "m"}) == [
        "argument 'value' must be a number, got number NaN"]


def test_long_values_are_cut_in_messages():
    [error] = validate_arguments(CONVERT, {"value": "9" * 10 ** 6, "from_unit": "km", "to_unit": "m"})
    assert error.startswith("argument 'value' must be a number, got string \"999") and len(error) < 100


# ---- generator
def _tool_calls(task):
    return [c for m in task["trajectory"] if m["role"] == "assistant" for c in m.get("tool_calls", [])]


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_generator_is_deterministic_and_covers_families(kind):
    tasks = make_tasks(60, seed=3, kind=kind, split="heldout")
    assert tasks == make_tasks(60, seed=3, kind=kind, split="heldout")
    assert [t["messages"] for t in tasks] != [t["messages"] for t in make_tasks(60, seed=4, kind=kind, split="heldout")]
    assert {t["family"] for t in tasks} == set(FAMILIES[kind])
    assert len({t["id"] for t in tasks}) == 60


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_train_and_heldout_requests_are_disjoint(kind):
    train = {t["messages"][0]["content"] for seed in (0, 1) for t in make_tasks(1000, seed, kind, "train")}
    heldout = {t["messages"][0]["content"] for t in make_tasks(400, 0, kind, "heldout")}
    assert not train & heldout
    assert {split_of(r) for r in train} == {"train"} and {split_of(r) for r in heldout} == {"heldout"}
    assert len(heldout) > 200  # held-out requests are mostly distinct, not a few repeated


@pytest.mark.parametrize("kind, calls", [("single", 1), ("multi", 2)])
def test_trajectories_are_well_formed(kind, calls):
    for task in make_tasks(200, seed=0, kind=kind):
        trajectory, request = task["trajectory"], task["messages"][0]["content"]
        assert trajectory[0] == task["messages"][0] == {"role": "user", "content": request}
        assert [m["role"] for m in trajectory] == ["user"] + ["assistant", "tool"] * calls + ["assistant"]
        tool_calls, results = _tool_calls(task), [m for m in trajectory if m["role"] == "tool"]
        assert [c["id"] for c in tool_calls] == [m["tool_call_id"] for m in results] == [f"call_{i}" for i in range(calls)]
        assert all("result" in json.loads(m["content"]) for m in results)
        assert trajectory[-1]["content"].startswith(f"The answer is {task['answer']}")
        assert mentions(trajectory[-1]["content"], task["answer"])
        # Learnable by copying: every number in a call's arguments is in the request or in an earlier result,
        # but for the two constants the request's unit implies.
        seen = request + (" 7 24" if task["family"] == "days_calc" else "")
        for call, result in zip(tool_calls, results):
            numbers = re.findall(r"\d+(?:\.\d+)?", call["function"]["arguments"].replace("-", " "))
            assert set(numbers) <= set(re.findall(r"\d+(?:\.\d+)?", seen.replace("-", " "))), (request, call)
            seen += " " + result["content"]
        if kind == "multi":  # dependent: the second call uses the first call's result
            first = str(json.loads(results[0]["content"])["result"])
            assert first in json.loads(tool_calls[1]["function"]["arguments"])["expression"]


def test_make_tasks_refuses_unknown_names():
    with pytest.raises(ValueError, match="kind = 'pair'; valid: single, multi"):
        make_tasks(1, 0, kind="pair")
    with pytest.raises(ValueError, match="split = 'test'; valid: train, heldout"):
        make_tasks(1, 0, split="test")


def test_write_jsonl(tmp_path):
    tasks = make_tasks(5, 0, "multi")
    write_jsonl(tasks, tmp_path / "sft.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert lines == [{"messages": t["trajectory"], "tools": t["tools"]} for t in tasks]


# ---- executor
def replay(task):
    """The ground truth as a policy: its k-th assistant turn when k assistant turns have been taken."""
    turns = [m for m in task["trajectory"] if m["role"] == "assistant"]
    return lambda messages, tools: copy.deepcopy(turns[sum(m["role"] == "assistant" for m in messages)])


@pytest.mark.parametrize("kind", list(FAMILIES))
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_ground_truth_replays_to_full_success(kind, split):
    tasks = make_tasks(40, seed=1, kind=kind, split=split)
    for task in tasks:
        episode = run_episode(replay(task), task)
        assert episode["messages"] == task["trajectory"] and episode["stopped"] == "answer"
        assert score(task, episode)["success"]
    by_request = {task["messages"][0]["content"]: replay(task) for task in tasks}  # one policy for all tasks
    result = evaluate(lambda messages, tools: by_request[messages[0]["content"]](messages, tools), tasks)
    assert result["success_rate"] == result["valid_call_rate"] == result["right_arguments_rate"] == 1.0
    assert result["valid_calls"] == len(tasks) * (1 if kind == "single" else 2) and result["invalid_calls"] == 0
    assert set(result["success_by_family"].values()) == {1.0}


def _call(name, arguments, call_id="c"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


MALFORMED = [  # (a tool_calls entry, what the error says)
    (_call("calculator", '{"expression": '), "arguments are not valid JSON: Expecting value"),
    (_call("calculator", "{'expression': '1'}"), "not valid JSON: Expecting property name"),
    (_call("calc", '{"expression": "1"}'), 'unknown tool "calc"; available: calculator, convert_units'),
    (_call("calculator", '{"expression": 5}'), "argument 'expression' must be a string, got integer 5"),
    (_call("calculator", "{}"), "missing required argument 'expression'"),
    (_call("calculator", '{"expression": "1", "x": 1}'), 'unexpected argument "x"; expected expression'),
    (_call("calculator", "[1, 2]"), "arguments must be a JSON object, got array"),
    (_call("calculator", "5"), "arguments must be a JSON object, got integer 5"),
    (_call("calculator", "null"), "arguments must be a JSON object, got null"),
    (_call("calculator", None), "arguments must be a JSON object, got null"),
    (_call("calculator", '{"expression": "1 / 0"}'), "division by zero"),
    (_call("calculator", json.dumps({"expression": "1+" * 10 ** 5})), f"at most {MAX_ARGUMENT_CHARS}"),
    (_call("calculator", json.dumps({"expression": "1+" * 4000 + "1"})), "8001 characters; at most 200"),
    (_call("calculator", "[" * 5000 + "]" * 5000), "not valid JSON"),  # deep enough to overflow the decoder
    (_call("convert_units", '{"value": NaN, "from_unit": "km", "to_unit": "m"}'), "must be a number, got number NaN"),
    (_call(None, "{}"), "a tool call needs"), (_call(["calculator"], "{}"), "a tool call needs"),
    (_call("x" * 10 ** 6, "{}"), "unknown tool"),
    (None, "a tool call needs"), ("calculator", "a tool call needs"), ({"id": "c"}, "a tool call needs"),
    ({"function": "calculator"}, "a tool call needs"),
]


def test_malformed_calls_come_back_as_errors():
    entries = [entry for entry, _ in MALFORMED]
    turns = iter([{"role": "assistant", "content": None, "tool_calls": entries},
                  {"role": "assistant", "content": "The answer is 1."}])
    task = make_tasks(1, 0)[0]
    episode = run_episode(lambda messages, tools: next(turns), task)
    tool_messages = [m for m in episode["messages"] if m["role"] == "tool"]
    assert len(tool_messages) == len(MALFORMED) and episode["stopped"] == "answer" and episode["turns"] == 2
    for message, (_, expected) in zip(tool_messages, MALFORMED):
        error = json.loads(message["content"])["error"]
        assert re.search(expected, error), (expected, error)
        assert len(error) < 300  # huge model output is not echoed back
    ids = [m["tool_call_id"] for m in tool_messages]
    assert ids[0] == "c" and ids[-1] == f"call_{len(MALFORMED) - 1}"  # missing ids are made up, in order
    recorded = episode["messages"][1]["tool_calls"]
    assert all(isinstance(c["function"]["name"], str) and isinstance(c["function"]["arguments"], str) for c in recorded)
    assert score(task, episode) == {"valid_calls": 0, "invalid_calls": len(MALFORMED), "called_right_tool": False,
                                    "right_arguments": False, "answered": False, "success": False}


@pytest.mark.parametrize("turn, error", [
    (None, "the model's turn is not a message: null"), ("The answer is 7.", "not a message: \"The answer"),
    (7, "not a message: 7"), ({"content": "x", "tool_calls": "calculator"}, 'tool_calls must be a list, got "calc'),
    ({"content": "x", "parse_errors": ["unclosed <tool_call> block"]}, "unclosed <tool_call> block"),
    ({"content": None, "parse_errors": "bad call"}, "bad call"),
])
def test_malformed_turns_come_back_as_errors(turn, error):
    task = make_tasks(1, 0)[0]
    turns = iter([turn] + [m for m in task["trajectory"] if m["role"] == "assistant"])
    episode = run_episode(lambda messages, tools: copy.deepcopy(next(turns)), task)
    reply = episode["messages"][2]
    assert reply["role"] == "tool" and set(reply) == {"role", "content"}  # no id or name: it answers no call
    assert error in json.loads(reply["content"])["error"]
    s = score(task, episode)  # the model recovers on the next turns
    assert (s["invalid_calls"], s["valid_calls"], s["success"]) == (1, 1, True)


def test_a_policy_that_never_answers_stops_at_max_turns():
    task = make_tasks(1, 0)[0]

    def always_call(messages, tools):
        return {"tool_calls": [_call("calculator", '{"expression": "1 + 1"}')]}

    episode = run_episode(always_call, task, max_turns=3)
    assert (episode["stopped"], episode["final"], episode["turns"], len(episode["calls"])) == ("max_turns", None, 3, 3)
    assert not score(task, episode)["success"]


def test_score_fails_wrong_work():
    task = next(t for t in make_tasks(20, 0) if t["family"] == "calc")
    calls, answer = _tool_calls(task), task["trajectory"][-1]
    guessed = iter([answer])  # the right answer without calling the tool
    s = score(task, run_episode(lambda m, t: next(guessed), task))
    assert (s["answered"], s["called_right_tool"], s["success"]) == (True, False, False)
    wrong = iter([{"tool_calls": [_call("calculator", '{"expression": "1 + 1"}')]}, answer])
    s = score(task, run_episode(lambda m, t: next(wrong), task))
    assert (s["called_right_tool"], s["right_arguments"], s["success"]) == (True, False, False)
    respaced = json.dumps({"expression": json.loads(calls[0]["function"]["arguments"])["expression"].replace(" ", "")})
    unsure = iter([{"tool_calls": [_call("calculator", respaced)]}, {"content": "I do not know."}])
    s = score(task, run_episode(lambda m, t: next(unsure), task))
    assert (s["right_arguments"], s["answered"], s["success"]) == (True, False, False)  # spacing is free


@pytest.mark.parametrize("text, value, found", [
    ("The answer is 5.", "5", True), ("The answer is 15.", "5", False), ("The answer is -5.", "5", False),
    ("The answer is 5.5.", "5", False), ("The answer is -5 C.", "-5", True), ("The answer is 3.75 m.", "3.75", True),
    ("The answer is 3.755", "3.75", False), ("on 2025-05-01", "5", False), ("The answer is 2024-02-29.", "2024-02-29", True),
])
def test_mentions(text, value, found):
    assert mentions(text, value) == found
