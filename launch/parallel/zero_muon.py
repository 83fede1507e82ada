"""Muon and MuonClip under DeepSpeed ZeRO-1/2: each matrix orthogonalised whole, never a flat shard.

ZeRO-1/2 hand the client optimizer one flat fp32 partition per param group: this rank's slice
[start, start + S) of the group's parameters laid end to end, with `.grad` already averaged over the
group's data-parallel ranks and clipped. Newton-Schulz on such a slice would orthogonalise
fragments of matrices. Following Moonlight's Distributed Muon (Liu et al. 2025, "Muon is Scalable
for LLM Training", §2.3, Algorithm 1), each rank gathers the gradient of every matrix that overlaps
its slice, runs `optim.muon_chunks` on those matrices (whole, with their momentum kept by the rank),
and applies the update's overlap to its fp32 master slice. AdamW groups are elementwise and run on
the slice as they are. The maths is `optim.Muon`'s, so one process and N ranks take the same steps
up to summation order.

The unit of work is one matrix, not one parameter: an expert stack [E, M, N] is E matrices (2E for a
fused gate/up stack, `row_blocks` 2), each normalised and iterated on its own, so a rank takes only
the experts its slice touches. Per rank that is its 1/N share of the Newton-Schulz work plus at most
one matrix at each end of its slice, which the neighbouring rank also computes. The gradients it
needs, [need_lo, need_hi) of the flat group, come from the ranks that hold them in one uneven
all_to_all: about S elements plus those two boundary matrices, instead of all-gathering the group.

QK-clip (`optim.qk_clip`) needs the same care: after `engine.step()` it rescales rows of ZeRO's fp32
masters (`zero_row_scaler`), so the clip is part of the weights the next update starts from, and of
the working copy the next forward reads.

Shape legend: S partition length, W = S * dp flat group length (with ZeRO's tail padding), R the
needed range's length; a parameter of shape [..., M, N] with row_blocks k is B = numel / (M/k * N)
matrices of m = M/k * N elements each, laid end to end.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from optim import adamw_update, muon_chunks, scale_rows_
from optim.muon import Muon, matrices


def overlapping_matrices(offset: int, numel: int, m: int, lo: int, hi: int) -> tuple[int, int]:
    """[b_lo, b_hi): the matrices of m elements each, laid end to end from `offset` over `numel`
    elements, that intersect the flat range [lo, hi); (0, 0) when none does."""
    lo, hi = max(lo, offset), min(hi, offset + numel)
    if lo >= hi:
        return 0, 0
    return (lo - offset) // m, -(-(hi - offset) // m)


def needed_range(spans: list[tuple[int, torch.Size]], matrix_numels: list[int], lo: int, hi: int) -> tuple[int, int]:
    """[need_lo, need_hi): the flat range covering every matrix that intersects [lo, hi); the
    spans are in flat order, so the covered matrices are contiguous. Empty (lo, lo) if none."""
    covered = []
    for (offset, shape), m in zip(spans, matrix_numels):
        b_lo, b_hi = overlapping_matrices(offset, shape.numel(), m, lo, hi)
        if b_lo < b_hi:
            covered.append((offset + b_lo * m, offset + b_hi * m))
    if not covered:
        return lo, lo
    return covered[0][0], covered[-1][1]


def matrix_momentum(saved: torch.Tensor | None, grad_BMN: torch.Tensor, b_lo: int, b_hi: int) -> torch.Tensor:
    """The momentum [b_hi - b_lo, M, N] of matrices [b_lo, b_hi) of a parameter: zeros at first, the
    saved buffer after that. A checkpoint written when each rank kept whole parameters' momenta holds
    the parameter's every matrix; its rows [b_lo, b_hi) are this rank's, exactly."""
    if saved is None:
        return torch.zeros_like(grad_BMN)
    if saved.shape != grad_BMN.shape:
        return saved.reshape(-1, *grad_BMN.shape[1:])[b_lo:b_hi].clone()
    return saved


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
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for i, flat_part in enumerate(zero_optimizer.single_partition_of_fp32_groups):
            pg = zero_optimizer.real_dp_process_group[i]
            flat = zero_optimizer.bit16_groups_flat[i]
            size = zero_optimizer.bit16_groups[i][0].element_size()
            # ZeRO-1/2 keep every parameter's .data as a view into its group's flat buffer.
            spans = [((p.data.data_ptr() - flat.data_ptr()) // size, p.shape)
                     for p in zero_optimizer.bit16_groups[i]]
            group = group_of[id(flat_part)]
            if not group["use_muon"]:  # AdamW groups step elementwise on the slice: no layout needed
                continue
            matrix_numels = [shape.numel() // matrices(shape, group["row_blocks"])[0] for _, shape in spans]
            S, P = flat_part.numel(), dist.get_world_size(pg)
            needs = [needed_range(spans, matrix_numels, r * S, (r + 1) * S) for r in range(P)]
            self._layout[id(flat_part)] = (pg, dist.get_rank(pg) * S, spans, matrix_numels, needs)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ZeroMuon.step takes no closure (DeepSpeed never passes one)")
        for group in self.param_groups:  # DeepSpeed steps one group at a time
            for part_S in group["params"]:
                if part_S.grad is None:
                    continue
                # Decay first (the direction reads only gradients and state); then the direction is
                # added to the slice as it is made, never held whole (see _muon).
                part_S.mul_(1 - group["lr"] * group["weight_decay"])
                if group["use_muon"]:
                    self._muon(group, part_S)
                else:
                    part_S.add_(self._adamw(group, part_S), alpha=-group["lr"])

    def _adamw(self, group: dict, part_S: torch.Tensor) -> torch.Tensor:
        state = self.state[part_S]
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(part_S), exp_avg_sq=torch.zeros_like(part_S))
        state["step"] += 1
        return adamw_update(part_S.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["betas"], group["eps"])

    @staticmethod
    def _gather_needed(grad_S: torch.Tensor, pg, start: int, needs: list[tuple[int, int]]) -> torch.Tensor:
        """grad_R: the flat gradient over this rank's needed range, from the ranks that hold it;
        `needs` holds every rank's range, `grad_S` this rank's slice [start, start + S)."""
        S = grad_S.numel()
        need_lo, need_hi = needs[dist.get_rank(pg)]
        if len(needs) == 1:  # one replica (a pipeline stage without data parallelism): no copy
            return grad_S[need_lo - start:need_hi - start]
        # To rank r: my slice's overlap with r's needed range; from rank s: s's slice's overlap with mine.
        sends = [(max(lo, start), min(hi, start + S)) for lo, hi in needs]
        send_counts = [max(0, b - a) for a, b in sends]
        recv_counts = [max(0, min(need_hi, (s + 1) * S) - max(need_lo, s * S)) for s in range(len(needs))]
        send_X = torch.cat([grad_S[a - start:a - start + n] for (a, _), n in zip(sends, send_counts)])
        grad_R = grad_S.new_empty(need_hi - need_lo)
        dist.all_to_all_single(grad_R, send_X, recv_counts, send_counts, group=pg)
        return grad_R

    def _muon(self, group: dict, part_S: torch.Tensor) -> None:
        """part_S -= lr * (Muon's direction, on this slice), a chunk of matrices at a time
        (optim.muon_chunks): besides the gathered gradient, only one chunk's Newton-Schulz is held."""
        if id(part_S) not in self._layout:
            raise RuntimeError("ZeroMuon.attach(engine.optimizer) was not called after deepspeed.initialize")
        pg, start, spans, matrix_numels, needs = self._layout[id(part_S)]
        S = part_S.numel()
        need_lo = needs[dist.get_rank(pg)][0]
        grad_R = self._gather_needed(part_S.grad, pg, start, needs)
        # Momentum of the matrices this rank computes, keyed by the parameter's index in the group.
        momenta = self.state[part_S].setdefault("momentum", {})
        for j, ((offset, shape), m) in enumerate(zip(spans, matrix_numels)):
            b_lo, b_hi = overlapping_matrices(offset, shape.numel(), m, start, start + S)
            if b_lo == b_hi:
                continue
            first = offset + b_lo * m
            _, rows, cols = matrices(shape, group["row_blocks"])
            grad = grad_R[first - need_lo:first - need_lo + (b_hi - b_lo) * m].view(b_hi - b_lo, rows, cols)
            buf = momenta[j] = matrix_momentum(momenta.get(j), grad, b_lo, b_hi)
            for c_lo, c_hi, O_CMN in muon_chunks(grad, buf, group["momentum"], group["nesterov"], group["ns_steps"],
                                                 group["ns_dtype"]):
                # The chunk covers flat [first + c_lo m, first + c_hi m); this slice takes its overlap.
                c_first = first + c_lo * m
                lo, hi = max(c_first, start), min(first + c_hi * m, start + S)
                if lo < hi:
                    part_S[lo - start:hi - start].add_(O_CMN.reshape(-1)[lo - c_first:hi - c_first].to(part_S.dtype),
                                                       alpha=-group["lr"])
                del O_CMN  # or it is held while the next chunk is made


def zero_row_scaler(param: nn.Parameter, scale_P: torch.Tensor) -> None:
    """QK-clip's RowScaler under ZeRO-1/2: scale rows of the fp32 master (gathered whole, written
    back to each rank's partition), and refresh the working weight the next forward reads from it.
    Collective: every rank calls it for the same parameters in the same order (the clip decision is
    made on max logits all-reduced with MAX, so it is)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    master = scale_rows_(safe_get_full_fp32_param(param), scale_P)
    safe_set_full_fp32_param(param, master)
    param.data.copy_(master.to(param.dtype))
