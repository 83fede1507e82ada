"""Kernel dispatch: `expert_ffn` (routed experts) and `causal_attention` (MLA) are what the model calls.

On CUDA tensors `expert_ffn` runs our Triton kernels (`kimi_kernels.experts.triton_ffn`); everywhere else the grouped-GEMM
path of `kimi_kernels.experts.cpu_ffn`. The choice is made here and nowhere else. `KIMI_EXPERT_FFN=reference`
forces the PyTorch reference on every device (to bisect a numerical difference without editing
code), and `KIMI_KERNEL_TMA=0` keeps the Triton kernels but drops their TMA candidates (`kimi_kernels.tiles`).
Inside the Triton FFN each GEMM stage may run torch._grouped_mm instead, where that times faster
(`kimi_kernels.experts.stage_choice`, `KIMI_EXPERT_STAGES`).

`rms_norm` runs our Triton RMSNorm (`kimi_kernels.norm.rms_norm_triton`) on CUDA and its PyTorch reference elsewhere;
`KIMI_RMSNORM=reference` forces the reference on CUDA too.

`causal_attention` is the same kind of entry point for MLA's unpacked batches: our Triton flash
attention (`kimi_kernels.attention.flash_attention`) on CUDA, torch's SDPA elsewhere; `KIMI_ATTENTION=sdpa` forces
SDPA on CUDA too.

The package is `kimi_kernels`, not `kernels`: transformers >= 5.25 imports Hugging Face's `kernels`
package, and a top-level `kernels` of ours shadowed it, so `import transformers` models failed.
"""

import os

import torch
import torch.nn.functional as F

from kimi_kernels.experts.cpu_ffn import expert_ffn_cpu
from kimi_kernels.experts.reference import expert_ffn_reference
from kimi_kernels.norm.rms_norm_reference import rms_norm_reference


def expert_ffn(x_TD, topk_ids_TK, topk_weights_TK, gate_up_EFD, down_EDF) -> torch.Tensor:
    """Routed-expert SwiGLU FFN with weighted combine. See `kimi_kernels.experts.reference` for shapes."""
    if os.environ.get("KIMI_EXPERT_FFN") == "reference":
        return expert_ffn_reference(x_TD, topk_ids_TK, topk_weights_TK, gate_up_EFD, down_EDF)
    if x_TD.is_cuda:
        # Imported here so CPU-only runs never build Triton kernels (and tests can choose the
        # interpreter before the first import).
        from kimi_kernels.experts.triton_ffn import expert_ffn_triton

        return expert_ffn_triton(x_TD, topk_ids_TK, topk_weights_TK, gate_up_EFD, down_EDF)
    return expert_ffn_cpu(x_TD, topk_ids_TK, topk_weights_TK, gate_up_EFD, down_EDF)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dim (`kimi_kernels.norm.rms_norm_reference` defines it)."""
    if x.is_cuda and os.environ.get("KIMI_RMSNORM") != "reference":
        from kimi_kernels.norm.rms_norm_triton import rms_norm_triton  # here, for the same reason as in expert_ffn

        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


_ATTENTION_CHOICES = ("flash", "sdpa")
_FLASH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def causal_attention(q_BHTQ, k_BHTQ, v_BHTV, scale: float):
    """Causal softmax(scale q k^T) v as (out [B, H, T, V], max_logit_H [H] fp32 or None).

    Our flash attention (CUDA, fp32/fp16/bf16) reports each head's largest logit at no extra cost;
    SDPA cannot, so that path returns None and a caller that needs the max measures it itself.
    """
    choice = os.environ.get("KIMI_ATTENTION", "flash")
    if choice not in _ATTENTION_CHOICES:
        raise ValueError(f"KIMI_ATTENTION={choice!r}; valid: {', '.join(_ATTENTION_CHOICES)} (default flash)")
    if choice == "flash" and q_BHTQ.is_cuda and q_BHTQ.dtype in _FLASH_DTYPES:
        from kimi_kernels.attention.flash_attention import flash_attention  # here, for the same reason as in expert_ffn

        return flash_attention(q_BHTQ, k_BHTQ, v_BHTV, scale)
    return F.scaled_dot_product_attention(q_BHTQ, k_BHTQ, v_BHTV, is_causal=True, scale=scale), None
