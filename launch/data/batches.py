"""Batch iterators over packed examples (a [N, T+1] tensor from `launch.data.build.build_data`).

Shapes: N examples, T = seq_len, B = micro-batch size, W = data-parallel world size.

`TrainBatches` walks an endless stream: epoch e visits the examples in the order of a permutation
seeded by (seed, e). The stream is consumed in rows of B*W examples; rank r takes slots
[r*B, (r+1)*B) of each row. So one optimizer step of grad_accum micro-batches on W ranks sees
exactly the examples that one process with grad_accum*W micro-batches would, and the ranks' shards
are disjoint. An epoch's last partial row is dropped so every rank gets the same number of batches.

The position is one number, `offset`: how many examples of the current epoch's order all ranks
together have consumed. It is the same on every rank, so rank 0's `state_dict()` resumes every
rank, and it stays exact when the resumed run uses a different B or W.
"""

from __future__ import annotations

import numpy as np
import torch

from moe.config import ConfigError
from moe.model import IGNORE_INDEX


def _split(batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[B, T+1] windows -> (inputs, targets); [B, 3, T+1] conversation rows (tokens, loss mask,
    document ids; posttrain/sft_data.py) -> (inputs, targets, document ids), where a target is
    IGNORE_INDEX unless the mask keeps it and it lies in the same document as its input."""
    # Contiguous copies: the model flattens targets with .view(-1).
    batch = batch.long()
    if batch.ndim == 2:
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    tokens_BT1, mask_BT1, document_BT1 = batch.unbind(1)
    keep_BT = mask_BT1[:, 1:].bool() & (document_BT1[:, 1:] == document_BT1[:, :-1])
    targets_BT = torch.where(keep_BT, tokens_BT1[:, 1:], IGNORE_INDEX)
    return tokens_BT1[:, :-1].contiguous(), targets_BT.contiguous(), document_BT1[:, :-1].contiguous()


class TrainBatches:
    """Endless iterator of (inputs [B, T], targets [B, T]) int64 for one data-parallel rank; with
    conversation rows, (inputs, targets, document ids [B, T])."""

    def __init__(self, examples: torch.Tensor, micro_batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"TrainBatches: rank = {rank}, world_size = {world_size}; need 0 <= rank < world_size")
        if micro_batch_size < 1:
            raise ConfigError(f"TrainBatches: micro_batch_size = {micro_batch_size} must be >= 1")
        if micro_batch_size * world_size > len(examples):
            raise ConfigError(
                f"micro_batch_size * world_size = {micro_batch_size} * {world_size} exceeds the {len(examples)} "
                "training examples; use more data, a shorter seq_len or a smaller batch"
            )
        self.examples = examples
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.offset = 0
        self._order_epoch, self._order = -1, None

    def _order_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._order_epoch:
            # SeedSequence mixes (seed, epoch) so nearby seeds give unrelated orders.
            rng = np.random.default_rng([self.seed, epoch])
            self._order = torch.from_numpy(rng.permutation(len(self.examples)))
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.micro_batch_size * self.world_size
        if self.offset + row > len(self.examples):
            self.epoch, self.offset = self.epoch + 1, 0
        start = self.offset + self.rank * self.micro_batch_size
        index_B = self._order_of(self.epoch)[start : start + self.micro_batch_size]
        self.offset += row
        return _split(self.examples[index_B])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "num_examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off. The seed and data must match: another order would skip and repeat."""
        for key, mine in (("seed", self.seed), ("num_examples", len(self.examples))):
            if state.get(key) != mine:
                raise ConfigError(
                    f"data iterator state has {key} = {state.get(key)!r} but this run has {mine!r}; "
                    "resuming would skip and repeat examples"
                )
        if not 0 <= state["offset"] <= len(self.examples) or state["epoch"] < 0:
            raise ConfigError(f"data iterator state has epoch = {state['epoch']}, offset = {state['offset']}; out of range")
        self.epoch, self.offset = state["epoch"], state["offset"]


class ValBatches:
    """The first min(N, B * num_batches) examples in order, as (inputs, targets) batches of up to B.

    Iterating again yields the same batches, so validation losses are comparable across steps.
    """

    def __init__(self, examples: torch.Tensor, batch_size: int, num_batches: int):
        if batch_size < 1 or num_batches < 1:
            raise ConfigError(f"ValBatches: batch_size = {batch_size}, num_batches = {num_batches}; both must be >= 1")
        self.examples = examples[: batch_size * num_batches]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.examples), self.batch_size):
            yield _split(self.examples[start : start + self.batch_size])
