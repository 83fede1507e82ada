"""The Triton expert FFN's six stages on torch._grouped_mm, each a drop-in for one of our kernels.

Shape legend: T tokens, D hidden, F expert FFN width, E experts, K experts per token, A = T*K
assignments, in expert-sorted rows i or token-major rows a (`kimi_kernels.experts.routing`).

Each function takes and returns what the kernel it stands in for does (`kimi_kernels.experts.grouped_gemm`,
`kimi_kernels.experts.wgrad`), so `kimi_kernels.experts.triton_ffn` can run any mix of the two, stage by stage, as
`kimi_kernels.experts.stage_choice` decides. What our kernels fuse runs here as separate ops: the row gather
(`x[token]`), the scatter back to token-major rows (`index_copy_`) and SwiGLU's elementwise maths
(in fp32, rounded once to the operand dtype as the kernels do). The GEMMs themselves are
torch._grouped_mm over the sorted rows, with Routing's offsets as its group ends.
"""

import torch

from kimi_kernels.experts.cpu_ffn import grouped_mm_fits
from kimi_kernels.experts.routing import Routing
from kimi_kernels.tiles import tma_compatible


def available(x_TD: torch.Tensor, gate_up_EFD: torch.Tensor, down_EDF: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes this problem's operands (it raises otherwise): on CUDA bf16 on
    sm90+ only; everywhere the CPU path's dtype and 16-byte row rule (`cpu_ffn.grouped_mm_fits`);
    and every operand row-major with a 16-byte aligned base and strides (a weight that is a view
    into a flat buffer, as DeepSpeed's, may not be)."""
    if x_TD.is_cuda and (x_TD.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x_TD.device) < (9, 0)):
        return False
    return grouped_mm_fits(x_TD.dtype, gate_up_EFD.shape[-1], down_EDF.shape[-1]) and all(
        t.stride(-1) == 1 and tma_compatible(t) for t in (x_TD, gate_up_EFD, down_EDF))


def _ends(r: Routing) -> torch.Tensor:
    """Group ends for torch._grouped_mm: the cumulative row counts, int32 [E]."""
    return r.offsets_E1[1:]


def _to_token_major(out_iN: torch.Tensor, r: Routing) -> torch.Tensor:
    """Rows in sorted order i -> rows a = order[i] (what the kernels' scatter epilogue writes)."""
    return torch.empty_like(out_iN).index_copy_(0, r.order_A.long(), out_iN)


def gate_up_swiglu(x_TD, gate_up_EFD, r: Routing, store_h: bool):
    """act_AF = silu(g) * u and h_AF2 = [g | u] (if store_h), [g | u] = x_t gate_up_e^T per sorted row."""
    h_AF2 = torch._grouped_mm(x_TD[r.token_A.long()], gate_up_EFD.transpose(-2, -1), offs=_ends(r))
    g, u = h_AF2.float().chunk(2, dim=-1)
    act_AF = (torch.nn.functional.silu(g) * u).to(x_TD.dtype)
    return act_AF, (h_AF2 if store_h else None)


def down_forward(act_AF, down_EDF, gate_w_A, r: Routing):
    """out_AD token-major: row order[i] = gate_w[order[i]] * act_i down_e^T."""
    out_AD = torch._grouped_mm(act_AF, down_EDF.transpose(-2, -1), offs=_ends(r))
    w_A = gate_w_A[r.order_A.long()].float()[:, None]
    return _to_token_major((out_AD.float() * w_A).to(act_AF.dtype), r)


def input_grad(dh_AF2, gate_up_EFD, r: Routing):
    """dx_AD token-major: row order[i] = dh_i gate_up_e (the gathered x's gradient, before combine)."""
    return _to_token_major(torch._grouped_mm(dh_AF2, gate_up_EFD, offs=_ends(r)), r)


def swiglu_backward(dy_TD, down_EDF, h_AF2, gate_w_A, r: Routing):
    """(dh_AF2, dw_A, act_w_AF) per sorted row, as `kimi_kernels.experts.grouped_gemm.swiglu_backward`:
    d_act = w_a dy_t down_e, dw_a = <dy_t down_e, act_i> (fp32), act_w = w_a act_i."""
    dact_AF = torch._grouped_mm(dy_TD[r.token_A.long()], down_EDF, offs=_ends(r)).float()
    g, u = h_AF2.float().chunk(2, dim=-1)
    sig = torch.sigmoid(g)
    silu = g * sig
    act = silu * u
    dw_A = (dact_AF * act).sum(-1)
    w_A = gate_w_A[r.order_A.long()].float()[:, None]
    dact_AF = dact_AF * w_A
    dh_AF2 = torch.cat([dact_AF * u * sig * (1 + g * (1 - sig)), dact_AF * silu], dim=-1).to(h_AF2.dtype)
    return dh_AF2, dw_A, (act * w_A).to(h_AF2.dtype)


def wgrad_gate_up(dh_AF2, x_TD, r: Routing, out_dtype):
    """[E, 2F, D] = sum over expert e's sorted rows of dh_i^T x_t."""
    return torch._grouped_mm(dh_AF2.t(), x_TD[r.token_A.long()], offs=_ends(r)).to(out_dtype)


def wgrad_down(dy_TD, act_w_AF, r: Routing, out_dtype):
    """[E, D, F] = sum over expert e's sorted rows of dy_t^T (w_a act_i)."""
    return torch._grouped_mm(dy_TD[r.token_A.long()].t(), act_w_AF, offs=_ends(r)).to(out_dtype)
