"""Verifiable arithmetic for an RL demo on CPU: problems with a difficulty, SFT data, an exact verifier.

The demo fine-tunes a tiny model (SFT) until it is right only part of the time, then lets RL with
`verify` as the reward lift it. Two properties of the SFT data make that possible:
  - a *systematic* slip: a share of the responses answer with `slipped_answer` (digit by digit,
    no carrying or borrowing), so the SFT model has seen both answers and can produce the right one,
    and RL has probability to move toward it rather than a skill to invent;
  - responses of varied length that are equally correct (optional padding sentences that compute
    nothing before "The answer is N."), so a length penalty has something to shorten.

Splits: a problem's expression "a op b" hashes to train or heldout (posttrain.tasks.split_of). Hashing
the expression rather than the whole prompt keeps more apart than the prompt alone would: no held-out
prompt appears in train, and neither does a held-out sum under another template ("Compute 3 + 5."
in train would otherwise give away "What is 3 + 5?" held out), whatever the seeds.
"""

import json
import random
import re
from collections.abc import Sequence

from posttrain.tasks import split_of

ANSWER = "The answer is {}."
SPLITS = ("train", "heldout")
OPS = ("+", "-")
MAX_DIGITS = 6
TEMPLATES = {  # "{e}" is the expression "a op b"
    "+": ["What is {e}?", "Calculate {e}.", "Compute {e}.", "How much is {e}?", "Add {a} and {b}."],
    "-": ["What is {e}?", "Calculate {e}.", "Compute {e}.", "How much is {e}?", "Subtract {b} from {a}."],
}
# Padding restates the problem and computes nothing, so a response's length says nothing of its correctness.
PADDING = {
    "+": ["We need to add {a} and {b}.", "Let me work this out.", "Adding the two numbers.",
          "This is an addition problem.", "We add {b} to {a}.", "Let me think about it."],
    "-": ["We need to subtract {b} from {a}.", "Let me work this out.", "Subtracting the two numbers.",
          "This is a subtraction problem.", "We take {b} away from {a}.", "Let me think about it."],
}
VERIFY_TAIL = 2000  # characters of the text `verify` reads: a well-formed answer ends the response
MAX_NUMBER_CHARS = 40  # far above any answer here; longer is reported, not parsed or echoed
# The last "The answer is" and the token after it; "isn't" is no match (\b). [0-9], not \d: "٩٣٣" is no 933.
_FINAL = re.compile(r"\bThe answer is\b\s*(\S*)")
_INTEGER = re.compile(r"-?[0-9]+")


def _check_rate(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} = {value!r}; it must be a probability in [0, 1]")


def _operand(rng: random.Random, d: int) -> int:
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)


def make_problems(n: int, seed: int, digits: Sequence[int] = (1, 2, 3), split: str = "train",
                  ops: Sequence[str] = ("+",)) -> list[dict]:
    """`n` problems from `split`, each {"id", "prompt", "answer", "difficulty", "a", "b", "op"}.

    Both operands have exactly `difficulty` digits (1-digit ones are 0-9), the digit count drawn
    uniformly from `digits` (repeat an entry to weight it) and the operation from `ops`; subtraction
    has a >= b, so answers are never negative. Deterministic per (seed, split, digits, ops). Problems
    may repeat within a split (there are only 100 one-digit sums), never across splits.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n = {n!r}; it must be a non-negative integer")
    if split not in SPLITS:
        raise ValueError(f"split = {split!r}; valid: {', '.join(SPLITS)}")
    if isinstance(digits, (str, bytes)) or not isinstance(digits, Sequence) or not digits or any(
            isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_DIGITS for d in digits):
        raise ValueError(f"digits = {digits!r}; it must be a non-empty sequence of digit counts in "
                         f"1..{MAX_DIGITS}, e.g. (1, 2, 3)")
    if isinstance(ops, str) or not isinstance(ops, Sequence) or not ops or any(op not in OPS for op in ops):
        raise ValueError(f"ops = {ops!r}; it must be a non-empty sequence of operations from {OPS}")
    digits, ops = tuple(digits), tuple(ops)
    rng = random.Random(f"arithmetic-{seed}-{split}-{digits}-{ops}")
    problems = []
    while len(problems) < n:
        d, op = rng.choice(digits), rng.choice(ops)
        a, b = _operand(rng, d), _operand(rng, d)
        if op == "-" and a < b:
            a, b = b, a
        expression = f"{a} {op} {b}"
        if split_of(expression) != split:
            continue
        problems.append({"id": f"arith-{split}-{seed}-{len(problems)}",
                         "prompt": rng.choice(TEMPLATES[op]).format(e=expression, a=a, b=b),
                         "answer": str(a + b if op == "+" else a - b), "difficulty": d, "a": a, "b": b, "op": op})
    return problems


def slipped_answer(problem: dict) -> str:
    """The systematic mistake: each digit on its own, addition without carrying ((a_i + b_i) mod 10),
    subtraction without borrowing (|a_i - b_i|), leading zeros stripped: 347 + 586 -> "823", 52 - 38 -> "26".

    A problem with no carry or borrow (12 + 34, 58 - 21, every 1-digit subtraction) gets the right
    answer this way: it cannot be got wrong by this slip.
    """
    a, b, op = str(problem["a"]), str(problem["b"]), problem["op"]
    if op not in OPS:
        raise ValueError(f"problem['op'] = {op!r}; valid: {', '.join(OPS)}")
    width = max(len(a), len(b))
    pairs = zip(map(int, a.zfill(width)), map(int, b.zfill(width)))
    digits = "".join(str((x + y) % 10 if op == "+" else abs(x - y)) for x, y in pairs)
    return digits.lstrip("0") or "0"


def response(problem: dict, answer: str, rng: random.Random, filler: float) -> str:
    """The assistant's text: with probability `filler`, 1 to 3 distinct padding sentences that restate
    the problem, then ANSWER.format(answer). Its correctness depends on the final answer alone."""
    _check_rate("filler", filler)
    final = ANSWER.format(answer)
    if rng.random() >= filler:
        return final
    padding = rng.sample(PADDING[problem["op"]], rng.randint(1, 3))
    return " ".join(p.format(a=problem["a"], b=problem["b"]) for p in padding) + " " + final


def sft_records(problems, seed: int, slip_rate: float = 0.5, filler: float = 0.5) -> list[dict]:
    """One {"messages": [user, assistant]} record per problem (posttrain/conversations.py layout), the
    assistant answering `slipped_answer` with probability `slip_rate`, else the right answer.
    Deterministic given seed (and the problems)."""
    _check_rate("slip_rate", slip_rate)
    _check_rate("filler", filler)
    rng = random.Random(f"arithmetic-sft-{seed}")
    records = []
    for problem in problems:
        answer = slipped_answer(problem) if rng.random() < slip_rate else problem["answer"]
        records.append({"messages": [{"role": "user", "content": problem["prompt"]},
                                     {"role": "assistant", "content": response(problem, answer, rng, filler)}]})
    return records


def write_jsonl(records, path) -> None:
    """One record per line, what posttrain/conversations.py's load_conversations reads."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def verify(problem: dict, text) -> tuple[float, str]:
    """(1.0, "correct") when the integer after the last "The answer is" equals problem["answer"], else
    (0.0, why): "no answer", "wrong: got X", or "malformed: ..." for anything else.

    Model output is untrusted, so nothing about `text` raises: not a string, control characters,
    "933.5", "9,33", "+933", unicode digits ("٩٣٣") are all malformed, never 933. The answer token may
    end in one period and leading zeros are the same integer ("0933" is 933). Only the last
    VERIFY_TAIL characters are read, so a huge string costs no more than a short one; an answer with
    more text than that after it is not seen. The problem is ours and trusted.
    """
    if not isinstance(text, str):
        return 0.0, f"malformed: not text but {type(text).__name__}"
    final = None
    for final in _FINAL.finditer(text[-VERIFY_TAIL:]):
        pass
    if final is None:
        return 0.0, "no answer"
    token = final.group(1)
    if len(token) > MAX_NUMBER_CHARS:
        return 0.0, f"malformed: answer of {len(token)} characters"
    number = token[:-1] if token.endswith(".") else token
    if not _INTEGER.fullmatch(number):
        return 0.0, f"malformed: not an integer: {token!r}"
    if int(number) != int(problem["answer"]):
        return 0.0, f"wrong: got {int(number)}"
    return 1.0, "correct"


def reason_category(reason: str) -> str:
    """ "correct", "no answer", "wrong" or "malformed": the reason up to its colon."""
    return reason.split(":", 1)[0]


def accuracy(problems, texts) -> dict:
    """{"accuracy": mean reward, "by_difficulty": {digits: rate}, "reasons": {category: count}} of
    `texts` answering `problems` in the same order."""
    problems, texts = list(problems), list(texts)
    if len(problems) != len(texts):
        raise ValueError(f"{len(problems)} problems but {len(texts)} texts; give one text per problem")
    if not problems:
        raise ValueError("accuracy needs at least one problem")
    by_difficulty, reasons, total = {}, {}, 0.0
    for problem, text in zip(problems, texts):
        reward, reason = verify(problem, text)
        total += reward
        by_difficulty.setdefault(problem["difficulty"], []).append(reward)
        category = reason_category(reason)
        reasons[category] = reasons.get(category, 0) + 1
    return {"accuracy": total / len(problems),
            "by_difficulty": {d: sum(r) / len(r) for d, r in sorted(by_difficulty.items())},
            "reasons": reasons}
