"""Causal flash attention (FlashAttention-2) at MLA's head dims, returning each head's largest logit.

Shape legend: B batch, H heads, T sequence, Q query/key head dim (N + R = 192 in K2's MLA), V value
head dim (128); VP the next power of two of V. Tiles: a program of the forward and of the dQ kernel
owns BM query rows and walks BN key rows at a time; a program of the dK/dV kernel owns BN key rows
and walks BM query rows at a time.

tl.arange needs powers of two, so the Q columns are two tiles, QA = the largest power of two below
Q and QB = the next power of two of the rest (both >= 16, tl.dot's least K), with the tail masked:
Q = 192 runs as 128 + 64, with no work or registers spent on zeros, where one 256-wide tile would
waste a quarter of the QK^T, dQ and dK work and spill in the dK/dV kernel (`python -m
kimi_kernels.compile_report`). q.k = q_a.k_a + q_b.k_b; dQ and dK are kept as their two column tiles.

Forward (Dao 2023, Alg. 1): online softmax over key tiles in base 2 (qk_scale = scale * log2 e, so
exp2 replaces exp); the tiles left of the diagonal skip the causal mask and only the <= BM/BN tiles
on it apply it; tiles right of it are never loaded. Saves per row lse = log2 sum_s 2^(qk_scale
q.k_s), the base-2 logsumexp of the scaled logits, and writes out in [B, T, H, V] memory (returned
as the [B, H, T, V] view) so MLA's transpose back to [B, T, H*V] is free.

The max logit is a by-product: online softmax already keeps every row's running max of q.k (it is
the stabiliser m). Each program stores its rows' max, top [B, H, T] fp32, and the host reduces that
to [H]; per row rather than per tile because the tile height is the autotuner's choice, made after
the buffer is allocated, and per row needs neither atomics nor a -inf fill. scale * max(q.k) equals
max(scale * q.k) exactly (rounding is monotone), so the record matches the reference's definition.

Backward (Dao 2023, Alg. 2), two kernels and no atomics: the dQ kernel (which first writes
delta = rowsum(dO * O), needed by both) and then the dK/dV kernel; each recomputes P = 2^(qk_scale
q.k - lse) from the saved lse. dS = P * (dP - delta), dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO.
"""

import math

import torch
import triton
import triton.language as tl

from kimi_kernels.tiles import dot_types, interpreting, launch

LOG2E = math.log2(math.e)


@triton.jit
def _tile(base, offs_r, stride_r, rows_ok, offs_c, C: tl.constexpr):
    """[rows, cols] tile of a unit-stride-column matrix; rows not ok and columns >= C read 0."""
    return tl.load(base + offs_r[:, None] * stride_r + offs_c[None, :], mask=rows_ok[:, None] & (offs_c[None, :] < C),
                   other=0.0)


@triton.jit
def _put(base, offs_r, stride_r, rows_ok, offs_c, C: tl.constexpr, x):
    tl.store(base + offs_r[:, None] * stride_r + offs_c[None, :], x.to(base.dtype.element_ty),
             mask=rows_ok[:, None] & (offs_c[None, :] < C))


@triton.jit
def _fwd_tiles(acc, l_i, top_i, q_a, q_b, k_base, v_base, stride_kt, stride_vt, offs_m, offs_a, offs_b, offs_v,
               lo, hi, T, qk_scale,
               QK: tl.constexpr, VH: tl.constexpr, BN: tl.constexpr, DIAGONAL: tl.constexpr,
               PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        key_ok = offs_n < T
        k_a = _tile(k_base, offs_n, stride_kt, key_ok, offs_a, QK)
        k_b = _tile(k_base, offs_n, stride_kt, key_ok, offs_b, QK)
        v = _tile(v_base, offs_n, stride_vt, key_ok, offs_v, VH)
        qk = tl.dot(q_a, tl.trans(k_a), input_precision=PRECISION)  # [BM, BN] fp32, unscaled
        qk = tl.dot(q_b, tl.trans(k_b), qk, input_precision=PRECISION)
        if DIAGONAL:  # left of the diagonal every key exists (s < start_m <= T) and is visible
            qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
        # Never -inf after a row's first tile: the first tile a row sees holds key start_m <= t.
        new_top = tl.maximum(top_i, tl.max(qk, 1))
        m_old, m_new = top_i * qk_scale, new_top * qk_scale
        alpha = tl.math.exp2(m_old - m_new)  # 0 on the first tile (m_old = -inf)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        top_i = new_top
    return acc, l_i, top_i


@triton.jit
def _attn_fwd(
    q_ptr, stride_qb, stride_qh, stride_qt,
    k_ptr, stride_kb, stride_kh, stride_kt,
    v_ptr, stride_vb, stride_vh, stride_vt,
    o_ptr, stride_ob, stride_oh, stride_ot,
    lse_ptr, top_ptr,  # [B, H, T] fp32, contiguous
    H, T, qk_scale,
    QK: tl.constexpr, VH: tl.constexpr, QA: tl.constexpr, QB: tl.constexpr, VP: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    start_m = tl.program_id(0) * BM
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)  # int64: B*H*T*Q can pass 2^31
    offs_m = start_m + tl.arange(0, BM)
    offs_a, offs_b, offs_v = tl.arange(0, QA), QA + tl.arange(0, QB), tl.arange(0, VP)
    row_ok = offs_m < T
    q_base = q_ptr + b * stride_qb + h * stride_qh
    q_a = _tile(q_base, offs_m, stride_qt, row_ok, offs_a, QK)
    q_b = _tile(q_base, offs_m, stride_qt, row_ok, offs_b, QK)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    acc = tl.zeros([BM, VP], dtype=ACC)
    l_i = tl.zeros([BM], dtype=tl.float32)
    top_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    acc, l_i, top_i = _fwd_tiles(acc, l_i, top_i, q_a, q_b, k_base, v_base, stride_kt, stride_vt, offs_m,
                                 offs_a, offs_b, offs_v, 0, start_m, T, qk_scale, QK, VH, BN, False, PRECISION)
    acc, l_i, top_i = _fwd_tiles(acc, l_i, top_i, q_a, q_b, k_base, v_base, stride_kt, stride_vt, offs_m,
                                 offs_a, offs_b, offs_v, start_m, tl.minimum(start_m + BM, T), T, qk_scale,
                                 QK, VH, BN, True, PRECISION)
    _put(o_ptr + b * stride_ob + h * stride_oh, offs_m, stride_ot, row_ok, offs_v, VH, acc / l_i[:, None])
    tl.store(lse_ptr + bh * T + offs_m, top_i * qk_scale + tl.math.log2(l_i), mask=row_ok)
    tl.store(top_ptr + bh * T + offs_m, top_i, mask=row_ok)


@triton.jit
def _dq_tiles(dq_a, dq_b, q_a, q_b, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
              offs_m, offs_a, offs_b, offs_v, lo, hi, T, qk_scale,
              QK: tl.constexpr, VH: tl.constexpr, BN: tl.constexpr, DIAGONAL: tl.constexpr,
              PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        key_ok = offs_n < T
        k_a = _tile(k_base, offs_n, stride_kt, key_ok, offs_a, QK)
        k_b = _tile(k_base, offs_n, stride_kt, key_ok, offs_b, QK)
        v = _tile(v_base, offs_n, stride_vt, key_ok, offs_v, VH)
        qk = tl.dot(q_a, tl.trans(k_a), input_precision=PRECISION)
        qk = tl.dot(q_b, tl.trans(k_b), qk, input_precision=PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if DIAGONAL:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = (p * (dp - delta[:, None])).to(k_a.dtype)
        dq_a = tl.dot(ds, k_a, dq_a, input_precision=PRECISION)
        dq_b = tl.dot(ds, k_b, dq_b, input_precision=PRECISION)
    return dq_a, dq_b


@triton.jit
def _attn_bwd_dq(
    q_ptr, stride_qb, stride_qh, stride_qt,
    k_ptr, stride_kb, stride_kh, stride_kt,
    v_ptr, stride_vb, stride_vh, stride_vt,
    o_ptr, stride_ob, stride_oh, stride_ot,
    do_ptr, stride_dob, stride_doh, stride_dot,
    dq_ptr, stride_dqb, stride_dqh, stride_dqt,
    lse_ptr, delta_ptr,  # [B, H, T] fp32: lse read, delta written
    H, T, qk_scale, scale,
    QK: tl.constexpr, VH: tl.constexpr, QA: tl.constexpr, QB: tl.constexpr, VP: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    start_m = tl.program_id(0) * BM
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BM)
    offs_a, offs_b, offs_v = tl.arange(0, QA), QA + tl.arange(0, QB), tl.arange(0, VP)
    row_ok = offs_m < T
    q_base = q_ptr + b * stride_qb + h * stride_qh
    q_a = _tile(q_base, offs_m, stride_qt, row_ok, offs_a, QK)
    q_b = _tile(q_base, offs_m, stride_qt, row_ok, offs_b, QK)
    do = _tile(do_ptr + b * stride_dob + h * stride_doh, offs_m, stride_dot, row_ok, offs_v, VH)
    o = _tile(o_ptr + b * stride_ob + h * stride_oh, offs_m, stride_ot, row_ok, offs_v, VH)
    # delta here, where this program's dO and O rows are loaded anyway; the dK/dV kernel runs next.
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(delta_ptr + bh * T + offs_m, delta, mask=row_ok)
    lse = tl.load(lse_ptr + bh * T + offs_m, mask=row_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    dq_a = tl.zeros([BM, QA], dtype=ACC)
    dq_b = tl.zeros([BM, QB], dtype=ACC)
    dq_a, dq_b = _dq_tiles(dq_a, dq_b, q_a, q_b, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                           offs_m, offs_a, offs_b, offs_v, 0, start_m, T, qk_scale, QK, VH, BN, False, PRECISION)
    dq_a, dq_b = _dq_tiles(dq_a, dq_b, q_a, q_b, do, lse, delta, k_base, v_base, stride_kt, stride_vt,
                           offs_m, offs_a, offs_b, offs_v, start_m, tl.minimum(start_m + BM, T), T, qk_scale,
                           QK, VH, BN, True, PRECISION)
    dq_base = dq_ptr + b * stride_dqb + h * stride_dqh
    _put(dq_base, offs_m, stride_dqt, row_ok, offs_a, QK, dq_a * scale)
    _put(dq_base, offs_m, stride_dqt, row_ok, offs_b, QK, dq_b * scale)


@triton.jit
def _dkdv_tiles(dk_a, dk_b, dv, k_a, k_b, v, q_base, do_base, lse_ptr, delta_ptr, stride_qt, stride_dot,
                offs_n, offs_a, offs_b, offs_v, lo, hi, T, qk_scale,
                QK: tl.constexpr, VH: tl.constexpr, BM: tl.constexpr, DIAGONAL: tl.constexpr,
                PRECISION: tl.constexpr):
    # Transposed: keys are the rows here. Query rows past T load q = dO = 0 and lse = +inf, so
    # their P^T columns are 0 and they add nothing.
    for start_m in range(lo, hi, BM):
        offs_m = start_m + tl.arange(0, BM)
        row_ok = offs_m < T
        q_a = _tile(q_base, offs_m, stride_qt, row_ok, offs_a, QK)
        q_b = _tile(q_base, offs_m, stride_qt, row_ok, offs_b, QK)
        do = _tile(do_base, offs_m, stride_dot, row_ok, offs_v, VH)
        lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)
        qk_t = tl.dot(k_a, tl.trans(q_a), input_precision=PRECISION)  # [BN, BM]
        qk_t = tl.dot(k_b, tl.trans(q_b), qk_t, input_precision=PRECISION)
        p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
        if DIAGONAL:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_a.dtype)
        dk_a = tl.dot(ds_t, q_a, dk_a, input_precision=PRECISION)
        dk_b = tl.dot(ds_t, q_b, dk_b, input_precision=PRECISION)
    return dk_a, dk_b, dv


@triton.jit
def _attn_bwd_dkdv(
    q_ptr, stride_qb, stride_qh, stride_qt,
    k_ptr, stride_kb, stride_kh, stride_kt,
    v_ptr, stride_vb, stride_vh, stride_vt,
    do_ptr, stride_dob, stride_doh, stride_dot,
    dk_ptr, stride_dkb, stride_dkh, stride_dkt,
    dv_ptr, stride_dvb, stride_dvh, stride_dvt,
    lse_ptr, delta_ptr,  # [B, H, T] fp32
    H, T, qk_scale, scale,
    QK: tl.constexpr, VH: tl.constexpr, QA: tl.constexpr, QB: tl.constexpr, VP: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    start_n = tl.program_id(0) * BN
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_n = start_n + tl.arange(0, BN)
    offs_a, offs_b, offs_v = tl.arange(0, QA), QA + tl.arange(0, QB), tl.arange(0, VP)
    key_ok = offs_n < T
    k_base = k_ptr + b * stride_kb + h * stride_kh
    k_a = _tile(k_base, offs_n, stride_kt, key_ok, offs_a, QK)
    k_b = _tile(k_base, offs_n, stride_kt, key_ok, offs_b, QK)
    v = _tile(v_ptr + b * stride_vb + h * stride_vh, offs_n, stride_vt, key_ok, offs_v, VH)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    dk_a = tl.zeros([BN, QA], dtype=ACC)
    dk_b = tl.zeros([BN, QB], dtype=ACC)
    dv = tl.zeros([BN, VP], dtype=ACC)
    # Queries before start_n see none of these keys; those in [start_n, start_n + BN) see some.
    dk_a, dk_b, dv = _dkdv_tiles(dk_a, dk_b, dv, k_a, k_b, v, q_base, do_base, lse_ptr + bh * T, delta_ptr + bh * T,
                                 stride_qt, stride_dot, offs_n, offs_a, offs_b, offs_v,
                                 start_n, tl.minimum(start_n + BN, T), T, qk_scale, QK, VH, BM, True, PRECISION)
    dk_a, dk_b, dv = _dkdv_tiles(dk_a, dk_b, dv, k_a, k_b, v, q_base, do_base, lse_ptr + bh * T, delta_ptr + bh * T,
                                 stride_qt, stride_dot, offs_n, offs_a, offs_b, offs_v,
                                 start_n + BN, T, T, qk_scale, QK, VH, BM, False, PRECISION)
    dk_base = dk_ptr + b * stride_dkb + h * stride_dkh
    _put(dk_base, offs_n, stride_dkt, key_ok, offs_a, QK, dk_a * scale)
    _put(dk_base, offs_n, stride_dkt, key_ok, offs_b, QK, dk_b * scale)
    _put(dv_ptr + b * stride_dvb + h * stride_dvh, offs_n, stride_dvt, key_ok, offs_v, VH, dv)


def _configs(tiles):
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tiles]


# GPU candidates as (BM, BN, warps, stages). The walked tile is the small one, and the owned
# tile must be a multiple of it: the unmasked loop ends exactly where the diagonal tiles begin.
# The last entry of each list is small enough for fp32 operands (twice the shared memory); the
# tests run every candidate explicitly (the autotuner never checks results).
FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)])
DQ_CONFIGS = _configs([(128, 32, 8, 2), (64, 32, 4, 3), (64, 32, 4, 2)])
DKDV_CONFIGS = _configs([(32, 128, 8, 2), (32, 64, 8, 3), (32, 64, 8, 2), (16, 64, 8, 3), (16, 32, 4, 2)])
# Interpreter tiles: unequal, so the owned tile spans two walked tiles and T = 37 leaves tails in both.
INTERP_FWD = triton.Config({"BM": 32, "BN": 16}, num_warps=4, num_stages=1)
INTERP_DQ = INTERP_FWD
INTERP_DKDV = triton.Config({"BM": 16, "BN": 32}, num_warps=4, num_stages=1)


def _prune(configs, named_args, **kwargs):
    # Triton passes the positional arguments as named_args and the keyword ones apart. Under 512
    # tokens (test sizes) timing the tiles would cost more compile time than any run saves.
    small = named_args["q_ptr"].element_size() == 4 or named_args["T"] < 512
    return configs[-1:] if small else configs


def _tuned(kernel, configs):
    return triton.autotune(configs, key=["T", "QK", "VH"], prune_configs_by={"early_config_prune": _prune})(kernel)


_fwd_tuned = _tuned(_attn_fwd, FWD_CONFIGS)
_dq_tuned = _tuned(_attn_bwd_dq, DQ_CONFIGS)
_dkdv_tuned = _tuned(_attn_bwd_dkdv, DKDV_CONFIGS)


def _bht(t):
    """Pointer and the batch, head and time strides of a [B, H, T, X] tensor whose last dim is unit-stride."""
    return (t, *t.stride()[:3])


def q_tiles(Q: int):
    """(QA, QB): Q's two column tiles, see the module docstring. 192 -> (128, 64), 24 -> (16, 16)."""
    qa = max(16, triton.next_power_of_2(Q) // 2)
    return qa, max(16, triton.next_power_of_2(max(Q - qa, 1)))


def _consts(q, v):
    acc, precision = dot_types(q.dtype)
    Q, V = q.shape[-1], v.shape[-1]
    QA, QB = q_tiles(Q)
    return dict(QK=Q, VH=V, QA=QA, QB=QB, VP=max(16, triton.next_power_of_2(V)), ACC=acc, PRECISION=precision)


def _pick(config, interp):
    return config if config is not None or not interpreting() else interp


def attention_forward(q_BHTQ, k_BHTQ, v_BHTV, scale: float, config=None):
    """out [B, H, T, V] (a view of [B, T, H, V] memory), lse [B, H, T] fp32 (base 2), top [B, H, T]
    fp32 (each row's largest unscaled q.k). `config` pins a tile (tests); else the autotuner picks."""
    B, H, T, _ = q_BHTQ.shape
    V = v_BHTV.shape[-1]
    out_BHTV = q_BHTQ.new_empty(B, T, H, V).transpose(1, 2)
    lse_BHT = q_BHTQ.new_empty(B, H, T, dtype=torch.float32)
    top_BHT = torch.empty_like(lse_BHT)
    args = (*_bht(q_BHTQ), *_bht(k_BHTQ), *_bht(v_BHTV), *_bht(out_BHTV), lse_BHT, top_BHT, H, T, scale * LOG2E)
    launch(_attn_fwd, _fwd_tuned, lambda meta: (triton.cdiv(T, meta["BM"]), B * H), args, _consts(q_BHTQ, v_BHTV),
           _pick(config, INTERP_FWD))
    return out_BHTV, lse_BHT, top_BHT


def attention_backward(do_BHTV, q_BHTQ, k_BHTQ, v_BHTV, out_BHTV, lse_BHT, scale: float,
                       dq_config=None, dkdv_config=None):
    """dq, dk [B, H, T, Q] and dv [B, H, T, V] in the inputs' dtype (any strides: the kernels take them)."""
    B, H, T, _ = q_BHTQ.shape
    if do_BHTV.stride(-1) != 1:
        do_BHTV = do_BHTV.contiguous()
    dq, dk, dv = torch.empty_like(q_BHTQ), torch.empty_like(k_BHTQ), torch.empty_like(v_BHTV)
    delta_BHT = torch.empty_like(lse_BHT)
    consts = _consts(q_BHTQ, v_BHTV)
    qkv = (*_bht(q_BHTQ), *_bht(k_BHTQ), *_bht(v_BHTV))
    launch(_attn_bwd_dq, _dq_tuned, lambda meta: (triton.cdiv(T, meta["BM"]), B * H),
           (*qkv, *_bht(out_BHTV), *_bht(do_BHTV), *_bht(dq), lse_BHT, delta_BHT, H, T, scale * LOG2E, scale),
           consts, _pick(dq_config, INTERP_DQ))
    launch(_attn_bwd_dkdv, _dkdv_tuned, lambda meta: (triton.cdiv(T, meta["BN"]), B * H),
           (*qkv, *_bht(do_BHTV), *_bht(dk), *_bht(dv), lse_BHT, delta_BHT, H, T, scale * LOG2E, scale),
           consts, _pick(dkdv_config, INTERP_DKDV))
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BHTQ, k_BHTQ, v_BHTV, scale):
        out_BHTV, lse_BHT, top_BHT = attention_forward(q_BHTQ, k_BHTQ, v_BHTV, scale)
        ctx.save_for_backward(q_BHTQ, k_BHTQ, v_BHTV, out_BHTV, lse_BHT)
        ctx.scale = scale
        max_logit_H = top_BHT.amax(dim=(0, 2)) * scale  # scale > 0, so this is max(scale * q.k)
        ctx.mark_non_differentiable(max_logit_H)
        return out_BHTV, max_logit_H

    @staticmethod
    def backward(ctx, dout_BHTV, _dmax_H):
        q_BHTQ, k_BHTQ, v_BHTV, out_BHTV, lse_BHT = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout_BHTV, q_BHTQ, k_BHTQ, v_BHTV, out_BHTV, lse_BHT, ctx.scale)
        return dq, dk, dv, None


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def flash_attention(q_BHTQ: torch.Tensor, k_BHTQ: torch.Tensor, v_BHTV: torch.Tensor, scale: float):
    """Causal attention, out [B, H, T, V] = softmax(scale * q k^T, causal) v, and max_logit_H [H]
    fp32, each head's largest scale * q.k over the batch and the visible pairs (no gradient).
    Same contract as `kimi_kernels.attention.attention_reference.attention_reference`."""
    if q_BHTQ.dim() != 4 or k_BHTQ.shape != q_BHTQ.shape or v_BHTV.dim() != 4 or v_BHTV.shape[:3] != q_BHTQ.shape[:3]:
        raise ValueError(f"flash_attention wants q and k [B, H, T, Q] and v [B, H, T, V]; got q {tuple(q_BHTQ.shape)}, "
                         f"k {tuple(k_BHTQ.shape)}, v {tuple(v_BHTV.shape)}")
    if q_BHTQ.shape[2] == 0:
        raise ValueError("flash_attention got T = 0 (an empty sequence): there is no logit to report")
    if not (q_BHTQ.dtype == k_BHTQ.dtype == v_BHTV.dtype) or q_BHTQ.dtype not in _DTYPES:
        raise TypeError(f"flash_attention wants q, k and v of one dtype among {_DTYPES}; got {q_BHTQ.dtype}, "
                        f"{k_BHTQ.dtype}, {v_BHTV.dtype}")
    if not scale > 0:
        raise ValueError(f"flash_attention wants scale > 0 (the max-logit record relies on it), got {scale}")
    q_BHTQ, k_BHTQ, v_BHTV = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_BHTQ, k_BHTQ, v_BHTV))
    return _FlashAttention.apply(q_BHTQ, k_BHTQ, v_BHTV, float(scale))
