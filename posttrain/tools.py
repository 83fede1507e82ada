"""Deterministic tools for tool-use post-training: each one a plain function plus its JSON schema.

Every tool is pure (no clock, no network, no state), so a ground-truth trajectory replays to the same
results on any machine. Numbers are computed exactly (fractions) and come back rounded to 2 decimals,
as an int when whole: results stay short for a small model to copy into its answer, and 0.1 + 0.2 is 0.3.

`run_tool(name, arguments)` is the one way in from model output: it checks the name and the arguments
against the schema and turns every failure into {"error": text} for the tool turn. The tools themselves
raise `ToolError` for input the schema cannot rule out (a bad expression, an impossible date).
"""

import datetime
import json
import math
import re
from fractions import Fraction


class ToolError(Exception):
    """A failure the caller can fix from the message alone; `run_tool` shows it to the model."""


def preview(value, limit=40):
    """A value as JSON, cut to `limit` characters: error texts quote model output, which may be huge."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(x: Fraction):
    x = round(x, 2)
    return int(x) if x.denominator == 1 else float(x)


# ---- calculator: recursive descent over  expr := term (("+"|"-") term)*,  term := factor (("*"|"/") factor)*,
#      factor := ("+"|"-") factor | number | "(" expr ")".  Parsed, never evaluated as Python.
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?|\.[0-9]+")  # ASCII only: str.isdigit and \d admit other scripts
MAX_EXPRESSION_CHARS = 200  # bounds the size of the numbers too: no exponentiation, so at most ~10**200
MAX_DEPTH = 50  # parentheses and unary signs; keeps the recursion far from Python's limit


class _Parser:
    def __init__(self, text):
        self.tokens, self.i, self.depth = [], 0, 0
        pos = 0
        while pos < len(text):
            if text[pos].isspace():
                pos += 1
            elif m := _NUMBER.match(text, pos):
                self.tokens.append((Fraction(m.group()), pos))
                pos = m.end()
            elif text[pos] in "+-*/()":
                self.tokens.append((text[pos], pos))
                pos += 1
            else:
                raise ToolError(f"unexpected character {text[pos]!r} at position {pos}; "
                                "allowed: numbers, + - * / and parentheses")

    def peek(self):
        return self.tokens[self.i][0] if self.i < len(self.tokens) else None

    def take(self):
        self.i += 1
        return self.tokens[self.i - 1][0]

    def fail(self, expected):
        if self.i == len(self.tokens):
            return ToolError(f"expected {expected} at the end of the expression")
        token, pos = self.tokens[self.i]
        shown = token if isinstance(token, str) else _number(token)
        return ToolError(f"expected {expected} at position {pos}, found {str(shown)!r}")

    def expr(self):
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self):
        value = self.factor()
        while self.peek() in ("*", "/"):
            op, rhs = self.take(), self.factor()
            if op == "*":
                value *= rhs
            elif rhs == 0:
                raise ToolError("division by zero")
            else:
                value /= rhs
        return value

    def factor(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ToolError(f"expression nests deeper than {MAX_DEPTH} levels")
        token = self.peek()
        if token in ("+", "-"):
            self.take()
            value = -self.factor() if token == "-" else self.factor()
        elif token == "(":
            self.take()
            value = self.expr()
            if self.peek() != ")":
                raise self.fail("')'")
            self.take()
        elif isinstance(token, Fraction):
            value = self.take()
        else:
            raise self.fail("a number or '('")
        self.depth -= 1
        return value


def calculator(expression: str):
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression has {len(expression)} characters; at most {MAX_EXPRESSION_CHARS}")
    parser = _Parser(expression)
    value = parser.expr()
    if parser.i < len(parser.tokens):
        raise parser.fail("an operator")
    return _number(value)


# ---- convert_units: value_in_base = value * scale + offset, base units m, kg and K. Exact decimal
#      definitions (1 in = 0.0254 m, 1 lb = 0.45359237 kg) so results do not depend on float rounding.
_UNITS = {
    unit: (dimension, Fraction(scale), Fraction(offset))
    for unit, (dimension, scale, offset) in {
        "mm": ("length", "0.001", 0), "cm": ("length", "0.01", 0), "m": ("length", 1, 0),
        "km": ("length", 1000, 0), "in": ("length", "0.0254", 0), "ft": ("length", "0.3048", 0),
        "mi": ("length", "1609.344", 0),
        "g": ("mass", "0.001", 0), "kg": ("mass", 1, 0), "oz": ("mass", "0.028349523125", 0),
        "lb": ("mass", "0.45359237", 0),
        "C": ("temperature", 1, "273.15"), "F": ("temperature", Fraction(5, 9), Fraction("273.15") - Fraction(160, 9)),
        "K": ("temperature", 1, 0),
    }.items()
}


def convert_units(value: float, from_unit: str, to_unit: str):
    (dim_a, scale_a, offset_a), (dim_b, scale_b, offset_b) = _UNITS[from_unit], _UNITS[to_unit]
    if dim_a != dim_b:
        raise ToolError(f"cannot convert {from_unit} ({dim_a}) to {to_unit} ({dim_b})")
    base = Fraction(repr(value)) * scale_a + offset_a  # repr: 19.31 is 1931/100, as the model wrote it
    return _number((base - offset_b) / scale_b)


# ---- lookup_city: a fixed table of fictional cities (real names would invite checking against the world).
CITIES = {  # population in thousands, area in km2, elevation in m
    "Alder": (412, 96, 35), "Brindle": (87, 31, 240), "Corvale": (655, 180, 12), "Dunmere": (23, 9, 610),
    "Elmsby": (140, 52, 75), "Fairholt": (308, 77, 150), "Glenmor": (51, 18, 820), "Hollin": (926, 245, 5),
    "Ivywick": (19, 6, 430), "Juniper": (273, 64, 95), "Kestrel": (164, 41, 360), "Lowmoor": (38, 15, 2),
}
FIELDS = ("population", "area", "elevation")


def lookup_city(city: str, field: str):
    return CITIES[city][FIELDS.index(field)]


# ---- dates: strict YYYY-MM-DD (date.fromisoformat also takes 20240101 and week dates).
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _date(text):
    if not _ISO_DATE.fullmatch(text):
        raise ToolError(f"{preview(text)} is not a date in YYYY-MM-DD form")
    try:
        return datetime.date.fromisoformat(text)
    except ValueError as e:
        raise ToolError(f"{preview(text)} is not a valid date: {e}") from None


def date_add(date: str, days: int):
    try:
        return (_date(date) + datetime.timedelta(days=days)).isoformat()
    except OverflowError:
        raise ToolError(f"{date} plus {days} days is outside years 1-9999") from None


def days_between(start: str, end: str):
    return (_date(end) - _date(start)).days


# ---- registry
def _tool(fn, description, **properties):
    parameters = {"type": "object", "properties": properties, "required": list(properties),
                  "additionalProperties": False}
    return fn.__name__, ({"type": "function", "function": {"name": fn.__name__, "description": description,
                                                           "parameters": parameters}}, fn)


TOOLS = dict([
    _tool(calculator, "Evaluate an arithmetic expression with + - * / and parentheses.",
          expression={"type": "string", "description": "for example (12 + 7) * 3"}),
    _tool(convert_units, "Convert a length, mass or temperature between units.",
          value={"type": "number"}, from_unit={"type": "string", "enum": list(_UNITS)},
          to_unit={"type": "string", "enum": list(_UNITS)}),
    _tool(lookup_city, "Look up a city's population (thousands), area (km2) or elevation (m).",
          city={"type": "string", "enum": list(CITIES)}, field={"type": "string", "enum": list(FIELDS)}),
    _tool(date_add, "The date a number of days after (or, if negative, before) a date.",
          date={"type": "string", "description": "YYYY-MM-DD"}, days={"type": "integer"}),
    _tool(days_between, "The number of days from start to end (negative if end is earlier).",
          start={"type": "string", "description": "YYYY-MM-DD"}, end={"type": "string", "description": "YYYY-MM-DD"}),
])
SCHEMAS = [schema for schema, _ in TOOLS.values()]


# ---- argument validation: the JSON-schema subset our schemas use (object, required, additionalProperties,
#      type string/integer/number, enum). Stricter than JSON schema in two places on purpose: an integer
#      must be written without a fraction (3, not 3.0) and a number must be finite (Python's json reads NaN).
_JSON_TYPES = ((type(None), "null"), (bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
               (list, "array"), (dict, "object"))


def _got(value):
    kind = next((name for t, name in _JSON_TYPES if isinstance(value, t)), type(value).__name__)
    return kind if value is None else f"{kind} {preview(value)}"


def _type_ok(expected, value):
    if expected == "string":
        return isinstance(value, str)
    if isinstance(value, bool):  # bool is an int subclass; JSON true is not a number
        return False
    if expected == "integer":
        return isinstance(value, int)
    return isinstance(value, (int, float)) and math.isfinite(value)  # "number"


def validate_arguments(schema, args) -> list[str]:
    """Every way `args` breaks the parameters `schema`, one message each naming argument, value and what is valid."""
    if not isinstance(args, dict):
        return [f"arguments must be a JSON object, got {_got(args)}"]
    properties = schema.get("properties", {})
    errors = [f"missing required argument {name!r}" for name in schema.get("required", []) if name not in args]
    for name, value in args.items():
        spec = properties.get(name)
        if spec is None:
            if schema.get("additionalProperties", True) is False:
                errors.append(f"unexpected argument {preview(name)}; expected {', '.join(properties)}")
        elif "type" in spec and not _type_ok(spec["type"], value):
            errors.append(f"argument {name!r} must be {'an' if spec['type'] == 'integer' else 'a'} {spec['type']}, "
                          f"got {_got(value)}")
        elif "enum" in spec and value not in spec["enum"]:
            errors.append(f"argument {name!r} is {preview(value)}; valid: {', '.join(map(str, spec['enum']))}")
    return errors


def run_tool(name, arguments) -> dict:
    """The tool turn's payload: {"result": value}, or {"error": text} for an unknown tool, invalid arguments
    or a failed call. Never raises: `name` and `arguments` come from the model."""
    if not isinstance(name, str) or name not in TOOLS:
        return {"error": f"unknown tool {preview(name)}; available: {', '.join(TOOLS)}"}
    schema, fn = TOOLS[name]
    errors = validate_arguments(schema["function"]["parameters"], arguments)
    if errors:
        return {"error": "; ".join(errors)}
    try:
        return {"result": fn(**arguments)}
    except ToolError as e:
        return {"error": str(e)}
    except Exception as e:  # a bug of ours must not end the episode; the type name tells it from a ToolError
        return {"error": f"{type(e).__name__}: {e}"}
