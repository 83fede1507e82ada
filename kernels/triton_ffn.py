"""The Triton expert FFN as one autograd.Function over the kernels in this folder.

Shape legend: T tokens, D hidden, F expert FFN width, E experts, K experts per token,
A = T*K assignments (sorted rows i / token-major rows a, see `kernels.routing`).

Forward:  routing -> gate_up_swiglu (gathers x) -> scatter_gemm down (gate-weighted, token-major)
          -> combine (skipped for K = 1).
Backward: swiglu_backward (gathers dy; gives dh, dL/dw and w*act) -> scatter_gemm dX -> combine,
          and the two grouped weight-gradient kernels.
Saved for backward: x, the weights and h = [g | u] [A, 2F]; act is recomputed from h in backward.
"""

import torch

from kernels.combine import combine
from kernels.grouped_gemm import gate_up_swiglu, scatter_gemm, swiglu_backward
from kernels.reference import check_operands
from kernels.routing import Routing, build_routing
from kernels.tiles import block_m
from kernels.wgrad import expert_wgrad


class _ExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, topk_weights_TK, gate_up_EFD, down_EDF, r: Routing, training: bool):
        T, D = x_TD.shape
        K = r.top_k
        w_A = topk_weights_TK.reshape(-1)
        act_AF, h_AF2 = gate_up_swiglu(x_TD, gate_up_EFD, r, store_h=training)
        # K = 1 (the expert-parallel call): row a is token t, so the GEMM writes y directly.
        out_AD = x_TD.new_empty(T * K, D)
        s = down_EDF.stride()
        scatter_gemm(act_AF, down_EDF, s, out_AD, r, gate_w_A=w_A)
        y_TD = out_AD if K == 1 else combine(out_AD, K)
        if training:
            ctx.save_for_backward(x_TD, w_A, gate_up_EFD, down_EDF, h_AF2)
            ctx.routing = r
            ctx.weights_shape = topk_weights_TK.shape
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, w_A, gate_up_EFD, down_EDF, h_AF2 = ctx.saved_tensors
        r: Routing = ctx.routing
        need_x, need_w, need_gu, need_down = ctx.needs_input_grad[:4]
        dy_TD = dy_TD.contiguous()
        dx = dw = dgu = ddown = None
        dh_AF2, dw_sorted_A, act_w_AF = swiglu_backward(dy_TD, down_EDF, h_AF2, w_A, r)
        if need_x:
            T, D = x_TD.shape
            dx_AD = dy_TD.new_empty(T * r.top_k, D)
            s = gate_up_EFD.stride()
            scatter_gemm(dh_AF2, gate_up_EFD, (s[0], s[2], s[1]), dx_AD, r)  # W_e^T: [N=D, K=2F]
            dx = dx_AD if r.top_k == 1 else combine(dx_AD, r.top_k)
        if need_w:
            dw = torch.empty_like(w_A).index_copy_(0, r.order_A.long(), dw_sorted_A.to(w_A.dtype))
            dw = dw.view(ctx.weights_shape)
        if need_gu:
            dgu = expert_wgrad(dh_AF2, x_TD, r, l_gather=False, r_gather=True, out_dtype=gate_up_EFD.dtype)
        if need_down:
            ddown = expert_wgrad(dy_TD, act_w_AF, r, l_gather=True, r_gather=False, out_dtype=down_EDF.dtype)
        return dx, dw, dgu, ddown, None, None


def expert_ffn_triton(x_TD, topk_ids_TK, topk_weights_TK, gate_up_EFD, down_EDF) -> torch.Tensor:
    """Same contract as `kernels.reference.expert_ffn_reference`, on Triton kernels."""
    check_operands(x_TD, topk_ids_TK, topk_weights_TK, gate_up_EFD, down_EDF)
    T, E = x_TD.shape[0], gate_up_EFD.shape[0]
    K = topk_ids_TK.shape[1]
    r = build_routing(topk_ids_TK, E, block_m(T * K, E))
    training = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x_TD, topk_weights_TK, gate_up_EFD, down_EDF))
    return _ExpertFFN.apply(x_TD.contiguous(), topk_weights_TK.contiguous(), gate_up_EFD, down_EDF, r, training)
