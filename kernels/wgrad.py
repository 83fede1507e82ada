"""Per-expert weight gradients as one grouped kernel: dW_e = sum over expert e's rows of L_i^T R_i.

Shape legend: T tokens, A = T*K assignments in expert-sorted order (rows i), E experts, M x N the
weight's shape. Either operand's rows may be read through the token index (the gather of the
forward, run the other way), so dY and X are never permuted into copies.

    dW_down_e    [D, F]  = sum_i dy_t^T (w_a act_i)      L = dy (gathered), R = w*act from swiglu_backward
    dW_gate_up_e [2F, D] = sum_i dh_i^T x_t              L = dh, R = x (gathered)

One program owns one (expert, M tile, N tile) and loops over that expert's rows, so each output
tile is written once with no atomics and an expert with no rows writes zeros.
"""

import torch
import triton
import triton.language as tl

from kernels.routing import Routing
from kernels.tiles import INTERP_BK, INTERP_BN, dot_types, interpreting, prune_wgrad, wgrad_configs


@triton.jit
def _expert_wgrad(
    l_ptr, stride_lm, r_ptr, stride_rm,
    c_ptr, stride_ce, stride_cm, stride_cn,
    token_ptr, offsets_ptr,
    M, N,
    L_GATHER: tl.constexpr, R_GATHER: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
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
    for r0 in range(start, end, BK):
        rows = r0 + tl.arange(0, BK)
        ok = rows < end
        rows = tl.where(ok, rows, start)  # the L tile is zeroed on these, so R may read any valid row
        # M/N tails are masked rather than clamped so the contiguous dims still vectorise.
        if L_GATHER:
            l_src = tl.load(token_ptr + rows).to(tl.int64)
        else:
            l_src = rows.to(tl.int64)
        if R_GATHER:
            r_src = tl.load(token_ptr + rows).to(tl.int64)
        else:
            r_src = rows.to(tl.int64)
        l_t = tl.load(l_ptr + l_src[None, :] * stride_lm + offs_m[:, None],
                      mask=ok[None, :] & mask_m[:, None], other=0.0)  # [BM, BK]
        r_t = tl.load(r_ptr + r_src[:, None] * stride_rm + offs_n[None, :], mask=mask_n[None, :], other=0.0)
        acc = tl.dot(l_t, r_t, acc, input_precision=PRECISION, out_dtype=ACC)

    c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_kernel_tuned = triton.autotune(wgrad_configs(), key=["M", "N", "L_GATHER", "R_GATHER"],
                                prune_configs_by={"early_config_prune": prune_wgrad})(_expert_wgrad)


def expert_wgrad(l_XM, r_XN, r: Routing, l_gather: bool, r_gather: bool, out_dtype=None):
    """dW [E, M, N] = sum over each expert's sorted rows i of L[src_l(i)]^T R[src_r(i)].

    src is the row's token when gathering, else i itself.
    """
    assert l_XM.numel() == 0 or (l_XM.stride(1) == 1 and r_XN.stride(1) == 1), "wgrad operands must be row-major"
    M, N, E = l_XM.shape[1], r_XN.shape[1], r.num_experts
    c_EMN = torch.empty(E, M, N, device=l_XM.device, dtype=out_dtype or l_XM.dtype)
    acc, precision = dot_types(l_XM.dtype)
    args = (
        l_XM, l_XM.stride(0), r_XN, r_XN.stride(0), c_EMN, *c_EMN.stride(),
        r.token_A, r.offsets_E1, M, N,
    )
    consts = dict(L_GATHER=l_gather, R_GATHER=r_gather, ACC=acc, PRECISION=precision)
    if interpreting():
        grid = (E * triton.cdiv(M, INTERP_BN) * triton.cdiv(N, INTERP_BN),)
        _expert_wgrad[grid](*args, **consts, BM=INTERP_BN, BN=INTERP_BN, BK=INTERP_BK)
    else:
        _kernel_tuned[lambda m: (E * triton.cdiv(M, m["BM"]) * triton.cdiv(N, m["BN"]),)](*args, **consts)
    return c_EMN
