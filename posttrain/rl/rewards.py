"""Reward shaping for one prompt's samples, and the loop detector that ends degenerate samples early.

- length_penalty: Kimi k1.5's length reward (arXiv 2501.12599, §2.3.3), against overthinking;
- loop_period: the tail-repetition test run after each sampled token (k1.5 §2.6.2 ends such loops);
- shape_rewards: correctness, the penalties for truncated and looping samples, and the length reward.

Plain Python on lists: these run per prompt (or per token) in the sampler, on a few numbers each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

FINISH_REASONS = ("stop", "length", "repeat")  # ended by EOS / hit its token budget / ended by loop_period


def length_penalty(lengths: Sequence[int], correct: Sequence[bool]) -> list[float]:
    """k1.5 §2.3.3: per sample j, lambda_j = 0.5 - (len_j - min_len) / (max_len - min_len).

    A correct sample gets lambda_j (the shortest +0.5, the longest -0.5), a wrong one min(0, lambda_j):
    being short never rewards a wrong answer, being long still costs. All zero when every length is
    equal (a single sample included): there is nothing to compare.
    """
    if len(lengths) == 0:
        raise ValueError("length_penalty: lengths is empty; give one prompt's samples (at least one)")
    if len(correct) != len(lengths):
        raise ValueError(f"length_penalty: lengths has {len(lengths)} entries but correct has {len(correct)}")
    if any(n < 0 for n in lengths):
        raise ValueError(f"length_penalty: lengths = {list(lengths)} has a negative length")
    lo, hi = min(lengths), max(lengths)
    if lo == hi:
        return [0.0] * len(lengths)
    lambdas = [0.5 - (n - lo) / (hi - lo) for n in lengths]
    return [lam if ok else min(0.0, lam) for lam, ok in zip(lambdas, correct)]


def loop_period(tokens: Sequence[int], max_period: int, repeats: int) -> int | None:
    """The smallest p in [1, max_period] such that the last p * repeats tokens are one block of p tokens
    repeated `repeats` times in a row, else None (also when the sequence is too short for any p).

    Reads only the last W = max_period * repeats tokens, reversed into R (R[0] the newest). The tail of
    length p * repeats has period p iff R[k] == R[k + p] for k < p * (repeats - 1), i.e. iff the Z-value
    Z[p] (the longest common prefix of R and R[p:]) is >= p * (repeats - 1). The Z-algorithm computes
    Z[1..max_period] in order in O(W) worst case (each comparison either fails or moves the rightmost
    match boundary), and in about max_period steps on a tail that does not repeat.
    """
    if max_period < 1:
        raise ValueError(f"loop_period: max_period = {max_period!r} must be >= 1")
    if repeats < 2:
        raise ValueError(f"loop_period: repeats = {repeats!r} must be >= 2 (every tail repeats itself once)")
    R = list(tokens[-max_period * repeats:])[::-1]
    W = len(R)
    Z = [0] * (min(max_period, W - 1) + 1)
    left = right = 0  # R[left:right] == R[0:right - left], the match reaching furthest right so far
    for p in range(1, len(Z)):
        z = min(right - p, Z[p - left]) if p < right else 0
        while p + z < W and R[z] == R[p + z]:
            z += 1
        if z >= p * (repeats - 1):
            return p
        Z[p] = z
        if p + z > right:
            left, right = p, p + z
    return None


def shape_rewards(correct: Sequence[bool], lengths: Sequence[int], finish: Sequence[str], *,
                  length_weight: float = 0.0, truncation_penalty: float = 0.0,
                  repetition_penalty: float = 0.0) -> list[float]:
    """One prompt's rewards: 1.0 if correct else 0.0, except

    - finish "length" (hit the token budget without ending; Kimi K2 penalises truncated responses):
      -truncation_penalty, and it counts as wrong whatever its answer;
    - finish "repeat" (ended by loop_period): -repetition_penalty, and it counts as wrong;

    plus, when length_weight > 0, length_weight * length_penalty(lengths, correct) with those samples
    counted as wrong (so a long truncated sample pays the length term too, a short one gains nothing).
    """
    if not len(correct) == len(lengths) == len(finish):
        raise ValueError(f"shape_rewards: correct, lengths and finish have {len(correct)}, {len(lengths)} and "
                         f"{len(finish)} entries; give one entry per sample to each")
    if len(correct) == 0:
        raise ValueError("shape_rewards: no samples; give one prompt's samples (at least one)")
    for reason in finish:
        if reason not in FINISH_REASONS:
            raise ValueError(f"shape_rewards: finish = {reason!r} is not one of {', '.join(FINISH_REASONS)}")
    for name, value in (("length_weight", length_weight), ("truncation_penalty", truncation_penalty),
                        ("repetition_penalty", repetition_penalty)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"shape_rewards: {name} = {value!r} must be a finite number >= 0")
    scored = [bool(ok) and reason == "stop" for ok, reason in zip(correct, finish)]
    penalty = {"length": -float(truncation_penalty), "repeat": -float(repetition_penalty)}
    rewards = [penalty.get(reason, 1.0 if ok else 0.0) for ok, reason in zip(scored, finish)]
    if length_weight > 0:
        rewards = [r + length_weight * lam for r, lam in zip(rewards, length_penalty(lengths, scored))]
    return rewards
