"""Kimi K2's MuonClip experiment (tech report §2.1, Fig. 2), reproduced small on CPU.

The same model, data order and learning rate are trained three times: with Muon, with MuonClip
under K2's rule as published (S_h from the step's forward, `qk_clip_remeasure=False`), and with our
default MuonClip (S_h also re-measured on the step's batch after the update, layer by layer; see
optim/qk_clip.py). Muon at a high learning rate lets attention logits grow without bound; MuonClip
caps every head at tau. Each step records, for every run, the largest pre-softmax logit the forward
saw over all layers and heads; for the MuonClip runs also the largest logit right after the clip,
by a separate no-grad forward on the same batch (training mode for the records, router load counts
put back). Losses are the training loss per step and a validation loss at the end.

    python -m optim.experiments.qk_clip                  # ~5 min on 2 idle cores; docs/qk_clip.{png,json}
    python -m optim.experiments.qk_clip --steps 50       # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import optim
from launch.data.build import DataConfig, build_data
from launch.data.batches import TrainBatches, ValBatches
from moe.config import preset
from moe.model import Transformer

# A shrunk `small`: 2 layers, 4 heads of MLA, one dense and one MoE layer (8 experts, top-2).
MODEL = dict(hidden_size=128, num_layers=2, num_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
             qk_rope_head_dim=16, v_head_dim=32, intermediate_size=256, moe_intermediate_size=64,
             num_experts=8, num_experts_per_tok=2, max_seq_len=256)


def max_logit(model) -> float:
    return max(attn.max_logits_H.max().item() for attn in model.attentions())


# Run name -> (registry name, extra optimizer arguments).
RUNS = {
    "muon": ("muon", {}),
    "muonclip_k2_rule": ("muonclip", {"qk_clip_remeasure": False}),
    "muonclip": ("muonclip", {"qk_clip_remeasure": True}),
}


def train(run: str, args, data) -> dict:
    torch.manual_seed(args.seed)
    model = Transformer(preset("small", vocab_size=data.vocab_size, **MODEL))
    name, extra = RUNS[run]
    hp = dict(lr=args.lr, weight_decay=args.weight_decay, **extra)
    opt = optim.build(name, model, **hp, **({"qk_clip_tau": args.tau} if name == "muonclip" else {}))
    for attn in model.attentions():  # MuonClip switches this on itself; plain Muon is only observed
        attn.record_max_logits = True
        attn.reset_max_logits()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    batches = TrainBatches(data.train, args.batch_size, seed=args.seed)
    log = {"loss": [], "max_logit": [], "max_logit_after_clip": [], "clipped_heads_after_clip": []}
    start = time.time()
    for step in range(args.steps):
        inputs, targets = next(batches)
        loss = model(inputs, targets).lm_loss
        loss.backward()
        log["loss"].append(loss.item())
        log["max_logit"].append(max_logit(model))  # this step's forward, weights before the update
        opt.step()  # MuonClip: update, clip, reset the records
        opt.zero_grad(set_to_none=True)
        if name == "muonclip":
            clipped_LH = opt.last_max_logits_LH > args.tau
            # Re-measure in training mode (attention records only there), leaving router counts as they were.
            counts = [router.tokens_per_expert_E.clone() for router in model.routers()]
            with torch.no_grad():
                model(inputs)
            for router, saved in zip(model.routers(), counts):
                router.tokens_per_expert_E.copy_(saved)
            after_LH = torch.stack([attn.max_logits_H for attn in model.attentions()])
            log["max_logit_after_clip"].append(after_LH.max().item())
            # Clipped heads alone: the others were not clipped, and this step's update may lift them.
            log["clipped_heads_after_clip"].append(after_LH[clipped_LH].max().item() if clipped_LH.any() else None)
        for attn in model.attentions():
            attn.reset_max_logits()
        model.update_router_biases()
        sched.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"{run:16s} step {step:4d} loss {loss.item():.3f} max logit {log['max_logit'][-1]:8.1f} "
                  f"({time.time() - start:.0f}s)", flush=True)
    model.eval()
    with torch.no_grad():
        val = [model(x, y).lm_loss.item() for x, y in ValBatches(data.val, args.batch_size, args.val_batches)]
    log["val_loss"] = sum(val) / len(val)
    log["seconds"] = time.time() - start
    return log


LABELS = {"muon": "Muon", "muonclip_k2_rule": "MuonClip, K2's rule", "muonclip": "MuonClip, re-measured (default)"}
COLORS = {"muon": "tab:red", "muonclip_k2_rule": "tab:orange", "muonclip": "tab:blue"}
CLIP_RUNS = ("muonclip_k2_rule", "muonclip")


def plot(runs: dict, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_logit, ax_after, ax_loss) = plt.subplots(1, 3, figsize=(18, 4.8))
    steps = list(range(1, args.steps + 1))
    for run, log in runs.items():
        ax_logit.plot(steps, log["max_logit"], label=LABELS[run], color=COLORS[run], linewidth=1)
        ax_loss.plot(steps, ema(log["loss"], 0.9), label=f"{LABELS[run]} (val {log['val_loss']:.3f})", color=COLORS[run])
    first_clip = args.steps
    for run in CLIP_RUNS:
        clipped = [(s, x) for s, x in zip(steps, runs[run]["clipped_heads_after_clip"]) if x is not None]
        first_clip = min([first_clip] + [s for s, _ in clipped[:1]])
        ax_after.plot(steps, runs[run]["max_logit_after_clip"], label=f"{LABELS[run]}: all heads", color=COLORS[run], linewidth=1)
        if clipped:
            ax_after.plot(*zip(*clipped), ".", markersize=3, color=COLORS[run], label=f"{LABELS[run]}: clipped heads")
    for ax in (ax_logit, ax_after):
        ax.axhline(args.tau, color="gray", linestyle=":", label=f"tau = {args.tau:g}")
        ax.set_xlabel("optimizer step")
    ax_logit.set_yscale("log")
    ax_logit.set_ylabel("max attention logit in the step's forward")
    ax_logit.legend(fontsize=8)
    ax_after.set_xlim(max(1, first_clip - 5), args.steps)
    ax_after.set_ylim(0.8 * args.tau, 1.15 * args.tau)
    ax_after.set_ylabel("max logit, same batch, after update + clip")
    ax_after.legend(fontsize=8, loc="lower right")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss (EMA 0.9)")
    ax_loss.legend(fontsize=8)
    fig.suptitle(f"Muon vs MuonClip, lr {args.lr:g}, {args.steps} steps, {args.batch_size}x{args.seq_len} tokens/step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def summarise(runs: dict) -> dict:
    summary = {}
    for run, log in runs.items():
        entry = {"max_logit_forward": max(log["max_logit"]),
                 "final_train_loss (mean of last 20 steps)": sum(log["loss"][-20:]) / 20,
                 "val_loss": log["val_loss"], "seconds": round(log["seconds"], 1)}
        if run in CLIP_RUNS:
            clipped = [x for x in log["clipped_heads_after_clip"] if x is not None]
            entry.update({"max_logit_after_clip": max(log["max_logit_after_clip"]),
                          "clipped_heads_after_clip_max": max(clipped, default=None),
                          "clipped_heads_after_clip_median": statistics.median(clipped) if clipped else None,
                          "steps_with_a_clip": len(clipped)})
        summary[run] = entry
    return summary


def ema(xs: list[float], beta: float) -> list[float]:
    out, avg = [], xs[0]
    for x in xs:
        avg = beta * avg + (1 - beta) * x
        out.append(avg)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--tau", type=float, default=100.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/qk_clip")
    args = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    data = build_data(DataConfig(tokenizer="bpe", vocab_size=2048, max_bytes=4_000_000), args.seq_len)
    runs = {run: train(run, args, data) for run in RUNS}
    summary = summarise(runs)
    print(json.dumps(summary, indent=2))
    config = {**vars(args), "model": MODEL, "vocab_size": data.vocab_size, "data": data.stats.get("source"),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    with open(args.out + ".json", "w") as f:
        json.dump({"config": config, "summary": summary, "runs": runs}, f, indent=1)
    plot(runs, args, args.out + ".png")
    print(f"wrote {args.out}.json and {args.out}.png")
    return summary


if __name__ == "__main__":
    main()
