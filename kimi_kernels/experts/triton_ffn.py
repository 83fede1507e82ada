"""The Triton expert FFN as one autograd.Function over the kernels in this folder.

Shape legend: T tokens, D hidden, F expert FFN width, E experts, K experts per token,
A = T*K assignments (sorted rows i / token-major rows a, see `kimi_kernels.experts.routing`).

Forward:  routing -> gate_up_swiglu (gathers x) -> scatter_gemm down (gate-weighted, token-major)
          -> combine (skipped for K = 1).
Backward: swiglu_backward (gathers dy; gives dh, dL/dw and w*act) -> scatter_gemm dX -> combine,
          and the two grouped weight-gradient kernels.
Saved for backward: x, the weights and h = [g | u] [A, 2F]; act is recomputed from h in backward.

Each of the six GEMM stages runs through `kimi_kernels.experts.stage_choice`, which may run torch._grouped_mm
(`kimi_kernels.experts.grouped_mm_stages`) in its place where that measured faster on this shape.
"""

import torch

from kimi_kernels.experts import grouped_mm_stages as gmm
from kimi_kernels.experts import stage_choice
from kimi_kernels.experts.combine import combine
from kimi_kernels.experts.grouped_gemm import gate_up_swiglu, scatter_gemm, swiglu_backward
from kimi_kernels.experts.reference import check_operands
from kimi_kernels.experts.routing import Routing, build_routing
from kimi_kernels.experts.wgrad import expert_wgrad
from kimi_kernels.tiles import block_m


class _ExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, topk_weights_TK, gate_up_EFD, down_EDF, r: Routing, training: bool):
        T, D = x_TD.shape
        K = r.top_k
        w_A = topk_weights_TK.reshape(-1)
        key, ok = _stage_key(x_TD, gate_up_EFD, down_EDF, r)
        act_AF, h_AF2 = stage_choice.run(
            "gate_up", key, lambda: gate_up_swiglu(x_TD, gate_up_EFD, r, store_h=training),
            lambda: gmm.gate_up_swiglu(x_TD, gate_up_EFD, r, store_h=training), ok)

        def down_triton():
            # K = 1 (the expert-parallel call): row a is token t, so the GEMM writes y directly.
            return scatter_gemm(act_AF, down_EDF, down_EDF.stride(), x_TD.new_empty(T * K, D), r, gate_w_A=w_A)

        out_AD = stage_choice.run("down", key, down_triton, lambda: gmm.down_forward(act_AF, down_EDF, w_A, r), ok)
        y_TD = out_AD if K == 1 else combine(out_AD, K)
        if training:
            ctx.save_for_backward(x_TD, w_A, gate_up_EFD, down_EDF, h_AF2)
            ctx.routing, ctx.stage_key = r, (key, ok)
            ctx.weights_shape = topk_weights_TK.shape
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, w_A, gate_up_EFD, down_EDF, h_AF2 = ctx.saved_tensors
        r: Routing = ctx.routing
        need_x, need_w, need_gu, need_down = ctx.needs_input_grad[:4]
        dy_TD = dy_TD.contiguous()
        dx = dw = dgu = ddown = None
        key, ok = ctx.stage_key
        dh_AF2, dw_sorted_A, act_w_AF = stage_choice.run(
            "swiglu_backward", key, lambda: swiglu_backward(dy_TD, down_EDF, h_AF2, w_A, r),
            lambda: gmm.swiglu_backward(dy_TD, down_EDF, h_AF2, w_A, r), ok)
        if need_x:
            T, D = x_TD.shape

            def dx_triton():
                s = gate_up_EFD.stride()  # W_e^T: [N=D, K=2F]
                return scatter_gemm(dh_AF2, gate_up_EFD, (s[0], s[2], s[1]), dy_TD.new_empty(T * r.top_k, D), r)

            dx_AD = stage_choice.run("dx", key, dx_triton, lambda: gmm.input_grad(dh_AF2, gate_up_EFD, r), ok)
            dx = dx_AD if r.top_k == 1 else combine(dx_AD, r.top_k)
        if need_w:
            dw = torch.empty_like(w_A).index_copy_(0, r.order_A.long(), dw_sorted_A.to(w_A.dtype))
            dw = dw.view(ctx.weights_shape)
        if need_gu:
            dgu = stage_choice.run(
                "wgrad_gate_up", key,
                lambda: expert_wgrad(dh_AF2, x_TD, r, l_gather=False, r_gather=True, out_dtype=gate_up_EFD.dtype),
                lambda: gmm.wgrad_gate_up(dh_AF2, x_TD, r, gate_up_EFD.dtype), ok)
        if need_down:
            ddown = stage_choice.run(
                "wgrad_down", key,
                lambda: expert_wgrad(dy_TD, act_w_AF, r, l_gather=True, r_gather=False, out_dtype=down_EDF.dtype),
                lambda: gmm.wgrad_down(dy_TD, act_w_AF, r, down_EDF.dtype), ok)
        return dx, dw, dgu, ddown, None, None


def _stage_key(x_TD, gate_up_EFD, down_EDF, r: Routing) -> tuple[tuple, bool]:
    """The stage choice's key for this problem, and whether torch._grouped_mm can run its stages."""
    E, F2, D = gate_up_EFD.shape
    A = r.order_A.numel()
    key = (str(x_TD.device), str(x_TD.dtype).removeprefix("torch."), E, D, F2 // 2, stage_choice.rows_bucket(A))
    return key, A > 0 and gmm.available(x_TD, gate_up_EFD, down_EDF)


def expert_ffn_triton(x_TD, topk_ids_TK, topk_weights_TK, gate_up_EFD, down_EDF) -> torch.Tensor:
    """Same contract as `kimi_kernels.experts.reference.expert_ffn_reference`, on Triton kernels."""
    check_operands(x_TD, topk_ids_TK, topk_weights_TK, gate_up_EFD, down_EDF)
    T, E = x_TD.shape[0], gate_up_EFD.shape[0]
    K = topk_ids_TK.shape[1]
    r = build_routing(topk_ids_TK, E, block_m(T * K, E))
    training = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x_TD, topk_weights_TK, gate_up_EFD, down_EDF))
    return _ExpertFFN.apply(x_TD.contiguous(), topk_weights_TK.contiguous(), gate_up_EFD, down_EDF, r, training)
