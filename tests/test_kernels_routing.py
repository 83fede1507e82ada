"""Routing metadata and the (un)permutation it implies: invariants, and agreement with megatron-core.

Shape legend: T tokens, K experts per token, E experts, A = T*K, D hidden.
"""

import pytest
import torch

from kimi_kernels.testing import DEVICE, ROUTINGS, check_kernels_interpreted, use_interpreter_without_cuda

use_interpreter_without_cuda()
from kimi_kernels.experts.combine import combine  # noqa: E402  (after the interpreter switch)
from kimi_kernels.experts.routing import build_routing  # noqa: E402

CASES = [
    # (T, K, E, block_m, routing)
    (19, 3, 5, 16, "random"),  # A = 57: not a multiple of the block, blocks straddle experts
    (64, 2, 8, 16, "balanced"),  # every expert exactly 16 rows: whole blocks only
    (40, 2, 8, 16, "one_expert"),  # two experts hold everything, six are empty
    (33, 3, 9, 32, "empty_experts"),  # empty experts between full ones
    (1, 4, 4, 16, "random"),  # T = 1, K = E
    (16, 8, 384, 16, "skewed"),  # E = 384, k = 8: many more experts than blocks
    (257, 1, 7, 64, "random"),  # K = 1 (the expert-parallel call)
    (0, 2, 4, 16, "random"),  # no tokens at all (an EP rank that received nothing)
]


def _ids(T, K, E, routing, seed=0):
    return ROUTINGS[routing](T, K, E, torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.fixture(scope="module", autouse=True)
def _interpreted():
    check_kernels_interpreted()


@pytest.mark.parametrize("T,K,E,bm,routing", CASES)
def test_routing_invariants(T, K, E, bm, routing):
    ids_TK = _ids(T, K, E, routing)
    r = build_routing(ids_TK, E, bm)
    ids_A = ids_TK.reshape(-1).cpu()
    order = r.order_A.long().cpu()
    A = T * K
    assert torch.equal(order.sort().values, torch.arange(A)), "order_A is not a permutation"
    sorted_ids = ids_A[order]
    assert bool((sorted_ids[1:] >= sorted_ids[:-1]).all()), "not sorted by expert"
    same = sorted_ids[1:] == sorted_ids[:-1]
    assert bool((order[1:][same] > order[:-1][same]).all()), "sort is not stable"
    assert torch.equal(r.token_A.long().cpu(), order // K)
    offsets = r.offsets_E1.long().cpu()
    assert offsets[0] == 0 and offsets[-1] == A
    assert torch.equal(offsets.diff(), torch.bincount(ids_A, minlength=E))
    # Each real block lies inside its expert's rows; together they cover every row exactly once.
    expert_B, row_B = r.block_expert_B.long().cpu(), r.block_row_B.long().cpu()
    real = expert_B < E
    assert r.num_blocks == -(-A // bm) + min(E, A)
    assert bool(real.sum() <= r.num_blocks) and bool((real[1:] <= real[:-1]).all()), "sentinels not at the end"
    covered = torch.zeros(A, dtype=torch.long)
    for e, row in zip(expert_B[real].tolist(), row_B[real].tolist()):
        assert offsets[e] <= row < offsets[e + 1]
        covered[row:min(row + bm, offsets[e + 1])] += 1
    assert torch.equal(covered, torch.ones(A, dtype=torch.long))


def _megatron():
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    return moe_utils.permute, moe_utils.unpermute


@pytest.mark.parametrize("T,K,E,bm,routing", [c for c in CASES if c[0] > 0])
def test_permutation_matches_megatron(T, K, E, bm, routing):
    permute, _ = _megatron()
    ids_TK = _ids(T, K, E, routing)
    x_TD = torch.randn(T, 24, device=DEVICE)
    routing_map_TE = torch.zeros(T, E, dtype=torch.bool, device=DEVICE).scatter_(1, ids_TK, True)
    permuted_AD, _, sorted_indices_A = permute(x_TD, routing_map_TE, num_out_tokens=T * K)
    r = build_routing(ids_TK, E, bm)
    assert torch.equal(r.token_A.long(), sorted_indices_A)
    assert torch.equal(x_TD[r.token_A.long()], permuted_AD)
    counts_E = routing_map_TE.sum(0)
    assert torch.equal(r.offsets_E1[1:].long(), counts_E.cumsum(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,K,E,bm,routing", [c for c in CASES if c[0] > 0])
def test_combine_matches_megatron_unpermute(T, K, E, bm, routing, dtype):
    """Our combine = scatter of each sorted row to its token-major slot (gate-weighted, as the down
    GEMM's epilogue does) + per-token sum; megatron = weighted scatter_add of the sorted rows."""
    permute, unpermute = _megatron()
    gen = torch.Generator().manual_seed(1)
    ids_TK = _ids(T, K, E, routing)
    D = 40  # not a multiple of the combine's column tile
    x_TD = torch.randn(T, D, generator=gen).to(DEVICE, dtype)
    w_TK = torch.rand(T, K, generator=gen).to(DEVICE, dtype)
    routing_map_TE = torch.zeros(T, E, dtype=torch.bool, device=DEVICE).scatter_(1, ids_TK, True)
    probs_TE = torch.zeros(T, E, dtype=dtype, device=DEVICE).scatter_(1, ids_TK, w_TK)
    permuted_AD, _, sorted_indices_A = permute(x_TD, routing_map_TE, num_out_tokens=T * K)
    expected_TD = unpermute(permuted_AD.double(), sorted_indices_A, x_TD.shape, probs=probs_TE.double(),
                            routing_map=routing_map_TE)
    r = build_routing(ids_TK, E, bm)
    order = r.order_A.long()
    src_AD = torch.empty(T * K, D, dtype=dtype, device=DEVICE)
    src_AD[order] = (permuted_AD.double() * w_TK.reshape(-1)[order, None].double()).to(dtype)
    y_TD = combine(src_AD, K)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(y_TD.double(), expected_TD, rtol=tol, atol=tol * expected_TD.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA: checks that routing never synchronises with the host")
def test_routing_has_no_host_sync():
    ids_TK = _ids(4096, 8, 384, "skewed")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        build_routing(ids_TK, 384, 128)
    finally:
        torch.cuda.set_sync_debug_mode("default")
