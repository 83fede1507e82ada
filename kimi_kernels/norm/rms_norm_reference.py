"""RMSNorm in PyTorch, the model's definition and the oracle of `kimi_kernels.norm.rms_norm_triton`.

x / rms(x) * weight, with the normalisation in fp32 (as DeepSeek-V3 and its HF port do), its result
rounded to x's dtype, then multiplied by the weight in the promoted dtype. Under bf16 autocast with
an fp32 weight the output is therefore fp32 (elementwise products are not autocast ops).
"""

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)
