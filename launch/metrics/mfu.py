"""Model FLOPs utilisation: the training FLOPs a step needs, over what the GPUs could do at bf16 peak.

FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B, with MLA's head dims): 6 per activated
parameter (forward 2, backward 4) plus causal attention's score and value products,
6 * L * H * (qk_head_dim + v_head_dim) * T / 2 per token. Peaks are the vendors' dense bf16 figures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe.config import ModelConfig

if TYPE_CHECKING:  # imported where a device is asked about, so launch.plan never loads torch
    import torch

# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name().
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "B200": 2250e12,
             "L40S": 362e12, "A10G": 70e12}


def flops_per_token(cfg: ModelConfig, active_params: int, seq_len: int) -> float:
    attention = 6 * cfg.num_layers * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    return 6 * active_params + attention


def gpu_peak_flops(device: torch.device) -> float | None:
    """This GPU's bf16 peak, or None off GPU or for a GPU not in the table (then no MFU is logged)."""
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)
