"""The MoE feed-forward: router, routed experts stored as stacked [E, ...] tensors, one shared expert.

Shape legend: B batch, T tokens per sequence, N = B*T, D hidden, F expert FFN width, E experts,
K experts per token.
"""

from contextlib import contextmanager

import torch
from torch import nn

import kimi_kernels
from moe.config import ModelConfig
from moe.layers import MLP
from moe.router import Router


class RoutedExperts(nn.Module):
    """E SwiGLU experts as two stacked tensors (HF DeepseekV3 layout), run through `kimi_kernels.expert_ffn`.

    This module is the seam for expert parallelism: a launcher may replace it with one that holds a
    slice of the experts and moves tokens between processes; the call signature stays the same.
    """

    # gate_up_proj stacks two matrices per expert along its rows: gate's F rows, then up's F rows.
    # Whoever treats matrices one by one (Muon's orthogonalisation) reads the split from here.
    row_blocks = {"gate_up_proj": 2}
    # The global index of this module's first expert (moe/model.py's init_weights draws each expert
    # from its own name): 0 here; a slice of the experts held elsewhere sets its own.
    first_expert = 0

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn_size, hidden_size))  # [E, 2F, D]
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size))  # [E, D, F]

    def forward(self, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor, topk_weights_NK: torch.Tensor) -> torch.Tensor:
        x_ND, topk_weights_NK, gate_up, down = autocast_operands(x_ND, topk_weights_NK, self.gate_up_proj, self.down_proj)
        return kimi_kernels.expert_ffn(x_ND, topk_ids_NK, topk_weights_NK, gate_up, down)


def autocast_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast to the autocast dtype when autocast is on, as nn.Linear would have.

    Autocast does not reach custom kernels: without this the grouped GEMMs run on fp32 operands
    (measured 30x slower on an H100 for k2-2b). Inside `weight_casts_once()` a parameter's cast is
    made once and reused, as autocast's own cache does for nn.Linear's weights.
    """
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(_cast(t, dtype) for t in tensors)


# id(parameter) -> (parameter, its version when cast, the cast), while weight_casts_once() is open.
_weight_casts: dict | None = None


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Only casts with an autograd edge are shared: one made under no_grad would cut the gradient of a later user.
    if _weight_casts is None or not (t.is_leaf and t.requires_grad and torch.is_grad_enabled()) or t.dtype == dtype:
        return t.to(dtype)
    hit = _weight_casts.get(id(t))
    # The version check makes a stale copy impossible: an in-place update of the weight (an optimizer
    # step inside the region by mistake) bumps it, and the weight is cast again.
    if hit is None or hit[0] is not t or hit[1] != t._version or hit[2].dtype != dtype:
        hit = (t, t._version, t.to(dtype))
        _weight_casts[id(t)] = hit
    return hit[2]


@contextmanager
def weight_casts_once():
    """Inside, each parameter that `autocast_operands` casts is cast once and the copy reused, so a
    step of many micro-batches casts the routed experts' weights once instead of once per
    micro-batch. The copy keeps its autograd edge to the fp32 parameter, whose gradient accumulates
    in fp32 as before. Open it around a whole optimizer step's forwards and backwards, never across
    the optimizer step (the version check would catch that, at the cost of a new cast)."""
    global _weight_casts
    outer = _weight_casts
    _weight_casts = {} if outer is None else outer
    try:
        yield
    finally:
        _weight_casts = outer


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts) if cfg.num_shared_experts else None
        )
        self.aux_loss = None  # the last forward's balance loss, read by the model

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        routing = self.gate(x_BTD)
        self.aux_loss = routing.aux_loss
        # Gate weights are fp32; the combine runs in the activations' dtype (as the HF port does).
        y_ND = self.experts(x_BTD.reshape(B * T, D), routing.topk_ids_NK, routing.topk_weights_NK.to(x_BTD.dtype))
        y_BTD = y_ND.view(B, T, D)
        if self.shared_experts is not None:
            y_BTD = y_BTD + self.shared_experts(x_BTD)
        return y_BTD
