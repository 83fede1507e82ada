"""What one rank really holds under DeepSpeed ZeRO on 2 CPU processes, for tests/test_plan.py.

For each case a fresh engine takes one optimizer step (grad_accum micro-batches) to create its
state, then three more under torch.profiler's memory events. Measured per rank:
  - persistent tensors after the step, by owner: the module's parameters (ZeRO-1/2: views of its
    flat buffers, padding included), ZeRO's fp32 partitions (the masters), the client optimizer's
    state (0-d counters left out); each storage counted once;
  - peak: the tensor bytes live when a profiled step starts (everything the case created, found
    through the garbage collector) plus the highest running sum of the allocations and frees the
    profiler records during that step; the median of the three steps.

The collectives are wrapped first (tests/dist/settled_collectives.py says why): with them every
free lands on the main thread, where the profiler records it.
"""

import sys
from pathlib import Path

import torch

import optim
from harness import write_result
from settled_collectives import settle_collectives
from launch.parallel.deepspeed_config import build_deepspeed_config
from launch.parallel.distributed import expert_groups, init_distributed
from launch.parallel.engine import build_deepspeed_stepper, finish_step
from launch.parallel.expert_parallel import apply_expert_parallel
from launch.runtime import close_process_group
from moe.config import preset
from moe.model import Transformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_plan import live_tensor_bytes, peak_allocated_during, storage_bytes  # noqa: E402  tests/test_plan.py's measures


settle_collectives()
out_dir = sys.argv[1]
info = init_distributed(torch.device("cpu"), ep_size=1, timeout_s=120)
B, T, GA = 2, 64, 2
# DeepSpeed allocates its whole reduce bucket (default 5e8 elements, 2 GB in fp32) whatever the
# model's size; a small one keeps the other terms visible. The planner is told the same size.
BUCKET = 2**18


def _tensors(state):
    for v in state.values():
        if torch.is_tensor(v):
            yield v
        elif isinstance(v, dict):  # ZeroMuon keeps Muon momenta per parameter index in a dict
            yield from _tensors(v)


record = {}
CASES = (("tiny", "muon", 1, 1), ("tiny", "adamw", 2, 1), ("small", "muonclip", 1, 1), ("small", "muon", 2, 2))
for name, opt_name, stage, ep in CASES:
    before = live_tensor_bytes()
    torch.manual_seed(0)
    model = Transformer(preset(name))
    if ep > 1:
        group, _, group_name = expert_groups(ep)
        apply_expert_parallel(model, group, group_name)
    ds = build_deepspeed_config(micro_batch_size=B, grad_accum=GA, dp_size=info.world_size, grad_clip=1.0,
                                zero_stage=stage, bf16=False)
    ds["zero_optimization"]["reduce_bucket_size"] = BUCKET
    stepper = build_deepspeed_stepper(model, optim.build(opt_name, model, lr=1e-3), ds, expert_parallel=ep > 1)
    g = torch.Generator().manual_seed(info.rank)
    ids = torch.randint(0, model.cfg.vocab_size, (4, GA, B, T + 1), generator=g)

    def step(i):
        for k in range(GA):
            out = stepper.forward(ids[i, k, :, :-1], ids[i, k, :, 1:])  # held through backward, as launch/train.py does
            stepper.backward(out.loss)
            del out
        finish_step(model, stepper.step())

    step(0)
    # Three profiled steps, the median kept: with the collectives settled every step of a case measured
    # the same to the byte but for a rare one (the first, once) where a free still went unrecorded.
    peaks = []
    for i in (1, 2, 3):
        base = sum(v for k, v in live_tensor_bytes().items() if k not in before)
        peaks.append(base + peak_allocated_during(lambda: step(i)))
    peak = sorted(peaks)[1]
    zero = stepper.engine.optimizer
    record[f"{name}_{opt_name}_zero{stage}_ep{ep}"] = {
        "model": name, "optimizer": opt_name, "zero": stage, "ep": ep,
        "weights": storage_bytes(model.parameters()),
        "fp32_masters": storage_bytes(zero.single_partition_of_fp32_groups),
        "optimizer_state": storage_bytes(v for s in zero.optimizer.state.values() for v in _tensors(s) if v.ndim > 0),
        "peak": peak, "peaks": peaks,
    }
    del stepper, model, zero
write_result(out_dir, info.rank, {"bucket": BUCKET, "B": B, "T": T, "GA": GA, "cases": record})
close_process_group()  # barrier first: a rank leaving early makes its peer abort in gloo
