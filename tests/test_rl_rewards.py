"""posttrain.rl.rewards: the length reward, loop detection and reward shaping, on numbers worked by hand."""

import random

import pytest

from posttrain.rl.rewards import length_penalty, loop_period, shape_rewards


@pytest.mark.parametrize(
    "lengths, correct, expected",
    [
        # lambda = 0.5 - (len - 10) / 20 = [0.5, 0, -0.5]; the wrong one gets min(0, 0) = 0
        ([10, 20, 30], [True, False, True], [0.5, 0.0, -0.5]),
        # lambda = [0.5, 0.25, -0.5]: short wrong answers get min(0, lambda) = 0, never a bonus
        ([10, 15, 30], [False, False, True], [0.0, 0.0, -0.5]),
        # a long wrong answer still pays: min(0, -0.5)
        ([10, 30], [True, False], [0.5, -0.5]),
        ([7, 7, 7], [True, False, True], [0.0, 0.0, 0.0]),  # all equal: nothing to compare
        ([42], [True], [0.0]),  # a single sample
    ],
)
def test_length_penalty(lengths, correct, expected):
    assert length_penalty(lengths, correct) == pytest.approx(expected, abs=1e-15)


def test_length_penalty_errors():
    with pytest.raises(ValueError, match="lengths is empty"):
        length_penalty([], [])
    with pytest.raises(ValueError, match="lengths has 2 entries but correct has 3"):
        length_penalty([1, 2], [True, False, True])
    with pytest.raises(ValueError, match=r"lengths = \[3, -1\] has a negative length"):
        length_penalty([3, -1], [True, True])


@pytest.mark.parametrize(
    "tokens, max_period, repeats, expected",
    [
        ([1, 2, 3, 7, 7, 7, 7], 4, 3, 1),
        ([5, 1, 2, 1, 2, 1, 2], 4, 3, 2),
        ([9, 1, 2, 3, 1, 2, 3, 1, 2, 3], 4, 3, 3),
        ([1, 2, 1, 3, 1, 2, 1, 3], 4, 2, 4),
        ([1, 2, 1, 3, 1, 2, 1, 3], 3, 2, None),  # its period 4 is above max_period
        ([1, 1, 1, 1, 1, 1], 3, 2, 1),  # periods 2 and 3 fit too; the smallest is returned
        ([1, 2, 3, 1, 2, 4, 1, 2, 3], 3, 3, None),  # one token off in the middle block
        ([1, 2, 3, 1, 2, 3, 1, 2, 4], 3, 3, None),  # the newest token breaks it
        ([7, 7, 7, 7, 1], 3, 3, None),  # a loop earlier on, but not at the tail
        ([1, 2, 1, 2, 1], 2, 3, None),  # p = 2 needs 6 tokens, there are 5; p = 1 fails
        ([7, 7], 3, 3, None),  # shorter than 1 * 3
        ([7, 7, 7], 3, 3, 1),
        ([], 3, 2, None),
        (list(range(1000)) + [5, 6] * 3, 8, 3, 2),
    ],
)
def test_loop_period(tokens, max_period, repeats, expected):
    assert loop_period(tokens, max_period, repeats) == expected


def brute_loop_period(tokens, max_period, repeats):
    for p in range(1, max_period + 1):
        if p * repeats <= len(tokens) and tokens[len(tokens) - p * repeats:] == tokens[len(tokens) - p:] * repeats:
            return p
    return None


def test_loop_period_against_brute_force():
    rng = random.Random(0)
    periodic = 0
    for _ in range(3000):
        # a two-letter alphabet and short sequences make periodic tails common
        tokens = [rng.randrange(2) for _ in range(rng.randrange(0, 25))]
        max_period, repeats = rng.randrange(1, 7), rng.randrange(2, 5)
        expected = brute_loop_period(tokens, max_period, repeats)
        assert loop_period(tokens, max_period, repeats) == expected, (tokens, max_period, repeats)
        periodic += expected is not None
    assert 500 < periodic < 2500  # both outcomes were exercised


class TailOnly(list):
    """A list that records which slices are taken and refuses every other way of reading it."""

    def __init__(self, *args):
        super().__init__(*args)
        self.keys = []

    def __getitem__(self, key):
        self.keys.append(key)
        return super().__getitem__(key)

    def __iter__(self):
        raise AssertionError("loop_period read the whole sequence")


def test_loop_period_reads_only_the_tail():
    tokens = TailOnly(list(range(10_000)) + [4, 2] * 3)
    assert loop_period(tokens, 5, 3) == 2
    assert tokens.keys == [slice(-15, None)]  # max_period * repeats tokens, nothing more


def test_loop_period_errors():
    with pytest.raises(ValueError, match="max_period = 0 must be >= 1"):
        loop_period([1, 1], 0, 2)
    with pytest.raises(ValueError, match="repeats = 1 must be >= 2"):
        loop_period([1, 1], 2, 1)


def test_shape_rewards_combines_every_term():
    correct = [True, False, True, True]
    lengths = [10, 20, 30, 40]
    finish = ["stop", "stop", "length", "repeat"]
    # base: [1, 0, -truncation, -repetition] = [1, 0, -0.2, -0.3]
    assert shape_rewards(correct, lengths, finish, truncation_penalty=0.2, repetition_penalty=0.3) == \
        pytest.approx([1.0, 0.0, -0.2, -0.3])
    # length term with samples 2 and 3 scored wrong: lambda = 0.5 - (len - 10) / 30 = [1/2, 1/6, -1/6, -1/2]
    # -> [1/2, min(0, 1/6), min(0, -1/6), min(0, -1/2)] = [0.5, 0, -1/6, -0.5]; times 0.5 = [0.25, 0, -1/12, -0.25]
    assert shape_rewards(correct, lengths, finish, length_weight=0.5, truncation_penalty=0.2,
                         repetition_penalty=0.3) == pytest.approx([1.25, 0.0, -0.2 - 1 / 12, -0.55])
    assert shape_rewards(correct, lengths, ["stop"] * 4) == [1.0, 0.0, 1.0, 1.0]


def test_shape_rewards_truncated_counts_as_wrong_for_the_length_term():
    # The truncated sample has the right answer and is the shortest: lambda = [0.5, -0.5]. Scored wrong,
    # it gets min(0, 0.5) = 0 on top of -truncation_penalty = 0; the correct one gets -0.5.
    assert shape_rewards([True, True], [5, 10], ["length", "stop"], length_weight=1.0) == pytest.approx([0.0, 0.5])


def test_shape_rewards_errors():
    with pytest.raises(ValueError, match="finish = 'eos' is not one of stop, length, repeat"):
        shape_rewards([True], [3], ["eos"])
    with pytest.raises(ValueError, match="truncation_penalty = -0.1 must be a finite number >= 0"):
        shape_rewards([True], [3], ["stop"], truncation_penalty=-0.1)
    with pytest.raises(ValueError, match="repetition_penalty = -1 must be a finite number >= 0"):
        shape_rewards([True], [3], ["stop"], repetition_penalty=-1)
    with pytest.raises(ValueError, match="length_weight = nan must be a finite number >= 0"):
        shape_rewards([True], [3], ["stop"], length_weight=float("nan"))
    with pytest.raises(ValueError, match="correct, lengths and finish have 2, 1 and 2 entries"):
        shape_rewards([True, False], [3], ["stop", "stop"])
    with pytest.raises(ValueError, match="no samples"):
        shape_rewards([], [], [])
