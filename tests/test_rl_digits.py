"""Digit reversal (posttrain/rl/tasks/digits.py): problems, splits, the SFT data's slip and padding, the verifier."""

import pytest

from posttrain.conversations import check_record
from posttrain.rl.tasks import digits


def test_problems_are_deterministic_split_and_reversed():
    train = digits.make_problems(3000, 0, digits=[2, 3, 4])
    assert train == digits.make_problems(3000, 0, digits=[2, 3, 4])
    heldout = digits.make_problems(500, 7, digits=[2, 3, 4], split="heldout")
    assert not {p["number"] for p in train} & {p["number"] for p in heldout}
    for p in train[:200]:
        assert p["answer"] == p["number"][::-1] and len(p["number"]) == p["difficulty"] and "0" not in p["number"]
        assert p["number"] in p["prompt"]
    assert {p["difficulty"] for p in train} == {2, 3, 4}


def test_sft_records_answer_directly_at_each_wordings_slip_rate_and_pad_at_the_filler_rate():
    problems = digits.make_problems(3000, 1, digits=[3, 4])
    rates = (0.0, 0.25, 0.5, 0.75, 1.0)
    records = digits.sft_records(problems, seed=0, slip_rates=rates, filler=0.6)
    direct, seen, padded = [0] * 5, [0] * 5, 0
    for p, r in zip(problems, records):
        assert check_record(r) == []
        assert r["messages"][0]["content"] == digits.TEMPLATES[p["template"]].format(n=p["number"])
        text = r["messages"][1]["content"]
        # The worked reversal, spelt out by hand (a padding sentence may also start "Reading the digits").
        worked = "Reading the digits from the end: " + " ".join(reversed(p["number"])) + f". The answer is {p['number'][::-1]}."
        is_direct = not text.endswith(worked)
        if is_direct:
            assert text.endswith(f"The answer is {p['number']}.")
        assert digits.verify(p, text)[0] == float(not is_direct or p["number"] == p["answer"])
        direct[p["template"]] += is_direct
        seen[p["template"]] += 1
        padded += not (text.startswith("The answer is") or text.startswith("Reading the digits from the end:"))
    for rate, d, n in zip(rates, direct, seen):
        assert abs(d / n - rate) < 0.06, (rate, d, n)
    assert abs(padded / 3000 - 0.6) < 0.04


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="digits"):
        digits.make_problems(3, 0, digits=[1])
    with pytest.raises(ValueError, match="split"):
        digits.make_problems(3, 0, split="test")
    with pytest.raises(ValueError, match=r"slip_rates\[1\]"):
        digits.sft_records([], 0, slip_rates=(0, 2, 0, 0, 0))
    with pytest.raises(ValueError, match="one per template"):
        digits.sft_records([], 0, slip_rates=(0.5,))
