"""Combine without atomics: y_t = sum_k out[t*K + k] over each token's K assignment rows.

Shape legend: T tokens, K experts per token, D hidden. The scatter GEMM has already written each
assignment's result into its own token-major row (gate weight applied in its fp32 epilogue), so
a token's K rows are contiguous and the combine is a plain, deterministic sum. The same kernel
sums the K partial input gradients in backward. With K = 1 nothing calls it.
"""

import torch
import triton
import triton.language as tl

from kimi_kernels.tiles import dot_types, interpreting


@triton.jit
def _combine(src_ptr, dst_ptr, T, D, K: tl.constexpr, ACC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = (offs_t < T)[:, None] & (offs_d < D)[None, :]
    rows = offs_t.to(tl.int64) * K
    acc = tl.zeros((BT, BD), dtype=ACC)
    for k in tl.static_range(K):
        acc += tl.load(src_ptr + (rows + k)[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(ACC)
    tl.store(dst_ptr + offs_t.to(tl.int64)[:, None] * D + offs_d[None, :], acc.to(dst_ptr.dtype.element_ty), mask=mask)


def combine(src_AD: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T*K, D] token-major rows -> [T, D] sums, accumulated in fp32 (fp64 for fp64)."""
    A, D = src_AD.shape
    T = A // top_k
    src_AD = src_AD.contiguous()
    y_TD = src_AD.new_empty(T, D)
    if T == 0:
        return y_TD
    # Interpreter: one wide tile per token block keeps the Python-level program count small.
    BT, BD = (16, 64) if interpreting() else (8, 512)
    _combine[(triton.cdiv(T, BT), triton.cdiv(D, BD))](
        src_AD, y_TD, T, D, K=top_k, ACC=dot_types(src_AD.dtype)[0], BT=BT, BD=BD, num_warps=4)
    return y_TD
