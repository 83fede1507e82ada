"""The routed-expert FFN off CUDA: one sort, two grouped GEMMs, one combine, so its cost follows the tokens.

Shape legend: T tokens, D hidden, F expert FFN width, E experts, K experts per token, A = T*K
assignments (expert-sorted unless named otherwise). Weights use the HF DeepseekV3 layout of
`kimi_kernels.experts.reference`: gate_up_EFD [E, 2F, D] (gate rows, then up rows), down_EDF [E, D, F].

Why not the reference: its `out_AD[rows] = ...` records one CopySlices per busy expert, and each
one's backward clones the whole [A, D] gradient, so forward+backward grows as E*A*D: 0.15 s at
E 8, 0.40 s at E 128, 1.26 s at E 512, where this path takes 0.14, 0.16 and 0.19 s (4096 tokens of
the `small` preset, one thread; benchmarks/cpu_vs_hf.py). Here every op runs over all A rows at
once, and the autograd graph has the same handful of nodes whatever E is; an expert that gets no
rows costs nothing but its zero weight gradient.

The grouped GEMMs are `torch._grouped_mm` (a CPU kernel since torch 2.9), which takes one offsets
vector instead of E calls, needs no host read of the counts, and has no data-dependent output
shape, so torch.compile captures the whole function. It accepts fp32/bf16/fp16 whose row strides
are multiples of 16 bytes (D and F multiples of 4 in fp32, of 8 in bf16). Other operands (fp64 for
gradcheck, odd D or F) run the same GEMMs as a Python loop over split/unbind views, which avoids
CopySlices too, at the price of one host read of the counts (a graph break under torch.compile).
"""

import torch
import torch.nn.functional as F

from kimi_kernels.experts.reference import check_operands

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_fits(dtype: torch.dtype, D: int, F_: int) -> bool:
    """Whether torch._grouped_mm takes [*, D] and [*, F] rows of `dtype` (it raises
    "strides should be multiple of 16 bytes" otherwise, in forward or only in backward)."""
    if dtype not in _GROUPED_MM_DTYPES:
        return False
    return (D * dtype.itemsize) % 16 == 0 and (F_ * dtype.itemsize) % 16 == 0


# torch._grouped_mm wrapped as our own two ops, each with a shape function: torch's meta function
# for it (what torch.compile traces with) accepts bf16 only and raises on the fp32 that CPU
# training runs in, and its built-in backward fails on a zero-stride (expanded) gradient.
@torch.library.custom_op("kimi::grouped_linear", mutates_args=())
def grouped_linear(x_AI: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """[A, O]: row block e of x_AI (rows offsets_E[e-1]:offsets_E[e]) times w_EOI[e]^T."""
    return torch._grouped_mm(x_AI, w_EOI.transpose(-2, -1), offs=offsets_E)


@torch.library.custom_op("kimi::grouped_wgrad", mutates_args=())
def grouped_wgrad(dy_AO: torch.Tensor, x_AI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """[E, O, I]: dy_e^T x_e over each expert's row block; zero for an expert without rows."""
    return torch._grouped_mm(dy_AO.t(), x_AI, offs=offsets_E)


@grouped_linear.register_fake
def _(x_AI, w_EOI, offsets_E):
    return x_AI.new_empty(x_AI.shape[0], w_EOI.shape[1])


@grouped_wgrad.register_fake
def _(dy_AO, x_AI, offsets_E):
    return dy_AO.new_empty(offsets_E.shape[0], dy_AO.shape[1], x_AI.shape[1])


def _grouped_linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_linear_backward(ctx, dy_AO):
    x_AI, w_EOI, offsets_E = ctx.saved_tensors
    dy_AO = dy_AO.contiguous()
    dx_AI = grouped_linear(dy_AO, w_EOI.transpose(-2, -1), offsets_E) if ctx.needs_input_grad[0] else None
    dw_EOI = grouped_wgrad(dy_AO, x_AI, offsets_E) if ctx.needs_input_grad[1] else None
    return dx_AI, dw_EOI, None


grouped_linear.register_autograd(_grouped_linear_backward, setup_context=_grouped_linear_setup)


def _expert_linear(x_AI: torch.Tensor, w_EOI: torch.Tensor, groups) -> torch.Tensor:
    """Row block e of x_AI times w_EOI[e]^T, for rows sorted by expert.

    `groups` is either the int32 cumulative row counts [E] (torch._grouped_mm) or the row counts
    as a Python list (the loop).
    """
    if isinstance(groups, torch.Tensor):
        return grouped_linear(x_AI, w_EOI, groups)
    # split/unbind views and one cat: their backwards are one cat and one stack, never a
    # full-size zero buffer per expert. Empty experts are skipped: unbind fills their gradient.
    parts = [F.linear(x_nI, w_OI) for x_nI, w_OI, n in zip(x_AI.split(groups), w_EOI.unbind(0), groups) if n]
    return torch.cat(parts) if parts else x_AI.new_empty(0, w_EOI.shape[1])


def expert_ffn_cpu(x_TD, topk_ids_TK, topk_weights_TK, gate_up_EFD, down_EDF) -> torch.Tensor:
    """Same contract as `kimi_kernels.experts.reference.expert_ffn_reference`: y_t = sum_k w_tk * FFN_{e_tk}(x_t)."""
    check_operands(x_TD, topk_ids_TK, topk_weights_TK, gate_up_EFD, down_EDF)
    T, K = topk_ids_TK.shape
    E, F2, D = gate_up_EFD.shape
    ids_A = topk_ids_TK.reshape(-1).long()  # scatter_add_ indexes with int64 only
    order_A = torch.argsort(ids_A, stable=True)  # stable: ties keep token order, as the reference
    # scatter_add_, not bincount: its output shape does not depend on the ids' values (torch.compile).
    counts_E = ids_A.new_zeros(E).scatter_add_(0, ids_A, torch.ones_like(ids_A))
    if grouped_mm_fits(x_TD.dtype, D, F2 // 2):
        groups = counts_E.cumsum(0, dtype=torch.int32)
    else:
        groups = counts_E.tolist()
    x_AD = x_TD[order_A // K]
    gate_AF, up_AF = _expert_linear(x_AD, gate_up_EFD, groups).chunk(2, dim=-1)
    out_AD = _expert_linear(F.silu(gate_AF) * up_AF, down_EDF, groups)
    out_AD = out_AD * topk_weights_TK.reshape(-1)[order_A].to(out_AD.dtype)[:, None]
    # Back to token-major rows (row a = token a // K), then each token's K rows summed in one
    # reduction (accumulated in fp32 for bf16) rather than K rounded index_add_ steps.
    out_AD = torch.empty_like(out_AD).index_copy_(0, order_A, out_AD)
    return out_AD.view(T, K, D).sum(dim=1)
