"""Row-gathered grouped GEMM over expert-sorted rows: one Triton kernel, three epilogues.

Shape legend: T tokens, D hidden, F expert FFN width, E experts, A = T*K assignments,
i = sorted position (expert-major), a = flat assignment index t*K + k (see `kimi_kernels.experts.routing`).

Each program owns BM sorted rows of one expert and BN output columns, and computes
C[i, n] = sum_k A[src(i), k] * W_e[n, k]. The activation rows are read straight from their
unpermuted home through the index list (src = token of row i), so no permuted copy of X or dY
ever exists; the weights are addressed by strides, so the same loop serves W and W^T.

MODE (compile-time):
  SWIGLU_FWD  A = x gathered by token, W = gate_up_e ([2F, D] seen as [N=F, K=D]); two
              accumulators share each A tile (gate rows n and up rows F+n). Writes act = silu(g)*u
              [A, F] and, when training, the pre-activations h = [g | u] [A, 2F] for backward.
  SCATTER     A in sorted order (act or dh), any W_e; the output row goes to the assignment's own
              row a (token-major), optionally scaled by its gate weight in fp32. Used for the down
              projection (forward) and for dX (backward). With K = 1 row a is the token itself, so
              the result needs no combine.
  SWIGLU_BWD  A = dy gathered by token, W = down_e ([D, F] seen as [N=F, K=D]), giving
              g_act = dy_t @ down_e. The epilogue reloads h and writes dh = [dg | du] [A, 2F] and,
              per row and N tile, the partial dot <g_act, act> whose sum over tiles is the gate-weight
              gradient (dL/dw_a = <dy_t, down_e act_a>), so the forward output is never stored; and
              w_a * act_i, the operand of the down projection's weight gradient. The epilogue runs
              on the accumulator's two column halves in turn (a register-only split): on the whole
              tile its temporaries spilled 1.3-5.9 KB per thread on sm_90 in every candidate, now
              under 0.1 KB in the one the H100 picks (`python -m kimi_kernels.compile_report`).
"""

import torch
import triton
import triton.language as tl

from kimi_kernels.experts.routing import Routing
from kimi_kernels.tiles import (INTERP_BK, INTERP_BN, dot_types, gemm_configs, interpreting, launch, prune_gemm,
                           tma_compatible)

# constexpr so the kernel can branch on them at compile time; the launchers pass them as MODE.
SWIGLU_FWD, SCATTER, SWIGLU_BWD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _expert_gemm(
    a_ptr, stride_am, stride_ak,
    w_ptr, stride_we, stride_wn, stride_wk,
    c_ptr, stride_cm, stride_cn,
    h_ptr, stride_hm,  # [A, 2F] gate|up pre-activations: written by SWIGLU_FWD, read by SWIGLU_BWD
    dwp_ptr, stride_dwpm,  # SWIGLU_BWD: fp32/fp64 [A, >= cdiv(F, BN)] partial gate-weight gradients
    act_w_ptr,  # SWIGLU_BWD: [A, F] w_a * act_i, the down-projection's weight-gradient operand
    token_ptr, order_ptr, gate_w_ptr,
    block_expert_ptr, block_row_ptr, offsets_ptr,
    N, KD, num_blocks, E,
    MODE: tl.constexpr, STORE_H: tl.constexpr, SCALE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    W_KMAJOR: tl.constexpr, W_TMA_OK: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, W_TMA: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
):
    # W_KMAJOR: W_e's K dim is contiguous (stride_wk == 1), else its N dim is. W_TMA_OK (the weights
    # can back a TMA descriptor) only keys the autotuner, which prunes the W_TMA candidates without it.
    # Grouped launch order: GROUP_M consecutive row blocks (usually one expert) sweep the N tiles
    # together, so each weight tile is fetched from HBM once per group rather than once per block.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BN)
    pids_in_group = GROUP_M * num_pid_n
    first_m = (pid // pids_in_group) * GROUP_M
    group_m = tl.minimum(num_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_in_group) % group_m
    pid_n = (pid % pids_in_group) // group_m

    e = tl.load(block_expert_ptr + pid_m)
    if e >= E:  # past the real block count (the grid is an upper bound, see kimi_kernels.experts.routing)
        return
    row0 = tl.load(block_row_ptr + pid_m)
    row_end = tl.load(offsets_ptr + e + 1)
    rows = row0 + tl.arange(0, BM)
    mask_m = rows < row_end
    rows = tl.where(mask_m, rows, row0)  # tail rows re-read a valid row instead of masking each load
    if MODE == SCATTER:
        src = rows.to(tl.int64)
    else:
        src = tl.load(token_ptr + rows).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BK)

    # N tails are masked, never clamped with tl.where: a clamped offset is no longer provably
    # contiguous, and when N is the weight's contiguous dim (backward) the loads stop vectorising.
    a_ptrs = a_ptr + src[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    if W_TMA:
        # W_e as a descriptor over its own [n, k] (or [k, n]) matrix, so TMA zero-fills the K and
        # N tails. SWIGLU_FWD's gate tile may run into the up rows below it: those columns are
        # masked at the store, and the GEMM never mixes columns.
        if MODE == SWIGLU_FWD:
            w_cols = 2 * N
        else:
            w_cols = N
        w_base = w_ptr + e.to(tl.int64) * stride_we
        if W_KMAJOR:
            w_desc = tl.make_tensor_descriptor(w_base, shape=[w_cols, KD], strides=[stride_wn, 1],
                                               block_shape=[BN, BK])
        else:
            w_desc = tl.make_tensor_descriptor(w_base, shape=[KD, w_cols], strides=[stride_wk, 1],
                                               block_shape=[BK, BN])
    acc = tl.zeros((BM, BN), dtype=ACC)
    acc_up = tl.zeros((BM, BN), dtype=ACC)
    for k0 in range(0, KD, BK):
        if EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < KD - k0, other=0.0)
        if W_TMA:
            w = _w_tile(w_desc, pid_n * BN, k0, W_KMAJOR)
        elif EVEN_K and EVEN_N:
            w = tl.load(w_ptrs)
        else:
            w_ok = (offs_k[:, None] < KD - k0) & mask_n[None, :]
            w = tl.load(w_ptrs, mask=w_ok, other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=ACC)
        if MODE == SWIGLU_FWD:  # the up rows sit F = N rows below the gate rows
            if W_TMA:
                w_up = _w_tile(w_desc, N + pid_n * BN, k0, W_KMAJOR)
            elif EVEN_K and EVEN_N:
                w_up = tl.load(w_ptrs + N * stride_wn)
            else:
                w_up = tl.load(w_ptrs + N * stride_wn, mask=w_ok, other=0.0)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION, out_dtype=ACC)
        a_ptrs += BK * stride_ak
        w_ptrs += BK * stride_wk

    mask = mask_m[:, None] & mask_n[None, :]
    rows64 = rows.to(tl.int64)
    if MODE == SWIGLU_FWD:
        act = acc * (1.0 / (1.0 + tl.exp(-acc))) * acc_up
        tl.store(c_ptr + rows64[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                 act.to(c_ptr.dtype.element_ty), mask=mask)
        if STORE_H:
            h_ptrs = h_ptr + rows64[:, None] * stride_hm + offs_n[None, :]
            tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=mask)
            tl.store(h_ptrs + N, acc_up.to(h_ptr.dtype.element_ty), mask=mask)
    elif MODE == SCATTER:
        dst = tl.load(order_ptr + rows).to(tl.int64)
        if SCALE:
            acc = acc * tl.load(gate_w_ptr + dst).to(ACC)[:, None]
        tl.store(c_ptr + dst[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                 acc.to(c_ptr.dtype.element_ty), mask=mask)
    else:  # SWIGLU_BWD; acc = dy_t @ down_e, not yet scaled by the gate weight
        w_gate = tl.load(gate_w_ptr + tl.load(order_ptr + rows)).to(ACC)
        acc_lo, acc_hi = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
        offs_lo = pid_n * BN + tl.arange(0, BN // 2)
        dwp_lo = _swiglu_bwd_half(acc_lo, w_gate, rows64, offs_lo, mask_m, offs_lo < N, N, h_ptr, stride_hm,
                                  c_ptr, stride_cm, stride_cn, act_w_ptr, ACC)
        offs_hi = offs_lo + BN // 2
        dwp_hi = _swiglu_bwd_half(acc_hi, w_gate, rows64, offs_hi, mask_m, offs_hi < N, N, h_ptr, stride_hm,
                                  c_ptr, stride_cm, stride_cn, act_w_ptr, ACC)
        tl.store(dwp_ptr + rows64 * stride_dwpm + pid_n, dwp_lo + dwp_hi, mask=mask_m)


@triton.jit
def _w_tile(w_desc, n0, k0, W_KMAJOR: tl.constexpr):
    """The [BK, BN] weight tile at columns n0, reduction rows k0, through the TMA descriptor."""
    # One return: the compiler checks every return's type, even under a constexpr branch not taken.
    if W_KMAJOR:
        w = w_desc.load([n0, k0]).T
    else:
        w = w_desc.load([k0, n0])
    return w


@triton.jit
def _swiglu_bwd_half(acc, w_gate, rows64, offs_n, mask_m, mask_n, N, h_ptr, stride_hm,
                     c_ptr, stride_cm, stride_cn, act_w_ptr, ACC: tl.constexpr):
    """SWIGLU_BWD's epilogue on half of the program's columns: stores dh = [dg | du] and w * act,
    returns the rows' partial <g_act, act> over these columns."""
    mask = mask_m[:, None] & mask_n[None, :]
    h_ptrs = h_ptr + rows64[:, None] * stride_hm + offs_n[None, :]
    g = tl.load(h_ptrs, mask=mask, other=0.0).to(ACC)
    u = tl.load(h_ptrs + N, mask=mask, other=0.0).to(ACC)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    act = silu * u
    dwp = tl.sum(acc * act, axis=1)
    # Recomputed act, pre-scaled here so the wgrad kernel streams both operands straight into
    # the tensor cores (scaling there cost it half its speed); forward keeps no act for us.
    tl.store(act_w_ptr + rows64[:, None] * N + offs_n[None, :],
             (act * w_gate[:, None]).to(act_w_ptr.dtype.element_ty), mask=mask)
    d_act = acc * w_gate[:, None]
    dh_ptrs = c_ptr + rows64[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(dh_ptrs + N * stride_cn, (d_act * silu).to(c_ptr.dtype.element_ty), mask=mask)
    dg = d_act * u * sig * (1.0 + g * (1.0 - sig))  # d silu(g)/dg = sig * (1 + g (1 - sig))
    tl.store(dh_ptrs, dg.to(c_ptr.dtype.element_ty), mask=mask)
    return dwp


_even_k = triton.heuristics({"EVEN_K": lambda args: args["KD"] % args["BK"] == 0,
                             "EVEN_N": lambda args: args["N"] % args["BN"] == 0})
_kernel_fixed = _even_k(_expert_gemm)
_kernel_tuned = {
    dual: triton.autotune(gemm_configs(dual), key=["N", "KD", "MODE", "STORE_H", "SCALE", "W_KMAJOR", "W_TMA_OK"],
                          prune_configs_by={"early_config_prune": prune_gemm})(_even_k(_expert_gemm))
    for dual in (False, True)
}


def _launch(mode, a, a_strides, w, w_strides, c, c_strides, r: Routing, N, KD,
            h=None, dwp=None, act_w=None, gate_w=None, store_h=False, scale=False, config=None):
    if r.num_blocks == 0:
        return
    acc, precision = dot_types(a.dtype)
    dummy = c
    args = (
        a, *a_strides, w, *w_strides, c, *c_strides,
        dummy if h is None else h, 0 if h is None else h.stride(0),
        dummy if dwp is None else dwp, 0 if dwp is None else dwp.stride(0), dummy if act_w is None else act_w,
        r.token_A, r.order_A, dummy if gate_w is None else gate_w,
        r.block_expert_B, r.block_row_B, r.offsets_E1,
        N, KD, r.num_blocks, r.num_experts,
    )
    w_tma_ok = tma_compatible(w, w_strides)
    consts = dict(MODE=mode, STORE_H=store_h, SCALE=scale, ACC=acc, PRECISION=precision,
                  W_KMAJOR=w_strides[2] == 1, W_TMA_OK=w_tma_ok, BM=r.block_m)
    if config is None and interpreting():
        config = triton.Config(dict(BN=INTERP_BN, BK=INTERP_BK, GROUP_M=4, W_TMA=False))
    if config is not None and config.kwargs["W_TMA"] and not w_tma_ok:
        raise ValueError(f"grouped GEMM config {config} reads the weights through TMA, which needs a 16-byte "
                         f"aligned base and strides and one unit stride; got strides {tuple(w_strides)}")
    launch(_kernel_fixed, _kernel_tuned[mode is SWIGLU_FWD], lambda meta: (r.num_blocks * triton.cdiv(N, meta["BN"]),),
           args, consts, config)


def gate_up_swiglu(x_TD, gate_up_EFD, r: Routing, store_h: bool, config=None):
    """act_AF = silu(x g_e^T) * (x u_e^T) for every sorted row; also h_AF2 = [g | u] if store_h.

    Here and below, `config` runs one candidate of `gemm_configs()` instead of the autotuner's pick
    (the tests run each one: the autotuner keeps only the fastest one's output)."""
    A, (_, F2, D) = r.order_A.numel(), gate_up_EFD.shape
    F = F2 // 2
    act_AF = x_TD.new_empty(A, F)
    h_AF2 = x_TD.new_empty(A, F2) if store_h else None
    _launch(SWIGLU_FWD, x_TD, x_TD.stride(), gate_up_EFD, gate_up_EFD.stride(), act_AF, act_AF.stride(), r,
            N=F, KD=D, h=h_AF2, store_h=store_h, config=config)
    return act_AF, h_AF2


def scatter_gemm(a_AK, w_ENK, w_strides, out_AN, r: Routing, gate_w_A=None, config=None):
    """out[order[i]] = (gate_w[order[i]] *) a[i] @ W_e^T, W_e addressed as [N, K] by `w_strides`."""
    N, KD = out_AN.shape[1], a_AK.shape[1]
    _launch(SCATTER, a_AK, a_AK.stride(), w_ENK, w_strides, out_AN, out_AN.stride(), r,
            N=N, KD=KD, gate_w=gate_w_A, scale=gate_w_A is not None, config=config)
    return out_AN


def swiglu_backward(dy_TD, down_EDF, h_AF2, gate_w_A, r: Routing, config=None):
    """For every sorted row: dh_AF2 = d[g | u], dw_A = <dy_t, down_e act_i> and act_w_AF = w_a act_i."""
    A, (_, D, F) = h_AF2.shape[0], down_EDF.shape
    dh_AF2 = torch.empty_like(h_AF2)
    act_w_AF = h_AF2.new_empty(A, F)
    # One column per N tile of the narrowest candidate; wider tiles leave trailing zeros.
    acc_dtype = torch.float64 if h_AF2.dtype == torch.float64 else torch.float32
    dwp = torch.zeros(A, triton.cdiv(F, 32), device=h_AF2.device, dtype=acc_dtype)
    s = down_EDF.stride()
    _launch(SWIGLU_BWD, dy_TD, dy_TD.stride(), down_EDF, (s[0], s[2], s[1]), dh_AF2, dh_AF2.stride(), r,
            N=F, KD=D, h=h_AF2, dwp=dwp, act_w=act_w_AF, gate_w=gate_w_A, config=config)
    return dh_AF2, dwp.sum(1), act_w_AF
