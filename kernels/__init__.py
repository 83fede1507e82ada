"""Expert-dispatch kernels. `expert_ffn` is the single entry point the model calls.

On CUDA tensors it runs our Triton kernels (`kernels.triton_ffn`); everywhere else the PyTorch
reference. The choice is made here and nowhere else. `KIMI_EXPERT_FFN=reference` forces the
reference on CUDA too (to bisect a numerical difference without editing code), and
`KIMI_KERNEL_TMA=0` keeps the Triton kernels but drops their TMA candidates (`kernels.tiles`).
"""

import os

import torch

from kernels.reference import expert_ffn_reference


def expert_ffn(x_TD, topk_ids_TK, topk_weights_TK, gate_up_EFD, down_EDF) -> torch.Tensor:
    """Routed-expert SwiGLU FFN with weighted combine. See `kernels.reference` for shapes."""
    if x_TD.is_cuda and os.environ.get("KIMI_EXPERT_FFN", "triton") != "reference":
        # Imported here so CPU-only runs never build Triton kernels (and tests can choose the
        # interpreter before the first import).
        from kernels.triton_ffn import expert_ffn_triton

        return expert_ffn_triton(x_TD, topk_ids_TK, topk_weights_TK, gate_up_EFD, down_EDF)
    return expert_ffn_reference(x_TD, topk_ids_TK, topk_weights_TK, gate_up_EFD, down_EDF)
