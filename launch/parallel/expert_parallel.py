"""Expert parallelism, applied from outside the model: each MoE layer's `RoutedExperts` is swapped for
`ExpertParallelExperts`, which holds this rank's E/P experts and moves token rows to their owners.

Shape legend: N tokens on this rank, D hidden, F expert FFN width, E experts in the model, P ranks in
the expert-parallel group, L = E/P experts per rank, K experts per token, A = N*K assignments sent,
M assignment rows received from all P ranks.

Rank p of the group owns experts [p*L, (p+1)*L). One forward:
  1. sort this rank's A assignments by expert id; that also groups them by owning rank;
  2. all_to_all the per-expert counts [P, L], so every rank knows how many rows of each of its
     experts arrive from each source (splits are uneven, and zero for experts nobody picked);
  3. all_to_all the rows (differentiable), run the local experts on them with
     `kimi_kernels.expert_ffn` (K = 1, local ids, weight 1), all_to_all the results back;
  4. combine at the source: y_n = sum_k w_nk * out_nk, the gate weights never travel.
Backward retraces the same all_to_alls with the splits swapped (`_AllToAll`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import kimi_kernels
from moe.moe import RoutedExperts, autocast_operands

# deepspeed.moe.layer.MoE is what DeepSpeed's engine looks for to turn on expert-aware gradient
# reduction: parameters flagged `allreduce = False` are averaged over their expert-data-parallel
# group only, and the grad norm for clipping is summed over the expert-parallel group. We inherit
# the type for that recognition alone and run our own dispatch (DeepSpeed's layer has its own gate).
from deepspeed.moe.layer import MoE as _DeepSpeedMoEMarker


class _AllToAll(torch.autograd.Function):
    """Differentiable uneven all_to_all_single: rows [sum(send)] -> [sum(recv)]; the gradient goes back
    the same way with the splits swapped."""

    @staticmethod
    def forward(ctx, x_SD, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out_RD = x_SD.new_empty(sum(recv_splits), *x_SD.shape[1:])
        dist.all_to_all_single(out_RD, x_SD.contiguous(), recv_splits, send_splits, group=group)
        return out_RD

    @staticmethod
    def backward(ctx, grad_RD):
        send_splits, recv_splits = ctx.splits
        grad_SD = grad_RD.new_empty(sum(send_splits), *grad_RD.shape[1:])
        dist.all_to_all_single(grad_SD, grad_RD.contiguous(), send_splits, recv_splits, group=ctx.group)
        return grad_SD, None, None, None


class ExpertParallelExperts(_DeepSpeedMoEMarker):
    row_blocks = RoutedExperts.row_blocks  # the same [L, 2F, D] gate/up layout

    def __init__(self, experts: RoutedExperts, ep_group: dist.ProcessGroup, group_name: str):
        nn.Module.__init__(self)  # DeepSpeed's MoE.__init__ builds its own gate and experts: skipped
        E = experts.gate_up_proj.shape[0]
        P = dist.get_world_size(ep_group)
        if E % P:
            raise ValueError(f"num_experts = {E} is not divisible by ep_size = {P}; each rank must hold E/ep experts")
        L = E // P
        p = dist.get_rank(ep_group)
        self.ep_group, self.ep_size, self.ep_rank = ep_group, P, p
        self.num_experts, self.num_local_experts = E, L
        self.first_expert = p * L  # init_weights (moe/model.py) draws each expert by its global index
        self.expert_group_name = group_name
        self.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[p * L:(p + 1) * L].clone())  # [L, 2F, D]
        self.down_proj = nn.Parameter(experts.down_proj.detach()[p * L:(p + 1) * L].clone())  # [L, D, F]
        for param in (self.gate_up_proj, self.down_proj):
            param.allreduce = False  # DeepSpeed: reduce over the expert-data-parallel group only
            param.group_name = group_name

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by DeepSpeed's engine on every MoE layer; our groups exist already (expert_groups)."""

    def forward(self, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor, topk_weights_NK: torch.Tensor) -> torch.Tensor:
        N, K = topk_ids_NK.shape
        P, L = self.ep_size, self.num_local_experts
        ids_A = topk_ids_NK.reshape(-1)
        order_A = torch.argsort(ids_A, stable=True)
        token_A = order_A // K
        counts_PL = torch.bincount(ids_A, minlength=P * L).view(P, L)
        recv_counts_PL = torch.empty_like(counts_PL)
        dist.all_to_all_single(recv_counts_PL, counts_PL, group=self.ep_group)
        # Split sizes are needed on the host: one sync per layer, as in every dropless EP dispatch.
        send_splits = counts_PL.sum(1).tolist()
        recv_splits = recv_counts_PL.sum(1).tolist()

        x_AD = x_ND[token_A]
        x_MD = _AllToAll.apply(x_AD, send_splits, recv_splits, self.ep_group)
        # Rows from each source arrive sorted by expert, so the local id of row m follows from the counts.
        local_ids_M = torch.arange(L, device=x_MD.device).repeat(P).repeat_interleave(recv_counts_PL.reshape(-1))
        ones_M1 = x_MD.new_ones(x_MD.shape[0], 1)
        x_MD, ones_M1, gate_up, down = autocast_operands(x_MD, ones_M1, self.gate_up_proj, self.down_proj)
        y_MD = kimi_kernels.expert_ffn(x_MD, local_ids_M[:, None], ones_M1, gate_up, down)
        y_AD = _AllToAll.apply(y_MD, recv_splits, send_splits, self.ep_group)
        w_A = topk_weights_NK.reshape(-1)[order_A].to(y_AD.dtype)
        return x_ND.new_zeros(x_ND.shape, dtype=y_AD.dtype).index_add_(0, token_A, y_AD * w_A[:, None])


def apply_expert_parallel(model: nn.Module, ep_group: dist.ProcessGroup, group_name: str) -> int:
    """Swap every `RoutedExperts` in `model` for this rank's `ExpertParallelExperts` slice, in place.

    Call on a model whose weights are already identical on all ranks (same seed), before the
    optimizer is built. Returns the number of layers converted.
    """
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, RoutedExperts)]
    for parent, name, child in targets:
        setattr(parent, name, ExpertParallelExperts(child, ep_group, group_name))
    return len(targets)
