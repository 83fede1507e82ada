"""Seeded tool-use tasks with ground-truth trajectories, sized for a model of a few million parameters.

A request is one of a few short templates filled with small numbers, units, fictional cities or dates.
Every argument is copied from the request or from an earlier tool result (the transformations to
learn: "N days before" -> days = -N; weeks -> "D / 7", hours -> "D * 24"), and the final answer
restates the last result as "The answer is X[ unit]." A task is scored on the calls it makes and on X appearing in its answer.

Families (every task offers all five tools, so choosing the tool is part of the task):
  single: calc, convert, lookup, date_add, days_between                    (one call)
  multi:  convert_calc, lookup_calc, days_calc                              (two calls, the second
          a calculator expression built from the first call's result)

Splits: a request's text hashes to train or heldout (`split_of`), so every held-out request is a
template/value combination never seen verbatim in training, whatever the seeds or the numbers of tasks.
"""

import datetime
import hashlib
import json
import random

from posttrain.tools import CITIES, FIELDS, SCHEMAS, run_tool

HELDOUT_PERCENT = 20
ANSWER = "The answer is {}."
FIELD_UNITS = {"population": "thousand", "area": "km2", "elevation": "m"}
# Pairs whose results stay readable at 2 decimals (g -> kg would round small values to 0).
CONVERSIONS = [("km", "m"), ("m", "cm"), ("cm", "mm"), ("mm", "cm"), ("m", "km"), ("mi", "km"), ("km", "mi"),
               ("ft", "m"), ("m", "ft"), ("in", "cm"), ("kg", "g"), ("lb", "kg"), ("kg", "lb"), ("oz", "g"),
               ("C", "F"), ("F", "C"), ("C", "K"), ("K", "C")]
OPERATIONS = [("add", "+"), ("subtract", "-"), ("multiply by", "*"), ("divide by", "/")]

CALC = ["What is {e}?", "Calculate {e}.", "Compute {e}.", "How much is {e}?", "Evaluate {e}."]
CONVERT = ["Convert {v} {a} to {b}.", "What is {v} {a} in {b}?", "How many {b} are in {v} {a}?",
           "Express {v} {a} in {b}."]
LOOKUP = ["What is the {f} of {c}?", "Look up the {f} of {c}.", "Tell me the {f} of {c}.",
          "Find the {f} of {c}.", "What {f} does {c} have?"]
DATE_AFTER = ["What date is {n} days after {d}?", "Add {n} days to {d}.", "What is the date {n} days after {d}?"]
DATE_BEFORE = ["What date is {n} days before {d}?", "Subtract {n} days from {d}.", "Go back {n} days from {d}."]
BETWEEN = ["How many days are between {a} and {b}?", "Count the days from {a} to {b}.",
           "How many days from {a} until {b}?", "How many days separate {a} and {b}?"]
CONVERT_CALC = ["Convert {v} {a} to {b}, then {op} {c}.", "Convert {v} {a} to {b} and {op} {c}.",
                "Take {v} {a} in {b} and {op} {c}."]
LOOKUP_CALC = ["Look up the {f} of {c} and {op} {k}.", "Find the {f} of {c}, then {op} {k}.",
               "Take the {f} of {c} and {op} {k}."]
DAYS_CALC = {  # unit: (templates, calculator expression on the day count)
    "weeks": (["How many weeks are between {a} and {b}?", "How many weeks from {a} until {b}?",
               "Count the weeks from {a} to {b}."], "{} / 7"),
    "hours": (["How many hours are between {a} and {b}?", "How many hours from {a} until {b}?",
               "Count the hours from {a} to {b}."], "{} * 24"),
}


def split_of(request: str) -> str:
    bucket = int(hashlib.sha256(request.encode()).hexdigest()[:8], 16) % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def _fmt(value):
    return value if isinstance(value, str) else json.dumps(value)


def _small(rng, digits=3):
    """1 to `digits` digits, each length equally likely: small numbers are not drowned by 3-digit ones."""
    d = rng.randint(1, digits)
    return rng.randint(10 ** (d - 1) if d > 1 else 1, 10 ** d - 1)


def _day(rng):
    """A date in 2020-2027: two leap days inside, so February arithmetic is exercised."""
    return datetime.date(2020, 1, 1) + datetime.timedelta(days=rng.randint(0, 8 * 365))


def _result(name, args):
    return run_tool(name, args)["result"]  # first calls of multi families are valid by construction


# A family draws (request, [(tool, arguments)], unit of the answer or "").
def _calc(rng):
    a, b, c = _small(rng), _small(rng), _small(rng)
    o1, o2 = rng.choice("+-*/"), rng.choice("+-*/")
    e = rng.choice([f"{a} {o1} {b}", f"{a} {o1} {b} {o2} {c}", f"({a} {o1} {b}) {o2} {c}", f"{a} {o1} ({b} {o2} {c})"])
    return rng.choice(CALC).format(e=e), [("calculator", {"expression": e})], ""


def _conversion(rng):
    a, b = rng.choice(CONVERSIONS)
    # Temperatures stay in weather range: 1 K would be -272.15 C.
    value = rng.randint(250, 349) if a == "K" else _small(rng, 2) if a in ("C", "F") else _small(rng)
    return {"value": value, "from_unit": a, "to_unit": b}


def _convert(rng):
    args = _conversion(rng)
    request = rng.choice(CONVERT).format(v=args["value"], a=args["from_unit"], b=args["to_unit"])
    return request, [("convert_units", args)], args["to_unit"]


def _lookup(rng):
    args = {"city": rng.choice(list(CITIES)), "field": rng.choice(FIELDS)}
    return rng.choice(LOOKUP).format(f=args["field"], c=args["city"]), [("lookup_city", args)], FIELD_UNITS[args["field"]]


def _date_add(rng):
    n, d = rng.randint(1, 400), _day(rng).isoformat()
    before = rng.random() < 0.5
    request = rng.choice(DATE_BEFORE if before else DATE_AFTER).format(n=n, d=d)
    return request, [("date_add", {"date": d, "days": -n if before else n})], ""


def _span(rng):
    start = _day(rng)
    return {"start": start.isoformat(), "end": (start + datetime.timedelta(days=rng.randint(1, 400))).isoformat()}


def _days_between(rng):
    args = _span(rng)
    return rng.choice(BETWEEN).format(a=args["start"], b=args["end"]), [("days_between", args)], "days"


def _then(rng, first):
    """The dependent second call: one operation on the first call's result with a new small number."""
    (op, symbol), k = rng.choice(OPERATIONS), _small(rng, 2)
    return op, k, ("calculator", {"expression": f"{_fmt(_result(*first))} {symbol} {k}"})


def _convert_calc(rng):
    args = _conversion(rng)
    op, k, second = _then(rng, ("convert_units", args))
    request = rng.choice(CONVERT_CALC).format(v=args["value"], a=args["from_unit"], b=args["to_unit"], op=op, c=k)
    return request, [("convert_units", args), second], args["to_unit"]


def _lookup_calc(rng):
    args = {"city": rng.choice(list(CITIES)), "field": rng.choice(FIELDS)}
    op, k, second = _then(rng, ("lookup_city", args))
    request = rng.choice(LOOKUP_CALC).format(f=args["field"], c=args["city"], op=op, k=k)
    return request, [("lookup_city", args), second], FIELD_UNITS[args["field"]]


def _days_calc(rng):
    unit = rng.choice(list(DAYS_CALC))
    templates, expression = DAYS_CALC[unit]
    args = _span(rng)
    second = ("calculator", {"expression": expression.format(_result("days_between", args))})
    return rng.choice(templates).format(a=args["start"], b=args["end"]), [("days_between", args), second], unit


FAMILIES = {
    "single": {"calc": _calc, "convert": _convert, "lookup": _lookup, "date_add": _date_add,
               "days_between": _days_between},
    "multi": {"convert_calc": _convert_calc, "lookup_calc": _lookup_calc, "days_calc": _days_calc},
}


def trajectory(request, calls, unit):
    """The ground-truth episode in OpenAI layout, results from actually running the tools; with the
    answer string, or None if a call fails (e.g. a drawn expression divides by zero)."""
    messages = [{"role": "user", "content": request}]
    for i, (name, args) in enumerate(calls):
        payload = run_tool(name, args)
        if "error" in payload:
            return None
        call_id = f"call_{i}"
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]})
        messages.append({"role": "tool", "tool_call_id": call_id, "name": name, "content": json.dumps(payload)})
    answer = _fmt(payload["result"])
    messages.append({"role": "assistant", "content": ANSWER.format(f"{answer} {unit}" if unit else answer)})
    return messages, answer


def make_tasks(n: int, seed: int, kind: str = "single", split: str = "train", declare_tools: bool = True) -> list[dict]:
    """`n` tasks of `kind`, families drawn uniformly, requests only from `split`. Deterministic per
    (seed, kind, split). Requests may repeat within a split (a family has a few hundred lookups), never across.

    declare_tools=False gives tasks with "tools": None, so no conversation carries the tools turn:
    the five schemas are ~830 tokens for the stdlib BPE against ~90 for the rest of a conversation,
    all masked out of the loss, so a CPU budget sees ~9x more conversations without them. The model
    then learns the tools from the trajectories alone; the executor checks calls against the same
    schemas either way."""
    if kind not in FAMILIES:
        raise ValueError(f"kind = {kind!r}; valid: {', '.join(FAMILIES)}")
    if split not in ("train", "heldout"):
        raise ValueError(f"split = {split!r}; valid: train, heldout")
    rng = random.Random(f"{seed}-{kind}-{split}")
    families, tasks = FAMILIES[kind], []
    while len(tasks) < n:
        family = rng.choice(list(families))
        request, calls, unit = families[family](rng)
        if split_of(request) != split or (episode := trajectory(request, calls, unit)) is None:
            continue
        messages, answer = episode
        tasks.append({"id": f"{kind}-{split}-{seed}-{len(tasks)}", "family": family, "messages": messages[:1],
                      "tools": SCHEMAS if declare_tools else None, "answer": answer, "trajectory": messages})
    return tasks


def write_jsonl(tasks, path):
    """SFT data: one {"messages": ground-truth trajectory, "tools": schemas} object per line."""
    with open(path, "w") as f:
        for task in tasks:
            record = {"messages": task["trajectory"]}
            if task["tools"] is not None:
                record["tools"] = task["tools"]
            f.write(json.dumps(record) + "\n")
