"""The pipeline's cut (launch/parallel/stage_cut.py) against every possible cut, tried one by one,
and against DeepSpeed's own balanced partitioner (deepspeed.runtime.utils.partition_balanced)."""

import itertools
import random

import pytest

from launch.parallel.stage_cut import balanced_block_bounds, balanced_cut


def _runs(weights, cut):
    return [sum(weights[a:b]) for a, b in zip(cut, cut[1:])]


def _every_cut(n, parts):
    for inner in itertools.combinations(range(1, n), parts - 1):
        yield [0, *inner, n]


@pytest.mark.parametrize("seed", range(40))
def test_the_cut_is_the_most_even_of_those_with_the_lightest_heaviest_stage(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    parts = rng.randint(1, n)
    weights = [rng.choice([rng.randint(1, 5), rng.randint(1, 100)]) for _ in range(n)]
    cut = balanced_cut(weights, parts)
    assert cut[0] == 0 and cut[-1] == n and all(a < b for a, b in zip(cut, cut[1:]))  # non-empty, in order
    every = list(_every_cut(n, parts))
    lightest = min(max(_runs(weights, c)) for c in every)
    assert max(_runs(weights, cut)) == lightest
    even = min(sum(r * r for r in _runs(weights, c)) for c in every if max(_runs(weights, c)) == lightest)
    assert sum(r * r for r in _runs(weights, cut)) == even


def test_never_heavier_than_deepspeeds_partitioner():
    from deepspeed.runtime.utils import partition_balanced

    rng = random.Random(0)
    for _ in range(30):
        weights = [rng.randint(1, 1000) for _ in range(rng.randint(4, 30))]
        parts = rng.randint(2, min(8, len(weights)))
        theirs = [int(c) for c in partition_balanced(weights, parts)]
        assert max(_runs(weights, balanced_cut(weights, parts))) <= max(_runs(weights, theirs))


def test_block_bounds_put_the_embedding_first_and_the_head_last():
    # A heavy embedding and head each fill a stage of their own; the blocks share the middle.
    assert balanced_block_bounds(100, [10] * 6, 100, 4) == [0, 0, 3, 6, 6]
    assert balanced_block_bounds(1, [10] * 4, 1, 2) == [0, 2, 4]
    with pytest.raises(ValueError, match="cannot cut 4 items into 5"):
        balanced_cut([1, 2, 3, 4], 5)


@pytest.mark.parametrize("name", ["tiny", "small", "k2-2b", "kimi-k2"])
def test_the_presets_are_cut_where_deepspeeds_partitioner_cut_them(name):
    """launch.train cut its stages with partition_balanced before: runs keep their stages."""
    from deepspeed.runtime.utils import partition_balanced

    from launch.planning.params import layer_params
    from moe.config import preset

    cfg = preset(name)
    V, D = cfg.vocab_size, cfg.hidden_size
    for ep in (1, 2, 8):
        blocks = [(lambda n: n["matrices"] + n["vectors"] + n["experts"] // ep)(layer_params(cfg, layer))
                  for layer in range(cfg.num_layers)]
        weights = [V * D, *blocks, D + V * D]
        for pp in range(2, min(16, len(weights)) + 1):
            assert balanced_cut(weights, pp) == [int(c) for c in partition_balanced(weights, pp)], (ep, pp)
