"""Digit reversal, a verifiable task a model of a few million parameters learns within a CPU budget.

"Reverse the digits of 472." -> "The answer is 274." Multi-digit addition (posttrain/rl/tasks/arithmetic.py)
takes a 2M-parameter model thousands of SFT steps (measured: 1% held-out after 150 steps on 2-3 digit
sums); reversal is learnt in a few hundred.

The SFT data mixes two strategies, as real SFT data mixes answering directly with working it out:
  worked   "Reading the digits from the end: 2 7 4. The answer is 274."   (right)
  direct   "The answer is 472."   (a systematic slip: the number copied, not reversed)
and the mix depends on the request's wording: slip_rates[i] is the share of direct answers for
TEMPLATES[i]. The SFT model so learns a habit, not a skill gap: for some wordings it mostly answers
directly and is wrong, for others it works it out and is mostly right, so it starts at an
intermediate accuracy, and RL with the verifier can learn to work it out whatever the wording, which
carries over to numbers it never trained on. With probability `filler` a response is also padded
with sentences that compute nothing, so lengths vary among equally right answers and a length penalty
has something to shorten. (A slip decided by the number itself, copy or reverse at the first digit,
did not carry over: RL learnt the training numbers and held-out accuracy fell, README.)

Numbers use the digits 1-9 (no zero: a reversed leading zero would make "0274" and "274" one
answer). Splits hash the number, so no held-out number appears in training.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from posttrain.rl.tasks.arithmetic import ANSWER, SPLITS, verify  # noqa: F401  (verify: the task's checker)
from posttrain.tasks import split_of

TEMPLATES = ["Reverse the digits of {n}.", "Reverse {n}.", "Write {n} backwards.", "What is {n} reversed?",
             "Read {n} from right to left."]
PADDING = ["We need to reverse {n}.", "Let me work this out.", "Reading the digits from the end.",
           "This is a reversal problem.", "We write the digits of {n} in the other order.", "Let me think about it."]
MAX_DIGITS = 9


def make_problems(n: int, seed: int, digits: Sequence[int] = (3, 4, 5), split: str = "train") -> list[dict]:
    """`n` problems from `split`, each {"id", "prompt", "answer", "difficulty" (the number of digits),
    "number", "template" (the index of its wording in TEMPLATES)}."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n = {n!r}; it must be a non-negative integer")
    if split not in SPLITS:
        raise ValueError(f"split = {split!r}; valid: {', '.join(SPLITS)}")
    if isinstance(digits, (str, bytes)) or not isinstance(digits, Sequence) or not digits or any(
            isinstance(d, bool) or not isinstance(d, int) or not 2 <= d <= MAX_DIGITS for d in digits):
        raise ValueError(f"digits = {digits!r}; it must be a non-empty sequence of digit counts in 2..{MAX_DIGITS}")
    rng = random.Random(f"digits-{seed}-{split}-{tuple(digits)}")
    problems = []
    while len(problems) < n:
        d = rng.choice(list(digits))
        number = "".join(rng.choice("123456789") for _ in range(d))
        if split_of(f"reverse {number}") != split:
            continue
        template = rng.randrange(len(TEMPLATES))
        problems.append({"id": f"reverse-{split}-{seed}-{len(problems)}", "prompt": TEMPLATES[template].format(n=number),
                         "answer": number[::-1], "difficulty": d, "number": number, "template": template})
    return problems


SLIP_RATES = (0.1, 0.1, 0.9, 0.9, 0.9)  # direct (wrong) answers per template: 66% of all responses


def worked(number: str) -> str:
    return "Reading the digits from the end: " + " ".join(number[::-1]) + ". " + ANSWER.format(number[::-1])


def sft_records(problems, seed: int, slip_rates: Sequence[float] = SLIP_RATES, filler: float = 0.5) -> list[dict]:
    """One {"messages": [user, assistant]} record per problem: a direct answer copying the number with
    probability slip_rates[template], else the worked reversal; padded with 1-3 sentences with
    probability filler."""
    if len(slip_rates) != len(TEMPLATES):
        raise ValueError(f"slip_rates has {len(slip_rates)} entries; give one per template ({len(TEMPLATES)})")
    for name, value in [*((f"slip_rates[{i}]", r) for i, r in enumerate(slip_rates)), ("filler", filler)]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{name} = {value!r}; it must be a probability in [0, 1]")
    rng = random.Random(f"digits-sft-{seed}")
    records = []
    for p in problems:
        text = ANSWER.format(p["number"]) if rng.random() < slip_rates[p["template"]] else worked(p["number"])
        if rng.random() < filler:
            text = " ".join(s.format(n=p["number"]) for s in rng.sample(PADDING, rng.randint(1, 3))) + " " + text
        records.append({"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": text}]})
    return records
