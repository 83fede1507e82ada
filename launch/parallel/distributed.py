"""Process groups for data and expert parallelism, set up from what the launcher put in the environment.

`torchrun` and the `deepspeed` launcher both export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; with none of them set the run is a single process and nothing here is initialised.

Rank layout (DeepSpeed's, `deepspeed.utils.groups`): expert-parallel groups are runs of `ep_size`
consecutive ranks, [0, 1], [2, 3], ...; the expert-data-parallel groups stride across them,
[0, 2, 4, ...], [1, 3, 5, ...]. Consecutive ranks share a node, so the all-to-all of the token
dispatch stays on the fast intra-node links when ep_size <= GPUs per node.

With pipeline parallelism (launch/parallel/pipeline.py) the ranks form DeepSpeed's
`PipeDataParallelTopology` grid, pipe outermost: stage s holds the world/pp consecutive ranks
[s*D, (s+1)*D), D = world/pp, which are that stage's data-parallel group. The expert groups above
are then built inside each stage (`expert_groups(ep, pp_size=pp)`), so an all-to-all never crosses
a stage boundary and an expert's gradient is averaged only over copies of the same layer.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe.config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    ep_size: int
    pp_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        """Data-parallel size of the dense weights: ranks that see different tokens (all ranks of a
        pipeline stage; every rank without pipeline parallelism)."""
        return self.world_size // self.pp_size

    @property
    def dp_rank(self) -> int:
        """Which shard of each step's data this rank reads: its place within its pipeline stage."""
        return self.rank % self.dp_size

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size


def launched() -> bool:
    """Whether a launcher (torchrun, deepspeed) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def skip_deepspeed_shm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce op (~100 s on 2 cores).

    That op only speeds up `inference_all_reduce` within one node on the CPU accelerator; training's
    collectives go through torch.distributed (gloo on CPU, NCCL on GPU) either way. DeepSpeed reads
    the op's availability from the `__compatible_ops__` table before building it, so marking it
    unavailable is enough. On GPU machines the table entry is never consulted.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(device: torch.device, ep_size: int, timeout_s: float, pp_size: int = 1) -> DistInfo:
    """Join the job's default process group (NCCL on CUDA, gloo otherwise) and check the EP layout.

    `timeout_s` bounds how long a collective waits for a dead or stuck peer before this rank raises,
    so one lost rank stops the whole run instead of hanging it.
    """
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if ep_size < 1 or world_size % ep_size:
        raise ValueError(
            f"ep_size = {ep_size} must divide the number of processes (WORLD_SIZE = {world_size}); "
            f"valid: {', '.join(str(d) for d in range(1, world_size + 1) if world_size % d == 0)}"
        )
    if pp_size < 1 or world_size % (pp_size * ep_size):
        # A ConfigError (a ValueError): the trainer reports it as one line, naming the fields.
        raise ConfigError(
            f"pp_size x ep_size = {pp_size} x {ep_size} must divide the number of processes (WORLD_SIZE = "
            f"{world_size}): each of the pp_size pipeline stages holds world/pp ranks, in groups of ep_size"
        )
    if not dist.is_initialized():
        import deepspeed

        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        else:
            skip_deepspeed_shm_build()
        # deepspeed.comm wraps torch.distributed; initialising through it lets deepspeed.initialize
        # reuse the group instead of creating its own with the default 30-minute timeout.
        deepspeed.init_distributed(
            dist_backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            verbose=False,
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, ep_size=ep_size, pp_size=pp_size)


def expert_groups(ep_size: int, pp_size: int = 1) -> tuple[dist.ProcessGroup, dist.ProcessGroup, str]:
    """(expert-parallel group, expert-data-parallel group, DeepSpeed group name) of this rank.

    Created through `deepspeed.utils.groups` so the ZeRO optimizer reduces expert gradients over
    the very same expert-data-parallel group the dispatch layer assumes. With `pp_size` > 1 both
    stay inside this rank's pipeline stage (the module docstring's layout). The groups of one
    ep_size are made once per process, so a process uses one pp_size with them.
    """
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size, pp_size=pp_size)
    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name), name


@torch.no_grad()
def all_reduce_router_counts(model: torch.nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum every router's `tokens_per_expert_E` over the ranks of `group` (default all), so the bias
    update that follows sees the global load and leaves every rank's bias identical. One collective
    for all layers. Under pipeline parallelism `group` is the stage's data-parallel group: the ranks
    that hold the same routers."""
    routers = model.routers()
    if not routers or not dist.is_initialized():
        return
    flat = torch.cat([r.tokens_per_expert_E for r in routers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    for r, counts in zip(routers, flat.split([r.tokens_per_expert_E.numel() for r in routers])):
        r.tokens_per_expert_E.copy_(counts)


def sum_gradients(model: torch.nn.Module) -> None:
    """Sum every trainable parameter's gradient over ranks in one collective; a rank's missing
    gradient (an expert it never routed to) counts as zeros. For trainers that replicate the
    model without DeepSpeed (RL, TRM): they weight their losses so the sum is the global mean."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))
