"""Pure-PyTorch causal attention that also reports each head's largest logit: the oracle of
`kimi_kernels.attention.flash_attention`.

Shape legend: B batch, H heads, T sequence, Q query/key head dim (N + R in MLA), V value head dim.

Deliberately the textbook formula, materialising the whole [B, H, T, T] score matrix in fp32, so
that it is obviously right rather than fast. Backward is whatever autograd makes of it.
"""

import torch


def attention_reference(q_BHTQ: torch.Tensor, k_BHTQ: torch.Tensor, v_BHTV: torch.Tensor, scale: float):
    """Causal softmax(scale * q k^T) v, computed in fp32 and returned in the inputs' dtype, and
    max_logit_H [H] fp32: the largest scale * q.k over the batch, every query and the keys it may
    see (s <= t), the number QK-clip (Kimi K2 §2.1) compares with its threshold. No gradient flows
    through max_logit_H."""
    T = q_BHTQ.shape[2]
    scores_BHTT = scale * torch.matmul(q_BHTQ.float(), k_BHTQ.float().transpose(-1, -2))
    visible_TT = torch.ones(T, T, dtype=torch.bool, device=q_BHTQ.device).tril()
    scores_BHTT = scores_BHTT.masked_fill(~visible_TT, float("-inf"))
    max_logit_H = scores_BHTT.detach().amax(dim=(0, 2, 3))
    out_BHTV = torch.matmul(torch.softmax(scores_BHTT, dim=-1), v_BHTV.float())
    return out_BHTV.to(v_BHTV.dtype), max_logit_H
