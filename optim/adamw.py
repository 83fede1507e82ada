"""AdamW on every parameter: the baseline the Muon variants are compared against."""

import torch
from torch import nn


def build(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
          eps: float = 1e-8) -> torch.optim.AdamW:
    """The registry's "adamw": torch.optim.AdamW, one group, decoupled weight decay on all parameters."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
