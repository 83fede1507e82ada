"""Parameter counts: total, and activated per token (what a forward pass multiplies with); the
tensors a model's saved state holds."""

import torch
from torch import nn

from moe.config import ModelConfig
from moe.moe import RoutedExperts


def count_parameters(model: nn.Module) -> dict:
    """{"total": N, "active": N}: active counts K of E routed experts per MoE layer, plus all the
    rest (attention, dense layers, shared experts, router, norms, embedding and head), the same
    reckoning as the published Kimi K2 / DeepSeek-V3 figures. Works on the meta device."""
    cfg: ModelConfig = model.cfg
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            per_expert = (module.gate_up_proj.numel() + module.down_proj.numel()) // module.gate_up_proj.shape[0]
            inactive += (module.gate_up_proj.shape[0] - cfg.num_experts_per_tok) * per_expert
    return {"total": total, "active": total - inactive}


def model_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter (a tied one once, under its first name) and persistent buffer."""
    kept = set(model.state_dict().keys())
    return list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if n in kept]
