"""posttrain/rl/tasks/arithmetic.py: problems and splits, the systematic slip, SFT data rates, the verifier."""

import random
import re

import pytest

from posttrain.conversations import check_record, load_conversations
from posttrain.rl.tasks.arithmetic import (ANSWER, PADDING, accuracy, make_problems, response, sft_records,
                                     slipped_answer, verify, write_jsonl)
from posttrain.tasks import split_of


def _problem(a, op, b):
    return {"id": "t", "prompt": f"What is {a} {op} {b}?", "answer": str(a + b if op == "+" else a - b),
            "difficulty": len(str(a)), "a": a, "b": b, "op": op}


def _expression(p):
    return f"{p['a']} {p['op']} {p['b']}"


def _has_carry(p):
    """Whether the slip can change this problem's answer: some column carries (or borrows)."""
    return slipped_answer(p) != p["answer"]


# --- problems -------------------------------------------------------------------------------------

def test_make_problems_is_deterministic_per_arguments():
    first = make_problems(200, seed=3, digits=(1, 2, 3), ops=("+", "-"))
    assert first == make_problems(200, seed=3, digits=(1, 2, 3), ops=("+", "-"))
    assert first != make_problems(200, seed=4, digits=(1, 2, 3), ops=("+", "-"))
    assert [p["prompt"] for p in first] != [p["prompt"] for p in make_problems(200, seed=3, digits=(1, 2, 3))]
    assert len({p["id"] for p in first}) == 200
    assert make_problems(0, seed=3) == []


def test_splits_share_no_prompt_and_no_expression():
    train = make_problems(3000, seed=0, ops=("+", "-"))
    heldout = make_problems(3000, seed=1, split="heldout", ops=("+", "-"))
    assert all(split_of(_expression(p)) == "train" for p in train)
    assert all(split_of(_expression(p)) == "heldout" for p in heldout)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in heldout}
    # Stricter than prompts: a held-out sum is not in train under another template either.
    assert not {_expression(p) for p in train} & {_expression(p) for p in heldout}
    # Even one-digit problems (only 100 sums, 15 of them held out) are split.
    assert {p["prompt"] for p in make_problems(500, seed=0, digits=(1,))}.isdisjoint(
        p["prompt"] for p in make_problems(500, seed=0, digits=(1,), split="heldout"))


def test_operands_have_the_drawn_number_of_digits():
    problems = make_problems(3000, seed=5, digits=(1, 2, 3, 6), ops=("+", "-"))
    for p in problems:
        d = p["difficulty"]
        for x in (p["a"], p["b"]):
            assert 0 <= x <= 9 if d == 1 else len(str(x)) == d, p
        assert p["answer"] == str(p["a"] + p["b"] if p["op"] == "+" else p["a"] - p["b"])
        assert p["op"] == "+" or p["a"] >= p["b"]
        assert str(p["a"]) in p["prompt"] and str(p["b"]) in p["prompt"]
    shares = {d: sum(p["difficulty"] == d for p in problems) / len(problems) for d in (1, 2, 3, 6)}
    assert all(0.20 < s < 0.30 for s in shares.values()), shares  # uniform: 0.25 each
    assert 0.45 < sum(p["op"] == "-" for p in problems) / len(problems) < 0.55
    assert any(0 in (p["a"], p["b"]) for p in problems if p["difficulty"] == 1)  # 0 is a 1-digit operand
    assert len({p["prompt"].split()[0] for p in problems}) >= 4  # several templates


@pytest.mark.parametrize("kwargs, argument", [
    ({"n": -1}, "n = -1"),
    ({"n": 2.0}, "n = 2.0"),
    ({"split": "test"}, "split = 'test'"),
    ({"digits": (0, 1)}, "digits = (0, 1)"),
    ({"digits": (7,)}, "digits = (7,)"),
    ({"digits": ()}, "digits = ()"),
    ({"digits": 3}, "digits = 3"),
    ({"ops": ("*",)}, "ops = ('*',)"),
    ({"ops": "+"}, "ops = '+'"),
])
def test_make_problems_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=re.escape(argument)):
        make_problems(**{"n": 3, "seed": 0, **kwargs})


# --- the slip -------------------------------------------------------------------------------------

@pytest.mark.parametrize("a, op, b, slipped", [
    (347, "+", 586, "823"),  # 3+5=8, 4+8=12->2, 7+6=13->3 (right: 933)
    (95, "+", 17, "2"),      # 9+1=10->0, 5+7=12->2: "02" (right: 112)
    (7, "+", 6, "3"),        # 13 without its carry
    (5, "+", 5, "0"),        # all zero
    (12, "+", 34, "46"),     # no carry: the slip is the right answer
    (52, "-", 38, "26"),     # |5-3|=2, |2-8|=6 (right: 14)
    (500, "-", 499, "199"),  # |5-4|=1, |0-9|=9, |0-9|=9 (right: 1)
    (100, "-", 100, "0"),
    (58, "-", 21, "37"),     # no borrow: right
    (999, "+", 1, "990"),    # unequal lengths align on the right
])
def test_slipped_answer_by_hand(a, op, b, slipped):
    assert slipped_answer(_problem(a, op, b)) == slipped


def test_slip_changes_the_answer_exactly_when_a_column_carries_or_borrows():
    for a in range(10, 100):
        for b in range(10, 100):
            carries = a % 10 + b % 10 >= 10 or a // 10 + b // 10 >= 10
            assert (slipped_answer(_problem(a, "+", b)) != str(a + b)) == carries, (a, b)
            if a >= b:
                assert (slipped_answer(_problem(a, "-", b)) != str(a - b)) == (a % 10 < b % 10), (a, b)


def test_slipped_answer_rejects_an_unknown_op():
    with pytest.raises(ValueError, match=r"problem\['op'\] = '\*'"):
        slipped_answer({"a": 2, "b": 3, "op": "*"})


# --- SFT data -------------------------------------------------------------------------------------

def _final_answer(record):
    return record["messages"][1]["content"].rsplit("The answer is ", 1)[1][:-1]


def test_sft_records_hit_the_requested_slip_and_filler_rates():
    problems = make_problems(2000, seed=7)
    records = sft_records(problems, seed=1, slip_rate=0.3, filler=0.7)
    assert records == sft_records(problems, seed=1, slip_rate=0.3, filler=0.7)
    assert records != sft_records(problems, seed=2, slip_rate=0.3, filler=0.7)
    carrying = [(p, r) for p, r in zip(problems, records) if _has_carry(p)]
    assert len(carrying) > 800  # about half of 1-3 digit sums carry somewhere
    slipped = sum(_final_answer(r) == slipped_answer(p) for p, r in carrying) / len(carrying)
    assert 0.25 < slipped < 0.35, slipped  # sd ~0.015
    padded = [r["messages"][1]["content"] != ANSWER.format(_final_answer(r)) for r in records]
    assert 0.66 < sum(padded) / len(padded) < 0.74, sum(padded) / len(padded)  # sd ~0.01
    for p, r in zip(problems, records):
        assert check_record(r) == []
        assert r["messages"][0] == {"role": "user", "content": p["prompt"]}
        assert _final_answer(r) in (p["answer"], slipped_answer(p))
    # Correct responses come in several lengths: something for a length penalty to shorten.
    assert len({len(r["messages"][1]["content"]) - len(p["answer"]) for p, r in zip(problems, records)
                if _final_answer(r) == p["answer"]}) > 20


def test_sft_rewards_follow_the_slip_rate():
    problems = make_problems(2000, seed=8, ops=("+", "-"))
    carry_share = sum(map(_has_carry, problems)) / len(problems)
    for rate in (0.0, 0.5, 1.0):
        texts = [r["messages"][1]["content"] for r in sft_records(problems, seed=0, slip_rate=rate)]
        result = accuracy(problems, texts)
        assert result["accuracy"] == pytest.approx(1 - rate * carry_share, abs=0.04)
        assert set(result["reasons"]) <= {"correct", "wrong"}
    every_slip = [r["messages"][1]["content"] for r in sft_records(problems, seed=0, slip_rate=1.0)]
    assert [verify(p, t)[0] for p, t in zip(problems, every_slip)] == [float(not _has_carry(p)) for p in problems]


def test_response_padding_restates_without_answering():
    problem, rng = _problem(347, "+", 586), random.Random(0)
    assert response(problem, "933", rng, filler=0.0) == "The answer is 933."
    texts = [response(problem, "933", rng, filler=1.0) for _ in range(300)]
    assert all(t.endswith(" The answer is 933.") and t.count("The answer is") == 1 for t in texts)
    sentences = [t[: -len(" The answer is 933.")].count(".") for t in texts]
    assert set(sentences) == {1, 2, 3}
    assert any("We need to add 347 and 586." in t for t in texts)
    assert not any("answer" in s.lower() for s in PADDING["+"] + PADDING["-"])
    with pytest.raises(ValueError, match="filler = 1.5"):
        response(problem, "933", rng, filler=1.5)
    with pytest.raises(ValueError, match="slip_rate = -0.1"):
        sft_records([problem], seed=0, slip_rate=-0.1)


def test_write_jsonl_round_trips_through_the_sft_loader(tmp_path):
    records = sft_records(make_problems(50, seed=0, ops=("+", "-")), seed=0)
    write_jsonl(records, tmp_path / "arith.jsonl")
    assert load_conversations(str(tmp_path / "arith.jsonl")) == records


# --- the verifier ---------------------------------------------------------------------------------

P933 = _problem(347, "+", 586)


@pytest.mark.parametrize("text, expected", [
    ("The answer is 933.", (1.0, "correct")),
    ("The answer is 933", (1.0, "correct")),
    ("We need to add 347 and 586. Let me work this out. The answer is 933.", (1.0, "correct")),
    ("The answer is 933. I hope that helps!", (1.0, "correct")),  # trailing text
    ("The answer is 933.\n\nDone.", (1.0, "correct")),
    ("The answer is 0933.", (1.0, "correct")),  # the same integer
    ("The answer is 823.", (0.0, "wrong: got 823")),
    ("The answer is -933.", (0.0, "wrong: got -933")),
    ("The answer is 823. No, wait. The answer is 933.", (1.0, "correct")),  # the last answer counts
    ("The answer is 933. No, wait. The answer is 823.", (0.0, "wrong: got 823")),
    ("It is 933.", (0.0, "no answer")),
    ("The answer isn't 933.", (0.0, "no answer")),
    ("the answer is 933.", (0.0, "no answer")),  # the format is part of the task
    ("", (0.0, "no answer")),
])
def test_verify(text, expected):
    assert verify(P933, text) == expected


class _Unprintable:
    def __str__(self):
        raise RuntimeError("no")

    __repr__ = __str__


MALFORMED = [
    None, b"The answer is 933.", 933, 933.0, ["The answer is 933."], {"text": "The answer is 933."},
    _Unprintable(),
    "The answer is",  # nothing after it
    "The answer is 933.5",  # not 933
    "The answer is 933.5.",
    "The answer is 9,33.",  # no thousands separators
    "The answer is 9_33.",  # int() would take it
    "The answer is +933.",
    "The answer is 933..",
    "The answer is 1e3.",
    "The answer is 0x3a5.",
    "The answer is ٩٣٣.",  # Arabic-Indic digits: int() would read 933
    "The answer is ９３３.",  # fullwidth digits
    "The answer is 9\x0033.",  # control characters
    "The answer is 933\x00.",
    "The answer is 933\x1b[0m.",
    "The answer is \ud800.",  # a lone surrogate
    "The answer is **933**.",
    "The answer is " + "9" * 5000 + ".",  # past int()'s 4300-digit limit
    "\x00" * 100,
    "The answer is 933." + "x" * 5000,  # the answer is past the tail that is read
]


@pytest.mark.parametrize("text", MALFORMED, ids=range(len(MALFORMED)))
def test_verify_never_raises_on_malformed_text(text):
    reward, reason = verify(P933, text)
    assert reward == 0.0 and isinstance(reason, str) and len(reason) < 80
    assert reason == "no answer" or reason.startswith("malformed: ")


def test_verify_reads_only_the_tail_of_a_huge_string():
    huge = "The answer is 1. " * 1_000_000 + "The answer is 933."  # 17 MB
    assert verify(P933, huge) == (1.0, "correct")
    assert verify(P933, huge[:-18]) == (0.0, "wrong: got 1")
    # An answer followed by more than the tail is not seen, however well-formed.
    assert verify(P933, "The answer is 933." + " " * 2000) == (0.0, "no answer")
    assert verify(P933, "The answer is 933." + " " * 1900) == (1.0, "correct")


def test_accuracy_fields():
    problems = [_problem(347, "+", 586), _problem(52, "-", 38), _problem(7, "+", 6), _problem(95, "+", 17)]
    texts = ["The answer is 933.", "The answer is 26.", "The answer is 13.", None]
    assert accuracy(problems, texts) == {"accuracy": 0.5, "by_difficulty": {1: 1.0, 2: 0.0, 3: 1.0},
                                         "reasons": {"correct": 2, "wrong": 1, "malformed": 1}}
    assert accuracy(problems[:1], ["nothing"])["reasons"] == {"no answer": 1}
    with pytest.raises(ValueError, match="4 problems but 3 texts"):
        accuracy(problems, texts[:3])
    with pytest.raises(ValueError, match="at least one problem"):
        accuracy([], [])
