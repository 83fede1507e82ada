"""Pipeline parallelism (DeepSpeed's PipelineEngine, 1F1B, ZeRO-1) against the single-process
stepper on the same model, data and seed: per-step lm loss, aux loss and grad norm, final weights
and router biases. Run with 2 ranks (PP=2) or 4 ranks (PP=2 x DP=2, then PP=2 x EP=2).

Every rank runs the reference itself on the whole global batch. The balance-loss coefficient is
raised to 0.05 (from 1e-4) so the aux loss's gradient moves the weights far beyond the tolerance:
a pipeline that dropped it would fail the weight check. grad_clip is below the measured norms, so
every step is clipped by the global norm across stages.

Then the same against Muon (PP=2, and PP=2 x EP=2 on 4 ranks), and against MuonClip with
remeasure off at tau = TAU, below many heads' max logits (~0.04-0.065 here), so that most steps
clip some heads: PP=2, and PP=2 x EP=2 and PP=2 x DP=2 on 4 ranks. There each stage also reports the
max logits its last clip acted on (to match the reference's rows of its layers), the logged per-layer
maxima of every step, and how far ZeRO's fp32 masters of
the clipped weights are from the working weights after each step (a clip of the working copy alone
would leave them apart, and be undone by the next update).

With 2 ranks it also checks the non-finite skip: a NaN injected into one last-stage gradient at
step 2 must make both stages skip that step (weights and router biases as before it) and train on.
"""

import sys

import torch
import torch.distributed as dist

import optim
from harness import write_result
from launch.parallel.deepspeed_config import build_deepspeed_config
from launch.parallel.distributed import expert_groups, init_distributed
from launch.parallel.engine import LocalStepper
from launch.parallel.expert_parallel import ExpertParallelExperts, apply_expert_parallel
from launch.parallel.pipeline import build_pipeline_module, build_pipeline_stepper
from launch.runtime import close_process_group
from moe.config import preset
from moe.model import Transformer, eval_mode

out_dir = sys.argv[1]
PP = 2
info = init_distributed(torch.device("cpu"), ep_size=1, timeout_s=120, pp_size=PP)
rank, world = info.rank, info.world_size
DP = world // PP
CFG = preset("tiny", num_layers=4, num_experts=4, num_experts_per_tok=2, seq_aux_loss_coef=0.05)
# lr 1e-3: at 1e-2 the grad norm climbs 2 -> 22 in 5 steps and fp32 rounding differences grow with
# it (measured 1e-5 relative on the weights); at 1e-3 the run is stable and agrees to ~3e-7.
STEPS, MBS, GA, T, CLIP, LR = 5, 2, 3, 16, 0.5, 1e-3
TAU = 0.05  # QK-clip threshold of the MuonClip runs (the reference's per-head max logits at PP=2: 0.036-0.064 per step)
g = torch.Generator().manual_seed(7)
DATA = torch.randint(0, CFG.vocab_size, (STEPS, GA, MBS * DP, T + 1), generator=g)  # global micro-batches


def optimizer(name, module):
    # eps 1e-6 as in parity_check.py: keeps a rounding-level gradient from taking a full-size step.
    clip = {"qk_clip_tau": TAU, "qk_clip_remeasure": False} if name == "muonclip" else {}
    return optim.build(name, module, lr=LR, weight_decay=0.1, eps=1e-6, **clip)


def fresh_model():
    torch.manual_seed(0)
    return Transformer(CFG)


def reference(opt="adamw"):
    model = fresh_model()
    stepper = LocalStepper(model, optimizer(opt, model), GA, CLIP)
    losses, auxes, norms, max_logits = [], [], [], []
    for step in range(STEPS):
        lm = aux = 0.0
        for k in range(GA):
            batch = DATA[step, k]
            out = stepper.forward(batch[:, :-1], batch[:, 1:])
            stepper.backward(out.loss)
            lm, aux = lm + out.lm_loss.item() / GA, aux + out.aux_loss.item() / GA
        result = stepper.step()
        model.update_router_biases()  # the whole global batch is here: its counts are the global ones
        losses.append(lm), auxes.append(aux), norms.append(result.grad_norm)
        if stepper.last_max_logits_LH is not None:
            max_logits.append(stepper.last_max_logits_LH.tolist())  # [L, H] the clip acted on
    return model, {"lm": losses, "aux": auxes, "norm": norms, "max_logits": max_logits}


class Shards:
    """This rank's micro-batches: its dp shard of each global micro-batch, in order."""

    def __init__(self):
        self.i = 0

    def __next__(self):
        step, k = divmod(self.i, GA)
        self.i += 1
        batch = DATA[step, k][info.dp_rank * MBS:(info.dp_rank + 1) * MBS]
        return batch[:, :-1], batch[:, 1:]


def pipelined(ep_size=1, blocks_per_stage=None, nan_at_step=None, opt="adamw"):
    model = fresh_model()
    pipe = build_pipeline_module(model, PP, GA, blocks_per_stage)
    ep = {}
    if ep_size > 1:
        ep_group, _, name = expert_groups(ep_size, pp_size=PP)
        ep = {"ep_layers": apply_expert_parallel(pipe, ep_group, name),
              "ep_group": dist.get_process_group_ranks(ep_group)}
    ds = build_deepspeed_config(micro_batch_size=MBS, grad_accum=GA, dp_size=DP, grad_clip=CLIP,
                                zero_stage=1, bf16=False)
    stepper = build_pipeline_stepper(pipe, optimizer(opt, pipe), ds, expert_parallel=ep_size > 1)
    batches, records, before = Shards(), [], None
    for step in range(STEPS):
        handle = None
        if step == nan_at_step and pipe.stage().lm_head is not None:
            handle = pipe.stage().lm_head.weight.register_hook(lambda grad: grad * float("nan"))
        if step == nan_at_step:
            before = full_state(pipe)
        records.append(stepper.train_step(batches))
        if opt == "muonclip":
            records[-1]["master_diff"] = master_diff(pipe)
        if handle is not None:
            handle.remove()
        if step == nan_at_step:
            after = full_state(pipe)
            records[-1]["unchanged"] = max((after[k] - before[k]).abs().max().item() for k in before)
    return pipe, records, ep, stepper


def full_state(pipe):
    """This stage's weights and router biases under the full model's names, experts gathered."""
    state = {}
    stage = pipe.stage()
    for name, p in stage.named_parameters():
        w = p.detach().clone()
        owner = stage.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(owner, ExpertParallelExperts):
            pieces = [torch.empty_like(w) for _ in range(owner.ep_size)]
            dist.all_gather(pieces, w.contiguous(), group=owner.ep_group)
            w = torch.cat(pieces)
        state[name] = w
    for name, b in stage.named_buffers():
        if name.endswith("e_score_correction_bias"):
            state[name] = b.detach().clone()
    return state


def compare(pipe, records, ref_model, ref):
    mine = full_state(pipe)
    ref_params = dict(ref_model.named_parameters())
    ref_buffers = dict(ref_model.named_buffers())
    scale = max(p.abs().max().item() for p in ref_model.parameters())
    weights = max((mine[k] - ref_params[k].detach()).abs().max().item() for k in mine if k in ref_params) / scale
    biases = [(mine[k] - ref_buffers[k]).abs().max().item() for k in mine if k in ref_buffers]
    rel = lambda a, b: max(abs(x - y) / abs(y) for x, y in zip(a, b))  # noqa: E731
    return {
        "lm": [r["lm_loss"] for r in records], "aux": [r["aux_loss"] for r in records],
        "norm": [r["grad_norm"] for r in records],
        "lm_rel": rel([r["lm_loss"] for r in records], ref["lm"]),
        "aux_rel": rel([r["aux_loss"] for r in records], ref["aux"]),
        "norm_rel": rel([r["grad_norm"] for r in records], ref["norm"]),
        "weights_rel": weights, "bias_diff": max(biases, default=0.0), "num_biases": len(biases),
        "bias_max": max((ref_buffers[k].abs().max().item() for k in mine if k in ref_buffers), default=0.0),
        "stage_names": sorted(mine), "skipped": [bool(r.get("skipped")) for r in records],
    }


def master_diff(pipe):
    """Largest |fp32 master - working weight| over the weights QK-clip scales, on this stage."""
    from deepspeed.utils import safe_get_full_fp32_param

    diff = 0.0
    for attn in pipe.attentions():
        for w in (attn.query_proj().weight, attn.kv_b_proj.weight):
            master = safe_get_full_fp32_param(w)  # collective over the stage's dp group, same order on each rank
            diff = max(diff, (master - w.detach().float()).abs().max().item())
    return diff


def clip_checks(pipe, stepper, records, ref):
    """The stage's last clip against the reference's rows of its layers, the logged per-layer maxima
    (all stages) against the reference's; masters against working weights after every step."""
    lo, hi = pipe.block_bounds[pipe.stage_id], pipe.block_bounds[pipe.stage_id + 1]
    mine_LH = stepper.qk_clip.last_max_logits_LH
    ref_LH = torch.tensor(ref["max_logits"][-1])[lo:hi]
    logged_L = torch.tensor([r["max_logit_by_layer"] for r in records])  # [steps, L]
    ref_L = torch.tensor(ref["max_logits"]).amax(dim=2)
    return {"max_logits_rel": ((mine_LH - ref_LH).abs().max() / ref_LH.abs().max()).item(),
            "logged_rel": ((logged_L - ref_L).abs().max() / ref_L.abs().max()).item(),
            "layers": hi - lo, "master_diff": max(r["master_diff"] for r in records)}


ref_model, ref = reference()
record = {"ref": ref, "stage": rank // DP}
pipe, records, ep, stepper = pipelined()
record["balanced"] = {**compare(pipe, records, ref_model, ref), "bounds": pipe.block_bounds}
# Evaluation through the pipeline (every rank the same 2 batches) against the reference model's.
VAL = torch.randint(0, CFG.vocab_size, (2, MBS, T + 1), generator=g)
with torch.no_grad(), eval_mode(ref_model):
    ref_val = sum(ref_model(b[:, :-1], b[:, 1:]).lm_loss.item() for b in VAL) / len(VAL)
val = stepper.evaluate([(b[:, :-1], b[:, 1:]) for b in VAL])
record["eval"] = {"rel": abs(val - ref_val) / ref_val, "training_after": pipe.training}
if world == 2:
    pipe, records, ep, _ = pipelined(blocks_per_stage=[3, 1])
    record["explicit"] = {**compare(pipe, records, ref_model, ref), "bounds": pipe.block_bounds}
    pipe, records, ep, _ = pipelined(nan_at_step=2)
    record["nan"] = {"skipped": [bool(r.get("skipped")) for r in records], "unchanged": records[2]["unchanged"],
                     "norm": [r["grad_norm"] for r in records]}
else:
    pipe, records, ep, _ = pipelined(ep_size=2)
    record["ep2"] = {**compare(pipe, records, ref_model, ref), "bounds": pipe.block_bounds, **ep}
# Muon (ZeRO-1 partitions, matrices orthogonalised whole per stage), with EP on 4 ranks.
muon_model, muon_ref = reference("muon")
pipe, records, ep, _ = pipelined(ep_size=1 if world == 2 else 2, opt="muon")
record["muon"] = compare(pipe, records, muon_model, muon_ref)
# MuonClip: each stage clips its own layers from its forwards' maxima, maxed over its dp group.
clip_model, clip_ref = reference("muonclip")
record["muonclip_ref_clipped"] = [sum(s > TAU for row in step for s in row) for step in clip_ref["max_logits"]]
# How far the clips moved the reference from the Muon one: far beyond the tolerance, or the check is void.
record["clip_effect"] = max((p - q).abs().max().item() for p, q in zip(clip_model.parameters(), muon_model.parameters())
                            ) / max(p.abs().max().item() for p in muon_model.parameters())
for case, ep_size in ([("muonclip", 1)] if world == 2 else [("muonclip_ep2", 2), ("muonclip_dp2", 1)]):
    pipe, records, ep, stepper = pipelined(ep_size=ep_size, opt="muonclip")
    record[case] = {**compare(pipe, records, clip_model, clip_ref), **clip_checks(pipe, stepper, records, clip_ref)}
write_result(out_dir, rank, record)
close_process_group()  # barrier first: a rank leaving early makes its peer abort in gloo
