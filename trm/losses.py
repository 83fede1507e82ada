"""The output losses TRM trains with: stable-max cross-entropy (the reference code's) or softmax's.

Stable-max (Prieto et al. 2025, "Grokking at the edge of numerical stability") replaces exp in the
softmax by s(x) = x + 1 for x >= 0 and 1 / (1 - x) below: it grows linearly, so a confident model's
logits cannot run away to where float rounding swallows the loss (softmax collapse). Computed in
float64, as the reference does, since s(x) can be tiny for very negative logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log_stablemax(logits: torch.Tensor) -> torch.Tensor:
    x = logits.double()
    s = torch.where(x >= 0, x + 1, 1 / (1 - x))
    return s.log() - s.sum(-1, keepdim=True).log()


def token_losses(logits_BLV: torch.Tensor, targets_BL: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-cell loss [B, L] (float32)."""
    if kind == "stablemax":
        logp = log_stablemax(logits_BLV)
        return -logp.gather(-1, targets_BL[..., None]).squeeze(-1).float()
    if kind == "softmax":
        return F.cross_entropy(logits_BLV.float().transpose(1, 2), targets_BL, reduction="none")
    raise ValueError(f"loss = {kind!r}; valid: stablemax, softmax")
