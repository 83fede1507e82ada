"""Which problems an RL iteration samples: Kimi k1.5's curriculum and prioritized sampling (arXiv
2501.12599, §2.4, "Sampling strategies").

Curriculum. The distinct difficulties, sorted ascending, are the levels. Problems with difficulty <= the
current level are eligible ("active"); the pool starts at the lowest level. After each update, while
  - the pooled success rate (sum of successes / sum of trials) of the eligible problems with at least
    `min_trials` trials is >= promote_at, and
  - at least half of the current level's problems have `min_trials` trials,
the level moves up one (easier problems stay in; it never moves down).

Prioritized sampling. Within the eligible set, problem i is drawn with probability proportional to
1 - s_i, s_i its success rate so far (0 when never tried), so unsolved problems come back and solved ones
stop wasting samples; when every eligible weight is 0 (all solved), draws are uniform.

The RNG is a `random.Random`, whose state goes into state_dict as JSON lists: a resumed pool draws
exactly what an uninterrupted one would.
"""

from __future__ import annotations

import bisect
import itertools
import numbers
import operator
import random
from collections.abc import Sequence
from fractions import Fraction


class PromptPool:
    """Problem indices 0..N-1 with their difficulties; see the module docstring for the rules.

    `level` is the current difficulty value (an element of `levels`), not its position.
    """

    def __init__(self, difficulties: Sequence[int], seed: int, promote_at: float = 0.6, min_trials: int = 4):
        if len(difficulties) == 0:
            raise ValueError("PromptPool: difficulties is empty; give one difficulty per problem")
        if not (isinstance(promote_at, numbers.Real) and 0 < promote_at <= 1):
            raise ValueError(f"PromptPool: promote_at = {promote_at!r} must be in (0, 1]")
        if _integer("min_trials", min_trials) < 1:
            raise ValueError(f"PromptPool: min_trials = {min_trials!r} must be >= 1")
        self._difficulties = [_integer("difficulties[]", d) for d in difficulties]
        self._levels = tuple(sorted(set(self._difficulties)))
        position = {d: k for k, d in enumerate(self._levels)}
        self._level_of = [position[d] for d in self._difficulties]  # each problem's level, as a position
        self._level_size = [self._level_of.count(k) for k in range(len(self._levels))]
        self._level = 0  # position in _levels
        self._successes = [0.0] * len(self._difficulties)
        self._trials = [0] * len(self._difficulties)
        self._promote_at = Fraction(float(promote_at))
        self._min_trials = operator.index(min_trials)
        self._rng = random.Random(seed)
        self._recount()

    def _recount(self) -> None:
        """Per level, the problems with >= min_trials trials: their count and summed successes and trials,
        kept up to date by update() so that promotion costs O(levels), not O(problems).

        The successes sum is an exact Fraction of the per-problem floats: a float running sum would
        depend on the order of the updates, and a resumed pool, which recounts, could then promote one
        iteration earlier or later than the uninterrupted one at a rate right on promote_at.
        """
        L = len(self._levels)
        self._done_count, self._done_successes, self._done_trials = [0] * L, [Fraction(0)] * L, [0] * L
        for i, t in enumerate(self._trials):
            if t >= self._min_trials:
                k = self._level_of[i]
                self._done_count[k] += 1
                self._done_successes[k] += Fraction(self._successes[i])
                self._done_trials[k] += t

    @property
    def levels(self) -> tuple[int, ...]:
        return self._levels

    @property
    def level(self) -> int:
        return self._levels[self._level]

    @property
    def active(self) -> list[int]:
        """The indices currently eligible: difficulty <= level."""
        return [i for i, d in enumerate(self._difficulties) if d <= self.level]

    def success_rate(self, index: int) -> float:
        """s_i: successes / trials so far, 0.0 when never tried."""
        i = self._index(index)
        return self._successes[i] / self._trials[i] if self._trials[i] else 0.0

    def draw(self, n: int) -> list[int]:
        """n problem indices from the eligible set, i.i.d. with replacement, P(i) ∝ 1 - s_i."""
        if _integer("n", n) < 1:
            raise ValueError(f"PromptPool.draw: n = {n!r} must be >= 1")
        active = self.active
        weights = [1.0 - self.success_rate(i) for i in active]
        if not any(w > 0 for w in weights):
            return [active[int(self._rng.random() * len(active))] for _ in range(n)]
        cumulative = list(itertools.accumulate(weights))
        last = max(k for k, w in enumerate(weights) if w > 0)
        # u < cumulative[-1] up to rounding, which could land on the total: clamp to the last drawable one.
        # A zero-weight problem adds an empty interval, so bisect never returns it.
        return [active[min(bisect.bisect_right(cumulative, self._rng.random() * cumulative[-1]), last)]
                for _ in range(n)]

    def update(self, index: int, successes: float, trials: int) -> None:
        """Add a problem's results of this iteration (successes may be a sum of rewards in [0, trials]),
        then promote the curriculum as far as its rule allows."""
        i = self._index(index)
        if _integer("trials", trials) < 1:
            raise ValueError(f"PromptPool.update: trials = {trials!r} must be >= 1")
        if not (isinstance(successes, numbers.Real) and 0 <= successes <= trials):
            raise ValueError(f"PromptPool.update: successes = {successes!r} must be in [0, trials = {trials}]")
        k, was_done = self._level_of[i], self._trials[i] >= self._min_trials
        before = self._successes[i]
        self._trials[i] += int(trials)
        # min: fractional successes summed in floats may overshoot trials by an ulp, making 1 - s_i < 0
        self._successes[i] = min(before + float(successes), float(self._trials[i]))
        if self._trials[i] >= self._min_trials:  # crossing min_trials brings its earlier results in too
            self._done_count[k] += not was_done
            self._done_successes[k] += Fraction(self._successes[i]) - (Fraction(before) if was_done else 0)
            self._done_trials[k] += int(trials) if was_done else self._trials[i]
        while self._level + 1 < len(self._levels) and self._ready_to_promote():
            self._level += 1

    def _ready_to_promote(self) -> bool:
        trials = sum(self._done_trials[: self._level + 1])
        if trials == 0 or sum(self._done_successes[: self._level + 1]) < self._promote_at * trials:
            return False
        return 2 * self._done_count[self._level] >= self._level_size[self._level]

    def state_dict(self) -> dict:
        """JSON-serialisable: difficulties (to recognise the pool), counts, level and RNG state.
        promote_at and min_trials are configuration and come from the constructor on resume."""
        version, internal, gauss = self._rng.getstate()
        return {"difficulties": list(self._difficulties), "successes": list(self._successes),
                "trials": list(self._trials), "level": self._level,
                "rng": {"version": version, "internal": list(internal), "gauss_next": gauss}}

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict's output (after a JSON round trip too); the next draws equal those of the
        pool that saved it. ValueError if it belongs to another pool or is malformed."""
        missing = {"difficulties", "successes", "trials", "level", "rng"} - set(state)
        if missing:
            raise ValueError(f"PromptPool.load_state_dict: state lacks {', '.join(sorted(missing))}")
        if list(state["difficulties"]) != self._difficulties:
            raise ValueError(f"PromptPool.load_state_dict: the state is of another pool: its difficulties "
                             f"({len(state['difficulties'])} problems) differ from this pool's "
                             f"({len(self._difficulties)} problems)")
        successes, trials, level = list(state["successes"]), list(state["trials"]), state["level"]
        N = len(self._difficulties)
        if len(successes) != N or len(trials) != N:
            raise ValueError(f"PromptPool.load_state_dict: successes and trials have {len(successes)} and "
                             f"{len(trials)} entries, expected {N}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 and isinstance(s, numbers.Real)
                   and 0 <= s <= t for s, t in zip(successes, trials)):
            raise ValueError("PromptPool.load_state_dict: each problem needs trials an int >= 0 and "
                             "successes in [0, trials]")
        if not (isinstance(level, int) and not isinstance(level, bool) and 0 <= level < len(self._levels)):
            raise ValueError(f"PromptPool.load_state_dict: level = {level!r} must be in [0, {len(self._levels)})")
        rng = random.Random()
        try:
            rng.setstate((state["rng"]["version"], tuple(state["rng"]["internal"]), state["rng"]["gauss_next"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"PromptPool.load_state_dict: rng state is malformed: {e!r}") from None
        self._rng = rng
        self._successes = [float(s) for s in successes]
        self._trials = trials
        self._level = level
        self._recount()

    def _index(self, index: int) -> int:
        i = _integer("index", index)
        if not 0 <= i < len(self._difficulties):
            raise ValueError(f"PromptPool: index = {index!r} is out of range [0, {len(self._difficulties)})")
        return i


def _integer(name: str, value) -> int:
    """`value` as an int if it is an integer (numpy's included, bool not), else ValueError naming `name`."""
    if isinstance(value, bool):
        raise ValueError(f"PromptPool: {name} = {value!r} must be an integer, not a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"PromptPool: {name} = {value!r} must be an integer") from None
