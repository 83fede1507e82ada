"""Small building blocks: RMSNorm, the SwiGLU feed-forward, rotary position embedding."""

import torch
import torch.nn.functional as F
from torch import nn

import kimi_kernels


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (as DeepSeek-V3 and its HF port do) and cast back
    (`kimi_kernels.norm.rms_norm_reference` is the definition)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kimi_kernels.rms_norm(x, self.weight, self.eps)  # fused Triton on CUDA, the reference elsewhere


class SwiGLU(nn.Module):
    """silu(gate) * up. A module of its own, without parameters, so that a launcher can recompute it
    in the backward instead of keeping its output (launch/parallel/recompute.py)."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate x) * up x). Dense layers and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = SwiGLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))


def rope_cos_sin(positions_T: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [T, dim/2]: pair i rotates by position * theta^(-2i/dim) (RoFormer eq. 15)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=positions_T.device) / dim))
    angles_TR = positions_T.float()[:, None] * inv_freq[None, :]
    return angles_TR.cos().to(dtype), angles_TR.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of the last dim; x is [B, H, T, dim].

    DeepSeek's checkpoints pair adjacent dims. The result is written de-interleaved (all rotated
    first elements, then all second ones); q and k get the same layout, so q.k is unchanged.
    """
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos_TR - x2 * sin_TR, x2 * cos_TR + x1 * sin_TR], dim=-1)
