"""The model one rank trains, for any layout: the whole model in one process or under data
parallelism; under expert parallelism its slice of each MoE block's experts; under pipeline
parallelism its stage (a `launch.parallel.pipeline.StagePipe`).

Where the rank holds only part of the model, a fresh model or one started from a PartSource (our
sharded checkpoint, Hugging Face weights) is built on the meta device, cut, and only this rank's part
is allocated: host memory grows with the part, not the model. Fresh, each tensor draws from the
model's seed and its own name (moe/model.py's init_weights), so the part holds what the whole model
would; from a source, the part's tensors are read from it alone, not drawn first. A Pretrained source (a
checkpoint of the previous format, or any source in one process) is its whole model itself, not a
copy.
"""

from __future__ import annotations

import torch
from torch import nn

from launch.checkpoint.pretrained import PartSource, Pretrained
from launch.parallel.distributed import DistInfo, expert_groups
from moe.config import ModelConfig
from moe.model import Transformer, materialize
from moe.params import count_parameters


def holds_part(info: DistInfo | None) -> bool:
    """Whether this rank holds only part of the model (a pipeline stage, a slice of the experts)."""
    return info is not None and (info.pp_size > 1 or info.ep_size > 1)


def build_rank_model(model_cfg: ModelConfig, init: Pretrained | PartSource | None, info: DistInfo | None,
                     device, pp_size: int, grad_accum: int) -> tuple[nn.Module, dict, int]:
    """(this rank's model, the whole model's parameter counts, the parameters the largest rank
    holds: the host and device memory the layout asks of one process)."""
    part_load = init if isinstance(init, PartSource) else None
    partial = holds_part(info) and (init is None or part_load is not None)
    if partial:
        with torch.device("meta"):
            model = Transformer(model_cfg)
    else:
        model = (Transformer(model_cfg) if init is None else init.model.train()).to(device)
    counts = count_parameters(model)
    if info is not None and info.ep_size > 1:  # each rank's slice of the experts, before the cut
        from launch.parallel.expert_parallel import apply_expert_parallel

        ep_group, _, group_name = expert_groups(info.ep_size, pp_size=info.pp_size)
        apply_expert_parallel(model, ep_group, group_name)
    load = part_load.load_into if part_load is not None else None  # a stage holds the single-device names
    if pp_size > 1:  # from here on `model` is this rank's pipeline stage (launch/parallel/pipeline.py)
        from launch.parallel.pipeline import build_pipeline_module

        model = build_pipeline_module(model, pp_size, grad_accum, device=device, load=load)
    elif partial:
        materialize(model, device, model.init_seed, model_cfg.init_std, load=load)
    rank_params = torch.tensor(sum(p.numel() for p in model.parameters()), device=device)
    if info is not None:
        torch.distributed.all_reduce(rank_params, op=torch.distributed.ReduceOp.MAX)
    return model, counts, int(rank_params)
