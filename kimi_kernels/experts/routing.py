"""Routing metadata for the grouped expert kernels, built on the device with no host sync.

Shape legend: T tokens, K experts per token, E experts, A = T*K assignments (flat index a = t*K + k),
i = position of an assignment once sorted by expert, B = row blocks of `block_m` sorted rows.

The grouped GEMMs launch a fixed grid of `num_blocks` row blocks, an upper bound known on the host
(cdiv(A, BM) + min(E, A): each non-empty expert adds at most one partial block), and each program
looks its block up in `block_expert_B` / `block_row_B`; blocks past the real count carry the
sentinel expert E and exit at once. So nothing is read back from the GPU to size a launch.
"""

from dataclasses import dataclass

import torch
import triton


@dataclass
class Routing:
    order_A: torch.Tensor  # int32 [A]: sorted position i -> assignment a (stable: ties keep token order)
    token_A: torch.Tensor  # int32 [A]: sorted position i -> token t = a // K
    offsets_E1: torch.Tensor  # int32 [E+1]: expert e owns sorted rows offsets[e]:offsets[e+1]
    block_expert_B: torch.Tensor  # int32 [num_blocks]: expert of each row block, E when unused
    block_row_B: torch.Tensor  # int32 [num_blocks]: first sorted row of each block
    block_m: int
    num_experts: int
    top_k: int

    @property
    def num_blocks(self) -> int:
        return self.block_expert_B.numel()


def build_routing(topk_ids_TK: torch.Tensor, num_experts: int, block_m: int) -> Routing:
    T, K = topk_ids_TK.shape
    A, E = T * K, num_experts
    dev = topk_ids_TK.device
    # Radix sort on small integer keys; `stable` gives the same order as megatron's permute
    # (expert-major, token order inside an expert).
    sorted_ids_A, order_A = torch.sort(topk_ids_TK.reshape(-1), stable=True)
    # Offsets by binary search on the sorted ids: no histogram, no atomics, and unlike
    # torch.bincount on CUDA no read-back of the max id.
    offsets_E1 = torch.searchsorted(sorted_ids_A, torch.arange(E + 1, device=dev, dtype=sorted_ids_A.dtype))
    counts_E = offsets_E1[1:] - offsets_E1[:-1]
    blocks_E = (counts_E + block_m - 1) // block_m
    block_end_E = torch.cumsum(blocks_E, 0)
    num_blocks = triton.cdiv(A, block_m) + min(E, A)
    b_B = torch.arange(num_blocks, device=dev)
    block_expert_B = torch.searchsorted(block_end_E, b_B, right=True)  # E past the last real block
    e_B = block_expert_B.clamp(max=E - 1)
    block_row_B = offsets_E1[e_B] + (b_B - (block_end_E - blocks_E)[e_B]) * block_m
    return Routing(
        order_A=order_A.to(torch.int32),
        token_A=torch.div(order_A, K, rounding_mode="floor").to(torch.int32),
        offsets_E1=offsets_E1.to(torch.int32),
        block_expert_B=block_expert_B.to(torch.int32),
        block_row_B=block_row_B.to(torch.int32),
        block_m=block_m,
        num_experts=E,
        top_k=K,
    )

