"""Pure-PyTorch reference for the routed-expert computation.

The oracle every kernel (Triton, and the CPU grouped-GEMM path of `kimi_kernels.experts.cpu_ffn`) is tested
against, kept deliberately plain; `KIMI_EXPERT_FFN=reference` runs it in the model. Shape legend:
    T tokens, D hidden, F expert FFN width, E experts, K experts per token, A = T*K assignments.
Expert weights use the Hugging Face DeepseekV3 layout: gate_up_EFD is [E, 2F, D] (gate rows first,
then up rows), down_EDF is [E, D, F].
"""

import torch
import torch.nn.functional as F


def check_operands(x_TD, topk_ids_TK, topk_weights_TK, gate_up_EFD, down_EDF) -> None:
    """The contract every expert-FFN path checks first: ValueError/TypeError naming the operands whose shapes or dtypes disagree."""
    T, D = x_TD.shape
    E, F2, D_w = gate_up_EFD.shape
    if D_w != D or F2 % 2 or down_EDF.shape != (E, D, F2 // 2) or topk_ids_TK.shape != topk_weights_TK.shape \
            or topk_ids_TK.shape[0] != T:
        raise ValueError(
            f"expert_ffn shapes disagree: x {tuple(x_TD.shape)} (want [T, D]), gate_up {tuple(gate_up_EFD.shape)} "
            f"(want [E, 2F, D]), down {tuple(down_EDF.shape)} (want [E, D, F]), topk_ids {tuple(topk_ids_TK.shape)} "
            f"and topk_weights {tuple(topk_weights_TK.shape)} (want [T, K])")
    if not (x_TD.dtype == gate_up_EFD.dtype == down_EDF.dtype):
        raise TypeError(f"expert_ffn wants one dtype for x ({x_TD.dtype}), gate_up ({gate_up_EFD.dtype}) "
                        f"and down ({down_EDF.dtype}); cast the activations or the weights first")


def sort_by_expert(topk_ids_TK: torch.Tensor, num_experts: int):
    """Order the T*K assignments by expert (stable, so ties keep token order).

    Returns order_A (assignment indices, flat over [T, K]) and counts_E (tokens per expert).
    """
    ids_A = topk_ids_TK.reshape(-1)
    order_A = torch.argsort(ids_A, stable=True)
    counts_E = torch.bincount(ids_A, minlength=num_experts)
    return order_A, counts_E


def expert_ffn_reference(
    x_TD: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    gate_up_EFD: torch.Tensor,
    down_EDF: torch.Tensor,
) -> torch.Tensor:
    """y_t = sum_k w_tk * down_e(silu(gate_e x_t) * up_e x_t), e = topk_ids[t, k].

    Sorts the assignments by expert, runs each expert's SwiGLU on its contiguous slice, then
    scatters the weighted outputs back. Dropless: every assignment is computed.
    """
    T, K = topk_ids_TK.shape
    E = gate_up_EFD.shape[0]
    order_A, counts_E = sort_by_expert(topk_ids_TK, E)
    token_A = order_A // K  # which token each sorted assignment belongs to
    x_AD = x_TD[token_A]
    out_AD = torch.empty_like(x_AD)
    # unbind, not gate_up_EFD[e]: its backward stacks the E slices once, where indexing would build
    # (and sum) a full-size zero gradient per expert.
    gate_up_E, down_E = gate_up_EFD.unbind(0), down_EDF.unbind(0)
    # One host sync for the split sizes: acceptable on the reference path, avoided by the kernels.
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n == 0:
            continue
        rows = slice(start, start + n)
        gate, up = F.linear(x_AD[rows], gate_up_E[e]).chunk(2, dim=-1)
        out_AD[rows] = F.linear(F.silu(gate) * up, down_E[e])
        start += n
    w_A = topk_weights_TK.reshape(-1)[order_A].to(out_AD.dtype)
    y_TD = torch.zeros_like(x_TD)
    y_TD.index_add_(0, token_A, out_AD * w_A[:, None])
    return y_TD
