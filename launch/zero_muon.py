"""Muon and MuonClip under DeepSpeed ZeRO-1/2: each matrix orthogonalised whole, never a flat shard.

ZeRO-1/2 hand the client optimizer one flat fp32 partition per param group: this rank's slice
[start, start + S) of the group's parameters laid end to end, with `.grad` already averaged over the
group's data-parallel ranks and clipped. Newton-Schulz on such a slice would orthogonalise
fragments of matrices. Following Moonlight's Distributed Muon (Liu et al. 2025, "Muon is Scalable
for LLM Training", §2.3, Algorithm 1), `ZeroMuon` all-gathers the group's gradient partitions,
runs `optim.muon_update` on every matrix that overlaps this rank's slice (whole, with a whole
momentum buffer kept by each rank that owns a piece of it), and applies the update's overlap to the
fp32 master slice. AdamW groups are elementwise and run on the slice as they are. The maths is
`optim.Muon`'s, so one process and N ranks take the same steps up to summation order.

QK-clip (`optim.qk_clip_`) needs the same care: after `engine.step()` it rescales rows of ZeRO's fp32
masters (`zero_row_scaler`), so the clip is part of the weights the next update starts from, and of
the working copy the next forward reads.

Shape legend: S partition length, W = S * dp flat group length (with ZeRO's tail padding).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from optim import adamw_update, muon_update, scale_rows_
from optim.muon import Muon


class ZeroMuon(torch.optim.Optimizer):
    """`optim.Muon`'s groups and update rules, stepped on ZeRO-1/2's flat fp32 partitions.

    Build it from a constructed `Muon`/`MuonClip` (same groups and hyper-parameters), give it to
    `deepspeed.initialize`, then call `attach(engine.optimizer)` once so it knows which parameter
    occupies which range of each flat group.
    """

    def __init__(self, muon: Muon):
        super().__init__([{k: v for k, v in g.items()} for g in muon.param_groups], defaults={})
        self._layout: dict[int, tuple] = {}

    def attach(self, zero_optimizer) -> None:
        for i, flat_part in enumerate(zero_optimizer.single_partition_of_fp32_groups):
            group = zero_optimizer.real_dp_process_group[i]
            flat = zero_optimizer.bit16_groups_flat[i]
            size = zero_optimizer.bit16_groups[i][0].element_size()
            # ZeRO-1/2 keep every parameter's .data as a view into its group's flat buffer.
            spans = [((p.data.data_ptr() - flat.data_ptr()) // size, p.shape)
                     for p in zero_optimizer.bit16_groups[i]]
            start = dist.get_rank(group) * flat_part.numel()
            self._layout[id(flat_part)] = (group, start, spans)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ZeroMuon.step takes no closure (DeepSpeed never passes one)")
        for group in self.param_groups:  # DeepSpeed steps one group at a time
            for part_S in group["params"]:
                if part_S.grad is None:
                    continue
                update_S = self._muon(group, part_S) if group["use_muon"] else self._adamw(group, part_S)
                part_S.mul_(1 - group["lr"] * group["weight_decay"])
                part_S.add_(update_S, alpha=-group["lr"])

    def _adamw(self, group: dict, part_S: torch.Tensor) -> torch.Tensor:
        state = self.state[part_S]
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(part_S), exp_avg_sq=torch.zeros_like(part_S))
        state["step"] += 1
        return adamw_update(part_S.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["betas"], group["eps"])

    def _muon(self, group: dict, part_S: torch.Tensor) -> torch.Tensor:
        if id(part_S) not in self._layout:
            raise RuntimeError("ZeroMuon.attach(engine.optimizer) was not called after deepspeed.initialize")
        pg, start, spans = self._layout[id(part_S)]
        S = part_S.numel()
        grad_W = part_S.grad.new_empty(S * dist.get_world_size(pg))
        dist.all_gather_into_tensor(grad_W, part_S.grad, group=pg)
        # Momentum of each matrix this rank holds a piece of, whole, keyed by its index in the group.
        momenta = self.state[part_S].setdefault("momentum", {})
        update_S = torch.zeros_like(part_S)
        for j, (offset, shape) in enumerate(spans):
            numel = shape.numel()
            lo, hi = max(offset, start), min(offset + numel, start + S)
            if lo >= hi:
                continue
            grad = grad_W[offset:offset + numel].view(shape)
            if j not in momenta:
                momenta[j] = torch.zeros_like(grad)
            full = muon_update(grad, momenta[j], group["momentum"], group["nesterov"], group["ns_steps"],
                               group["ns_dtype"], group["row_blocks"])
            update_S[lo - start:hi - start] = full.reshape(-1)[lo - offset:hi - offset].to(update_S.dtype)
        return update_S


def zero_row_scaler(param: nn.Parameter, scale_P: torch.Tensor) -> None:
    """QK-clip's RowScaler under ZeRO-1/2: scale rows of the fp32 master (gathered whole, written
    back to each rank's partition), and refresh the working weight the next forward reads from it.
    Collective: every rank calls it for the same parameters in the same order (the clip decision is
    made on max logits all-reduced with MAX, so it is)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    master = scale_rows_(safe_get_full_fp32_param(param), scale_P)
    safe_set_full_fp32_param(param, master)
    param.data.copy_(master.to(param.dtype))
