"""posttrain.rl.prompt_pool: prioritized sampling frequencies, curriculum promotion, exact resume."""

import json
from collections import Counter

import pytest

from posttrain.rl.prompt_pool import PromptPool

# 0.999 quantiles of the chi-square distribution (scipy.stats.chi2.ppf(0.999, dof)): a correct sampler
# fails these tests with probability 1e-3 for a given seed, and the seeds are fixed.
CHI2_999 = {2: 13.816, 3: 16.266}


def chi_square(counts: Counter, expected: dict[int, float]) -> float:
    return sum((counts[i] - e) ** 2 / e for i, e in expected.items())


def test_prioritized_draws_follow_one_minus_success_rate():
    pool = PromptPool([0] * 5, seed=123)
    for i, solved in enumerate([0, 1, 2, 3, 4]):  # s = [0, 0.25, 0.5, 0.75, 1.0]
        pool.update(i, successes=solved, trials=4)
    assert [pool.success_rate(i) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    n = 20_000
    counts = Counter(pool.draw(n))
    assert counts[4] == 0  # s = 1: weight 0, never drawn
    weights = {0: 1.0, 1: 0.75, 2: 0.5, 3: 0.25}  # 1 - s_i, total 2.5
    expected = {i: n * w / 2.5 for i, w in weights.items()}  # 8000, 6000, 4000, 2000
    assert chi_square(counts, expected) < CHI2_999[3]  # 4 categories with expected > 0: 3 dof


def test_all_solved_falls_back_to_uniform():
    pool = PromptPool([0, 0, 0], seed=7)
    for i in range(3):
        pool.update(i, successes=4, trials=4)
    counts = Counter(pool.draw(3000))
    assert set(counts) == {0, 1, 2}
    assert chi_square(counts, {i: 1000.0 for i in range(3)}) < CHI2_999[2]


def test_fractional_successes_and_untried_problems():
    pool = PromptPool([0, 0], seed=0)
    assert pool.success_rate(0) == 0.0  # never tried
    pool.update(0, successes=1.5, trials=4)
    pool.update(0, successes=0.25, trials=1)
    assert pool.success_rate(0) == pytest.approx(1.75 / 5)


def test_curriculum_promotes_on_the_threshold_and_never_demotes():
    # levels 1 (problems 0-3), 2 (4, 5), 3 (6); promote_at 0.6, min_trials 4
    pool = PromptPool([1, 1, 1, 1, 2, 2, 3], seed=0)
    assert pool.levels == (1, 2, 3) and pool.level == 1 and pool.active == [0, 1, 2, 3]
    assert set(pool.draw(200)) == {0, 1, 2, 3}

    pool.update(3, successes=3, trials=3)  # below min_trials: counts for nothing yet
    pool.update(0, successes=4, trials=4)  # rate 4/4, but only 1 of 4 level-1 problems tried enough
    assert pool.level == 1
    pool.update(1, successes=0, trials=4)  # 2 of 4 tried; pooled rate (4 + 0) / 8 = 0.5 < 0.6
    assert pool.level == 1
    pool.update(2, successes=3, trials=4)  # pooled (4 + 0 + 3) / 12 = 0.583 < 0.6
    assert pool.level == 1
    pool.update(0, successes=4, trials=4)  # pooled (8 + 0 + 3) / 16 = 0.6875 >= 0.6: promote
    assert pool.level == 2 and pool.active == [0, 1, 2, 3, 4, 5]
    # easier problems stay eligible; 0 and 3 are solved (s = 1), so only 1 and 2 of them are drawn
    assert set(pool.draw(500)) == {1, 2, 4, 5}

    pool.update(4, successes=0, trials=4)  # pooled (11 + 0) / 20 = 0.55 < 0.6: stays at 2, no demotion to 1
    assert pool.level == 2 and pool.active == [0, 1, 2, 3, 4, 5]
    # Problem 3 reaches 4 trials (4 successes): pooled (15 + 0) / 24 = 0.625, and 1 of level 2's 2
    # problems has 4 trials (half is enough): promote. Eligible problems of lower levels count in the rate.
    pool.update(3, successes=1, trials=1)
    assert pool.level == 3 and pool.active == list(range(7))
    for _ in range(3):  # the top level: failures change nothing
        pool.update(6, successes=0, trials=4)
    assert pool.level == 3 and pool.active == list(range(7))


def test_promotion_needs_half_of_the_level_tried():
    pool = PromptPool([0, 0, 0, 1], seed=0, promote_at=0.5, min_trials=2)
    pool.update(0, successes=2, trials=2)  # rate 1.0, but 1 of 3 level-0 problems tried: 2 * 1 < 3
    assert pool.level == 0
    pool.update(1, successes=1, trials=2)  # 2 of 3 tried, pooled 3 / 4 >= 0.5
    assert pool.level == 1


def drive(pool, steps):
    """A few iterations of draw, update (fractional rewards) and draw again; returns what was drawn."""
    drawn = []
    for step in range(steps):
        batch = pool.draw(8)
        drawn.append(batch)
        for k, i in enumerate(batch):
            pool.update(i, successes=0.1 * ((i + k + step) % 4), trials=1)  # 0.1 * 3 etc.: not exact in binary
    return drawn, pool.level


def test_state_dict_round_trip_resumes_exactly():
    difficulties = [0, 0, 0, 1, 1, 2, 2, 2]
    uninterrupted = PromptPool(difficulties, seed=5, promote_at=0.1, min_trials=2)
    drive(uninterrupted, 1)
    assert uninterrupted.level == 1
    state = json.loads(json.dumps(uninterrupted.state_dict()))

    resumed = PromptPool(difficulties, seed=999, promote_at=0.1, min_trials=2)  # the state carries the RNG
    resumed.load_state_dict(state)
    assert [resumed.success_rate(i) for i in range(8)] == [uninterrupted.success_rate(i) for i in range(8)]
    assert resumed.level == uninterrupted.level
    assert drive(resumed, 20) == drive(uninterrupted, 20)
    assert uninterrupted.level == 2  # the curriculum moved while the two ran side by side


def test_load_state_dict_refuses_another_pool():
    state = PromptPool([0, 1, 1], seed=0).state_dict()
    with pytest.raises(ValueError, match=r"another pool: its difficulties \(3 problems\) differ from this pool's \(4 problems\)"):
        PromptPool([0, 1, 1, 2], seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="another pool"):
        PromptPool([0, 1, 2], seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="state lacks level, rng"):
        PromptPool([0, 1, 1], seed=0).load_state_dict({k: state[k] for k in ("difficulties", "successes", "trials")})
    bad = dict(state, trials=[1, 0, 0], successes=[2.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"successes in \[0, trials\]"):
        PromptPool([0, 1, 1], seed=0).load_state_dict(bad)
    with pytest.raises(ValueError, match="rng state is malformed"):
        PromptPool([0, 1, 1], seed=0).load_state_dict(dict(state, rng={"version": 3}))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: PromptPool([], seed=0), "difficulties is empty"),
        (lambda: PromptPool([0], seed=0, promote_at=0.0), r"promote_at = 0.0 must be in \(0, 1\]"),
        (lambda: PromptPool([0], seed=0, promote_at=1.5), r"promote_at = 1.5 must be in \(0, 1\]"),
        (lambda: PromptPool([0], seed=0, min_trials=0), "min_trials = 0 must be >= 1"),
        (lambda: PromptPool([0.5], seed=0), r"difficulties\[\] = 0.5 must be an integer"),
        (lambda: PromptPool([0], seed=0).draw(0), "n = 0 must be >= 1"),
        (lambda: PromptPool([0, 1], seed=0).update(2, 1, 1), r"index = 2 is out of range \[0, 2\)"),
        (lambda: PromptPool([0, 1], seed=0).success_rate(-1), r"index = -1 is out of range \[0, 2\)"),
        (lambda: PromptPool([0], seed=0).update(0, 5, 4), r"successes = 5 must be in \[0, trials = 4\]"),
        (lambda: PromptPool([0], seed=0).update(0, -0.1, 4), r"successes = -0.1 must be in \[0, trials = 4\]"),
        (lambda: PromptPool([0], seed=0).update(0, float("nan"), 4), r"successes = nan must be in"),
        (lambda: PromptPool([0], seed=0).update(0, 0, 0), "trials = 0 must be >= 1"),
    ],
)
def test_bad_arguments_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
