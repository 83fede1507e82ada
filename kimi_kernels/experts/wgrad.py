"""Per-expert weight gradients as one grouped kernel: dW_e = sum over expert e's rows of L_i^T R_i.

Shape legend: T tokens, A = T*K assignments in expert-sorted order (rows i), E experts, M x N the
weight's shape. Either operand's rows may be read through the token index (the gather of the
forward, run the other way), so dY and X are never permuted into copies.

    dW_down_e    [D, F]  = sum_i dy_t^T (w_a act_i)      L = dy (gathered), R = w*act from swiglu_backward
    dW_gate_up_e [2F, D] = sum_i dh_i^T x_t              L = dh, R = x (gathered)

One program owns one (expert, M tile, N tile) and loops over that expert's rows, so each output
tile is written once with no atomics and an expert with no rows writes zeros.

Where the gathered rows' tokens are loaded is a tuning choice (TOKENS_AHEAD), left to the
autotuner until a GPU run settles it. Loaded in the iteration that uses them, they make the
gathered tile an indirect load, which Triton's software pipeliner gives only about half of
num_stages shared-memory buffers (2 of 4 on sm_90), though it copies the tokens asynchronously
too. Loaded one iteration ahead, the tiles get all num_stages buffers, but the pipeliner then
waits for the token load (an L2 hit: the index is T*K*4 bytes) in every iteration before issuing
the copies. `python -m kimi_kernels.compile_report --only wgrad` shows the buffers per candidate.

Likewise SORTED_TMA: the operand read in sorted order (dh for gate_up, w*act for down) can come
through a TMA descriptor over the expert's own rows instead of per-thread pointer loads, which
frees the registers and issue slots of its address arithmetic; the gathered one cannot (Hopper's
TMA has no row gather). Candidates with it need 16-byte aligned rows (TMA_OK).
"""

import torch
import triton
import triton.language as tl

from kimi_kernels.experts.routing import Routing
from kimi_kernels.tiles import (INTERP_BK, INTERP_BN, dot_types, interpreting, launch, prune_wgrad, tma_compatible,
                           wgrad_configs)


@triton.jit
def _expert_wgrad(
    l_ptr, stride_lm, r_ptr, stride_rm,
    c_ptr, stride_ce, stride_cm, stride_cn,
    token_ptr, offsets_ptr,
    M, N,
    L_GATHER: tl.constexpr, R_GATHER: tl.constexpr, TMA_OK: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TOKENS_AHEAD: tl.constexpr, SORTED_TMA: tl.constexpr,
):
    # TMA_OK (the sorted operand's rows are 16-byte aligned) only keys the autotuner, which prunes
    # the SORTED_TMA candidates without it.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BN)
    tiles_e = tl.cdiv(M, BM) * tiles_n
    e = pid // tiles_e
    pid_m = (pid % tiles_e) // tiles_n
    pid_n = pid % tiles_n
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BM, BN), dtype=ACC)
    offs_r = tl.arange(0, BK)
    if SORTED_TMA:
        # The operand read in sorted order, seen as the expert's own [rows, cols] matrix, so TMA
        # zero-fills the rows past its end exactly (no other expert's rows, even a NaN, leak in).
        # One row at least: an empty expert never loads, but a descriptor may not be empty.
        rows_e = tl.maximum(end - start, 1)
        if L_GATHER:
            r_desc = tl.make_tensor_descriptor(r_ptr + start.to(tl.int64) * stride_rm, shape=[rows_e, N],
                                               strides=[stride_rm, 1], block_shape=[BK, BN])
        else:
            l_desc = tl.make_tensor_descriptor(l_ptr + start.to(tl.int64) * stride_lm, shape=[rows_e, M],
                                               strides=[stride_lm, 1], block_shape=[BK, BM])
    if TOKENS_AHEAD:
        tok_next = tl.load(token_ptr + start + offs_r, mask=start + offs_r < end, other=0)
    for r0 in range(start, end, BK):
        rows = r0 + offs_r
        ok = rows < end
        rows = tl.where(ok, rows, start)  # the L tile is zeroed on these, so R may read any valid row
        if TOKENS_AHEAD:  # rows past the end read token 0, a valid row, under a zeroed L tile too
            tok = tok_next
            tok_next = tl.load(token_ptr + r0 + BK + offs_r, mask=r0 + BK + offs_r < end, other=0)
        else:
            tok = tl.load(token_ptr + rows)
        # M/N tails are masked rather than clamped so the contiguous dims still vectorise.
        if L_GATHER:
            l_src = tok.to(tl.int64)
        else:
            l_src = rows.to(tl.int64)
        if R_GATHER:
            r_src = tok.to(tl.int64)
        else:
            r_src = rows.to(tl.int64)
        if SORTED_TMA and not L_GATHER:
            l_t = l_desc.load([r0 - start, pid_m * BM]).T  # [BM, BK]; zeros past the expert's rows
        else:
            l_t = tl.load(l_ptr + l_src[None, :] * stride_lm + offs_m[:, None],
                          mask=ok[None, :] & mask_m[:, None], other=0.0)  # [BM, BK]
        if SORTED_TMA and L_GATHER:
            r_t = r_desc.load([r0 - start, pid_n * BN])  # [BK, BN]
        else:
            r_t = tl.load(r_ptr + r_src[:, None] * stride_rm + offs_n[None, :], mask=mask_n[None, :], other=0.0)
        acc = tl.dot(l_t, r_t, acc, input_precision=PRECISION, out_dtype=ACC)

    c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_kernel_tuned = triton.autotune(wgrad_configs(), key=["M", "N", "L_GATHER", "R_GATHER", "TMA_OK"],
                                prune_configs_by={"early_config_prune": prune_wgrad})(_expert_wgrad)


def expert_wgrad(l_XM, r_XN, r: Routing, l_gather: bool, r_gather: bool, out_dtype=None,
                 config: triton.Config | None = None):
    """dW [E, M, N] = sum over each expert's sorted rows i of L[src_l(i)]^T R[src_r(i)].

    src is the row's token when gathering, else i itself. `config` runs one candidate of
    `wgrad_configs()` instead of the autotuner's pick (the tests run each one: the autotuner keeps
    only the fastest candidate's output, so the others are never checked by a normal call).
    """
    assert l_XM.numel() == 0 or (l_XM.stride(1) == 1 and r_XN.stride(1) == 1), "wgrad operands must be row-major"
    M, N, E = l_XM.shape[1], r_XN.shape[1], r.num_experts
    c_EMN = torch.empty(E, M, N, device=l_XM.device, dtype=out_dtype or l_XM.dtype)
    acc, precision = dot_types(l_XM.dtype)
    args = (
        l_XM, l_XM.stride(0), r_XN, r_XN.stride(0), c_EMN, *c_EMN.stride(),
        r.token_A, r.offsets_E1, M, N,
    )
    sorted_XK = r_XN if l_gather else l_XM
    consts = dict(L_GATHER=l_gather, R_GATHER=r_gather, TMA_OK=tma_compatible(sorted_XK), ACC=acc, PRECISION=precision)
    if config is None and interpreting():
        config = triton.Config(dict(BM=INTERP_BN, BN=INTERP_BN, BK=INTERP_BK, TOKENS_AHEAD=True, SORTED_TMA=False))
    if config is not None and config.kwargs["SORTED_TMA"] and not (l_gather != r_gather and consts["TMA_OK"]):
        raise ValueError(f"wgrad config {config} reads the sorted operand through TMA, which needs exactly one "
                         f"gathered operand (l_gather={l_gather}, r_gather={r_gather}) and 16-byte aligned rows")
    launch(_expert_wgrad, _kernel_tuned, lambda m: (E * triton.cdiv(M, m["BM"]) * triton.cdiv(N, m["BN"]),),
           args, consts, config)
    return c_EMN
