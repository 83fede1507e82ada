"""One torchrun launch, several checks (each DeepSpeed engine costs ~1 s, a launch ~5 s):

1. DP=2 under ZeRO-1 and ZeRO-2, with AdamW and with MuonClip (QK-clip active), against the
   single-process stepper on the same global batch (every rank runs the reference itself on the
   whole batch): per-step losses and final weights. Once more with ZeroMuon's Newton-Schulz run a
   matrix at a time (optim.muon.NS_CHUNK_ELEMENTS = 1).
2. QK-clip under ZeRO rescales the fp32 masters: two engines from the same start and batch, tau
   huge vs tau small; after one step the small-tau master rows equal the huge-tau ones times
   the clip factors, read back with safe_get_full_fp32_param, and the working weights follow.
3. DP=2 x EP=2 (ZeRO-2, MuonClip) against the single-process stepper: expert gradients averaged
   over the expert-data-parallel group only, dense ones over all ranks.
"""

import sys

import torch
import torch.distributed as dist

import optim
from harness import write_result
from launch.parallel.deepspeed_config import build_deepspeed_config
from launch.parallel.distributed import expert_groups, init_distributed
from launch.parallel.engine import LocalStepper, build_deepspeed_stepper, finish_step
from launch.parallel.expert_parallel import ExpertParallelExperts, apply_expert_parallel
from launch.runtime import close_process_group
from moe.config import preset
from moe.model import Transformer
from optim import clip_factors, mla_row_scales

out_dir = sys.argv[1]
info = init_distributed(torch.device("cpu"), ep_size=1, timeout_s=120)
rank, world = info.rank, info.world_size
CFG = preset("tiny", num_experts=4, num_experts_per_tok=2)
STEPS, MBS, GA, T = 5, 2, 2, 16
g = torch.Generator().manual_seed(7)
DATA = torch.randint(0, CFG.vocab_size, (STEPS, GA, MBS * world, T + 1), generator=g)  # global micro-batches


def optimizer(name, model, tau):
    extra = {"qk_clip_tau": tau} if name == "muonclip" else {}
    # Adam's eps at 1e-6, not 1e-8: a gradient element that is ~0 up to rounding (seen: 7e-9 among
    # 1e-4..1e-2) would otherwise take a full-size step whose sign is the summation order's.
    return optim.build(name, model, lr=1e-2, weight_decay=0.1, eps=1e-6, **extra)


def run(stepper, shard: bool):
    losses = []
    for step in range(STEPS):
        total = torch.zeros(())
        for k in range(GA):
            batch = DATA[step, k]
            if shard:
                batch = batch[rank * MBS:(rank + 1) * MBS]
            out = stepper.forward(batch[:, :-1], batch[:, 1:])
            stepper.backward(out.loss)
            total += out.lm_loss.detach() / GA
        finish_step(stepper.model, stepper.step())
        if shard:
            dist.all_reduce(total)
            total /= world
        losses.append(total.item())
    return losses


def fresh_model(ep_size=1):
    torch.manual_seed(0)
    model = Transformer(CFG)
    if ep_size > 1:
        ep_group, _, name = expert_groups(ep_size)
        apply_expert_parallel(model, ep_group, name)
    return model


def full_weights(stepper):
    """Every weight as one flat vector, experts gathered in global order under EP."""
    parts = []
    for name, p in stepper.model.named_parameters():
        w = p.detach()
        owner = stepper.model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(owner, ExpertParallelExperts):
            pieces = [torch.empty_like(w) for _ in range(owner.ep_size)]
            dist.all_gather(pieces, w.contiguous(), group=owner.ep_group)
            w = torch.cat(pieces)
        parts.append(w.reshape(-1))
    return torch.cat(parts)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


record = {}
for opt_name, tau in (("adamw", None), ("muonclip", 0.05)):
    model = fresh_model()
    ref = LocalStepper(model, optimizer(opt_name, model, tau), GA, 1.0)
    ref_losses = run(ref, shard=False)
    ref_w = full_weights(ref)
    for stage in (1, 2):
        model = fresh_model()
        ds = build_deepspeed_config(micro_batch_size=MBS, grad_accum=GA, dp_size=world, grad_clip=1.0,
                                    zero_stage=stage, bf16=False)
        st = build_deepspeed_stepper(model, optimizer(opt_name, model, tau), ds, expert_parallel=False)
        losses = run(st, shard=True)
        record[f"{opt_name}_zero{stage}"] = {
            "ref": ref_losses, "dp": losses,
            "loss_rel": max(abs(a - b) / abs(a) for a, b in zip(losses, ref_losses)),
            "weights_rel": rel(full_weights(st), ref_w),
        }
    if opt_name == "muonclip":
        record["clipped_heads_last_step"] = int((ref.optimizer.last_max_logits_LH > tau).sum())
        # ZeroMuon's Newton-Schulz one matrix at a time (a chunk per matrix; the slice boundary falls
        # inside a chunk's matrices) against the reference's, batched whole.
        optim.muon.NS_CHUNK_ELEMENTS, whole = 1, optim.muon.NS_CHUNK_ELEMENTS
        model = fresh_model()
        ds = build_deepspeed_config(micro_batch_size=MBS, grad_accum=GA, dp_size=world, grad_clip=1.0,
                                    zero_stage=1, bf16=False)
        st = build_deepspeed_stepper(model, optimizer(opt_name, model, tau), ds, expert_parallel=False)
        losses = run(st, shard=True)
        optim.muon.NS_CHUNK_ELEMENTS = whole
        record["muonclip_zero1_chunked"] = {
            "ref": ref_losses, "dp": losses,
            "loss_rel": max(abs(a - b) / abs(a) for a, b in zip(losses, ref_losses)),
            "weights_rel": rel(full_weights(st), ref_w),
        }

# 2. QK-clip on the fp32 masters.
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402

masters = {}
for tau in (1e6, 0.05):
    model = fresh_model()
    ds = build_deepspeed_config(micro_batch_size=MBS, grad_accum=1, dp_size=world, grad_clip=1.0, zero_stage=1, bf16=False)
    st = build_deepspeed_stepper(model, optimizer("muonclip", model, tau), ds, expert_parallel=False)
    batch = DATA[0, 0][rank * MBS:(rank + 1) * MBS]
    st.backward(st.forward(batch[:, :-1], batch[:, 1:]).loss)
    finish_step(model, st.step())
    attn = model.attentions()[0]
    w = attn.query_proj().weight
    masters[tau] = (safe_get_full_fp32_param(w).clone(), w.detach().clone(), st.last_max_logits_LH[0].clone(), attn)
(m_free, _, _, _), (m_clip, w_clip, max_H, attn) = masters[1e6], masters[0.05]
q_P, _ = mla_row_scales(clip_factors(max_H, 0.05), attn.nope_dim, attn.rope_dim, attn.v_dim)
record["qk"] = {
    "clipped_heads": int((max_H > 0.05).sum()),
    "master_changed": (m_clip - m_free).abs().max().item(),
    "master_vs_expected": rel(m_clip, m_free * q_P[:, None]),
    "working_vs_master": (w_clip - m_clip).abs().max().item(),
}

# 3. DP=2 x EP=2.
model = fresh_model()
ref = LocalStepper(model, optimizer("muonclip", model, 0.05), GA, 1.0)
ref_losses, ref_w = run(ref, shard=False), None
ref_w = full_weights(ref)
model = fresh_model(ep_size=2)
ds = build_deepspeed_config(micro_batch_size=MBS, grad_accum=GA, dp_size=world, grad_clip=1.0, zero_stage=2, bf16=False)
st = build_deepspeed_stepper(model, optimizer("muonclip", model, 0.05), ds, expert_parallel=True)
losses = run(st, shard=True)
record["ep2_zero2_muonclip"] = {
    "ref": ref_losses, "dp": losses,
    "loss_rel": max(abs(a - b) / abs(a) for a, b in zip(losses, ref_losses)),
    "weights_rel": rel(full_weights(st), ref_w),
}
write_result(out_dir, rank, record)
close_process_group()  # barrier first: a rank leaving early makes its peer abort in gloo
