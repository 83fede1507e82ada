"""Distributed Muon's bookkeeping (launch/parallel/zero_muon.py) on real models' Muon groups, without processes:
which matrices each rank orthogonalises and which gradient range it must fetch. The exchange itself
runs against the single-process optimizer in tests/test_distributed.py (DP=2 under ZeRO-1/2, EP=2).
"""

import pytest
import torch

from launch.parallel.zero_muon import matrix_momentum, needed_range, overlapping_matrices
from moe.config import preset
from moe.model import Transformer
from optim.muon import matrices, model_param_groups


def test_overlapping_matrices():
    # 3 matrices of 10 elements from offset 100: [100, 110), [110, 120), [120, 130).
    assert overlapping_matrices(100, 30, 10, 0, 100) == (0, 0)  # ends where the parameter starts
    assert overlapping_matrices(100, 30, 10, 105, 106) == (0, 1)
    assert overlapping_matrices(100, 30, 10, 109, 111) == (0, 2)  # straddles a matrix boundary
    assert overlapping_matrices(100, 30, 10, 110, 120) == (1, 2)  # exactly one matrix
    assert overlapping_matrices(100, 30, 10, 50, 500) == (0, 3)
    assert overlapping_matrices(100, 30, 10, 130, 140) == (0, 0)


def zero_layouts(preset_name, ranks):
    """Each Muon group of the model as ZeRO-1/2 lays it out: parameters end to end, padded to a
    multiple of `ranks`, one slice of S elements per rank. Yields (spans, matrix sizes, S)."""
    with torch.device("meta"):
        model = Transformer(preset(preset_name))
    for group in model_param_groups(model):
        if not group["use_muon"]:
            continue
        spans, offset = [], 0
        for p in group["params"]:
            spans.append((offset, p.shape))
            offset += p.numel()
        matrix_numels = [shape.numel() // matrices(shape, group["row_blocks"])[0] for _, shape in spans]
        yield spans, matrix_numels, -(-offset // ranks)


@pytest.mark.parametrize("preset_name, ranks", [("tiny", 2), ("tiny", 3), ("small", 8), ("k2-2b", 8), ("k2-2b", 64)])
def test_each_rank_takes_its_share_of_matrices_and_fetches_little_more_than_its_slice(preset_name, ranks):
    for spans, matrix_numels, S in zero_layouts(preset_name, ranks):
        total = sum(shape.numel() // m for (_, shape), m in zip(spans, matrix_numels))
        done = [set() for _ in spans]
        taken = 0
        for r in range(ranks):
            lo, hi = r * S, (r + 1) * S
            need_lo, need_hi = needed_range(spans, matrix_numels, lo, hi)
            for j, ((offset, shape), m) in enumerate(zip(spans, matrix_numels)):
                b_lo, b_hi = overlapping_matrices(offset, shape.numel(), m, lo, hi)
                done[j].update(range(b_lo, b_hi))
                taken += b_hi - b_lo
                if b_lo < b_hi:  # every matrix it computes lies in the range it fetches
                    assert need_lo <= offset + b_lo * m and offset + b_hi * m <= need_hi
            # Its own slice (where parameters reach) plus at most one matrix sticking out at each end.
            assert need_hi - need_lo <= (hi - lo) + 2 * max(matrix_numels)
        assert all(d == set(range(shape.numel() // m)) for d, (_, shape), m in zip(done, spans, matrix_numels))
        assert taken <= total + ranks - 1  # a matrix on a slice boundary is computed by both neighbours


def test_k2_2b_fused_gate_up_is_split_between_ranks_by_expert():
    """k2-2b's gate/up group over 8 ranks: each [64, 1024, 1536] stack is 128 matrices, so a rank
    computes about an eighth of them rather than every stack its slice touches."""
    spans, matrix_numels, S = next(layout for layout in zero_layouts("k2-2b", 8) if layout[0][0][1][-2] == 1024)
    per_rank = []
    for r in range(8):
        per_rank.append(sum(b_hi - b_lo for b_lo, b_hi in (
            overlapping_matrices(offset, shape.numel(), m, r * S, (r + 1) * S) for (offset, shape), m in zip(spans, matrix_numels))))
    total = sum(shape.numel() // m for (_, shape), m in zip(spans, matrix_numels))
    assert total == 15 * 128  # 15 MoE layers x 64 experts x (gate, up)
    assert max(per_rank) <= total // 8 + 2


def test_momentum_saved_for_the_whole_parameter_gives_this_ranks_matrices():
    grad = torch.zeros(3, 4, 5)  # matrices [2, 5) of a [4, 8, 5] gate/up stack: 8 matrices of [4, 5]
    saved = torch.arange(4 * 8 * 5, dtype=torch.float32).view(4, 8, 5)
    got = matrix_momentum(saved, grad, 2, 5)
    assert torch.equal(got, saved.view(8, 4, 5)[2:5])
    assert torch.equal(matrix_momentum(None, grad, 2, 5), torch.zeros(3, 4, 5))
    assert matrix_momentum(got, grad, 2, 5) is got
