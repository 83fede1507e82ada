"""What each stage of a pipeline really holds on CPU processes, one per stage (DeepSpeed's pipeline
engine, 1F1B, ZeRO-1 inside each stage), for tests/test_plan.py. Built as launch.train builds it:
the model on meta, each rank allocating its own stage, the stage's optimizer from optim.build.

Per case and rank, after a first optimizer step (it creates the optimizer state), three more are
measured as tests/dist/plan_memory_check.py measures them: the persistent tensors by owner (the
stage's parameters, ZeRO's fp32 partitions, the optimizer's state) and the peak (live tensors
when the step starts plus the profiler's highest net allocation during it; the median of three).
The collectives, the pipeline's send and recv among them, are settled first
(tests/dist/settled_collectives.py).
"""

import os
import sys
from pathlib import Path

import torch

import optim
from harness import write_result
from settled_collectives import settle_collectives
from launch.parallel.deepspeed_config import build_deepspeed_config
from launch.parallel.distributed import init_distributed
from launch.parallel.pipeline import build_pipeline_module, build_pipeline_stepper
from launch.runtime import close_process_group
from moe.config import preset
from moe.model import Transformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_plan import live_tensor_bytes, peak_allocated_during, storage_bytes  # noqa: E402  tests/test_plan.py's measures

settle_collectives()
# OUT_DIR T GA [MODEL:OPTIMIZER ...]; the stages are the processes torchrun starts.
out_dir, T, GA, cases = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), [c.split(":") for c in sys.argv[4:]]
PP = int(os.environ["WORLD_SIZE"])
info = init_distributed(torch.device("cpu"), ep_size=1, timeout_s=120, pp_size=PP)
B = 2  # stage s of 1F1B holds min(PP - s, GA) micro-batches in flight at its peak
BUCKET = 2**18  # as plan_memory_check.py: DeepSpeed's default bucket would hide every other term


def _tensors(state):
    for v in state.values():
        if torch.is_tensor(v):
            yield v
        elif isinstance(v, dict):
            yield from _tensors(v)


record = {}
for name, opt_name in cases:
    before = live_tensor_bytes()
    with torch.device("meta"):
        whole = Transformer(preset(name))
    pipe = build_pipeline_module(whole, PP, GA, device=torch.device("cpu"))
    del whole
    ds = build_deepspeed_config(micro_batch_size=B, grad_accum=GA, dp_size=info.dp_size, grad_clip=1.0,
                                zero_stage=1, bf16=False)
    ds["zero_optimization"]["reduce_bucket_size"] = BUCKET
    stepper = build_pipeline_stepper(pipe, optim.build(opt_name, pipe, lr=1e-3), ds, expert_parallel=False)
    g = torch.Generator().manual_seed(0)  # every rank of a pipeline draws the same micro-batches
    ids = torch.randint(0, pipe.model_cfg.vocab_size, (4, GA, B, T + 1), generator=g)

    def step(i):
        batches = iter([(ids[i, k, :, :-1], ids[i, k, :, 1:]) for k in range(GA)])
        stepper.train_step(batches)

    step(0)
    peaks = []
    for i in (1, 2, 3):
        base = sum(v for k, v in live_tensor_bytes().items() if k not in before)
        peaks.append(base + peak_allocated_during(lambda: step(i)))
    zero = stepper.engine.optimizer
    record[f"{name}_{opt_name}"] = {
        "model": name, "optimizer": opt_name, "stage": pipe.stage_id, "bounds": pipe.block_bounds,
        "weights": storage_bytes(pipe.parameters()),
        "fp32_masters": storage_bytes(zero.single_partition_of_fp32_groups),
        "optimizer_state": storage_bytes(v for s in zero.optimizer.state.values() for v in _tensors(s) if v.ndim > 0),
        "peak": sorted(peaks)[1], "peaks": peaks,
    }
    del stepper, pipe, zero
write_result(out_dir, info.rank, {"bucket": BUCKET, "B": B, "T": T, "GA": GA, "pp": PP, "cases": record})
close_process_group()  # barrier first: a rank leaving early makes its peer abort in gloo
