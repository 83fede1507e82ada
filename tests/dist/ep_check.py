"""EP=2 against EP=1 on the same tokens: forward logits, dense gradients and expert gradients.

Each rank builds the same model twice (same seed): a reference with all experts, and a copy whose
MoE layers are switched to `ExpertParallelExperts`. Ranks feed different tokens. Router biases are
set so that expert 1 (owned by rank 0) gets no tokens from rank 0 and expert 6 (owned by rank 1)
gets none from anybody: uneven and empty splits in both directions.
"""

import copy
import sys

import torch
import torch.distributed as dist

from harness import write_result
from launch.parallel.distributed import expert_groups, init_distributed
from launch.parallel.expert_parallel import ExpertParallelExperts, apply_expert_parallel
from launch.runtime import close_process_group
from moe.config import preset
from moe.model import Transformer

out_dir = sys.argv[1]
info = init_distributed(torch.device("cpu"), ep_size=2, timeout_s=120)
ep_group, _, name = expert_groups(2)
torch.manual_seed(0)
cfg = preset("tiny", num_experts=8, num_experts_per_tok=2, num_layers=3)
ref = Transformer(cfg)
with torch.no_grad():
    for router in ref.routers():
        router.e_score_correction_bias[6] = -1e4
        if info.rank == 0:
            router.e_score_correction_bias[1] = -1e4
ep = copy.deepcopy(ref)
layers = apply_expert_parallel(ep, ep_group, name)

g = torch.Generator().manual_seed(100 + info.rank)
ids = torch.randint(0, cfg.vocab_size, (3, 17), generator=g)  # odd T: no power-of-two luck
tgt = torch.randint(0, cfg.vocab_size, (3, 17), generator=g)
out_ref, out_ep = ref(ids, tgt), ep(ids, tgt)
out_ref.loss.backward()
out_ep.loss.backward()

ref_params = dict(ref.named_parameters())
dense_diff, dense_max, expert_diff, expert_ref_norm = 0.0, 0.0, 0.0, 0.0
for mod_name, module in ep.named_modules():
    if isinstance(module, ExpertParallelExperts):
        L, p = module.num_local_experts, module.ep_rank
        for pname in ("gate_up_proj", "down_proj"):
            full = ref_params[f"{mod_name}.{pname}"].grad.clone()
            dist.all_reduce(full)  # the expert's gradient from every rank's tokens
            local = getattr(module, pname).grad
            expert_diff = max(expert_diff, (full[p * L:(p + 1) * L] - local).abs().max().item())
            expert_ref_norm = max(expert_ref_norm, full[p * L:(p + 1) * L].abs().max().item())
for pname, param in ep.named_parameters():
    if pname in ref_params and ref_params[pname].shape == param.shape and not hasattr(param, "allreduce"):
        dense_diff = max(dense_diff, (ref_params[pname].grad - param.grad).abs().max().item())
        dense_max = max(dense_max, ref_params[pname].grad.abs().max().item())
counts = [r.tokens_per_expert_E.tolist() for r in ep.routers()]
write_result(out_dir, info.rank, {
    "layers": layers,
    "logits_diff": (out_ref.logits - out_ep.logits).abs().max().item(),
    "logits_max": out_ref.logits.abs().max().item(), "dense_grad_max": dense_max,
    "loss_diff": abs(out_ref.loss.item() - out_ep.loss.item()),
    "dense_grad_diff": dense_diff, "expert_grad_diff": expert_diff, "expert_grad_max": expert_ref_norm,
    "tokens_per_expert": counts,
})
close_process_group()  # barrier first: a rank leaving early makes its peer abort in gloo
