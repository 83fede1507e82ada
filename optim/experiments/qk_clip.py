"""Kimi K2's MuonClip experiment (tech report §2.1, Fig. 2), reproduced small on CPU.

The same model, data order and learning rate are trained twice, with Muon and with MuonClip. Muon at
a high learning rate lets attention logits grow without bound; MuonClip caps every head at tau.
Each step records (for every run) the largest pre-softmax logit the forward saw, over all layers
and heads; for MuonClip also the largest logit right after the clip, by a second no-grad forward on
the same batch (eval mode, so the router's load counts are untouched). Losses are the training loss
per step and a validation loss at the end.

    python -m optim.experiments.qk_clip                  # ~2 min on 2 idle cores; docs/qk_clip.{png,json}
    python -m optim.experiments.qk_clip --steps 50       # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import optim
from launch.data import DataConfig, build_data
from launch.data_batches import TrainBatches, ValBatches
from moe.config import preset
from moe.model import Transformer

# A shrunk `small`: 2 layers, 4 heads of MLA, one dense and one MoE layer (8 experts, top-2).
MODEL = dict(hidden_size=128, num_layers=2, num_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
             qk_rope_head_dim=16, v_head_dim=32, intermediate_size=256, moe_intermediate_size=64,
             num_experts=8, num_experts_per_tok=2, max_seq_len=256)


def max_logit(model) -> float:
    return max(attn.max_logits_H.max().item() for attn in model.attentions())


def train(name: str, args, data) -> dict:
    torch.manual_seed(args.seed)
    model = Transformer(preset("small", vocab_size=data.vocab_size, **MODEL))
    hp = dict(lr=args.lr, weight_decay=args.weight_decay)
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
            print(f"{name:9s} step {step:4d} loss {loss.item():.3f} max logit {log['max_logit'][-1]:8.1f} "
                  f"({time.time() - start:.0f}s)", flush=True)
    model.eval()
    with torch.no_grad():
        val = [model(x, y).lm_loss.item() for x, y in ValBatches(data.val, args.batch_size, args.val_batches)]
    log["val_loss"] = sum(val) / len(val)
    log["seconds"] = time.time() - start
    return log


def plot(runs: dict, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_logit, ax_zoom, ax_loss) = plt.subplots(1, 3, figsize=(17, 4.8))
    steps = list(range(1, args.steps + 1))
    clip = runs["muonclip"]
    clipped = [(s, x) for s, x in zip(steps, clip["clipped_heads_after_clip"]) if x is not None]
    for ax in (ax_logit, ax_zoom):
        if ax is ax_logit:
            ax.plot(steps, runs["muon"]["max_logit"], label="Muon", color="tab:red")
        ax.plot(steps, clip["max_logit"], label="MuonClip: forward, before the clip", color="tab:blue")
        ax.plot(steps, clip["max_logit_after_clip"], label="MuonClip: same batch, after update + clip",
                color="tab:cyan", linestyle="--")
        ax.plot(*zip(*clipped), ".", markersize=3, color="black", label="  the heads that were clipped")
        ax.axhline(args.tau, color="gray", linestyle=":", label=f"tau = {args.tau:g}")
        ax.set_xlabel("optimizer step")
    ax_logit.set_yscale("log")
    ax_logit.set_ylabel("max attention logit (all layers, heads)")
    ax_logit.legend(fontsize=8)
    ax_zoom.set_xlim(clipped[0][0] - 5 if clipped else 1, args.steps)
    ax_zoom.set_ylim(0.8 * args.tau, 1.3 * args.tau)
    ax_zoom.set_title("MuonClip, linear scale", fontsize=10)
    for name, color in (("muon", "tab:red"), ("muonclip", "tab:blue")):
        ax_loss.plot(steps, ema(runs[name]["loss"], 0.9), label=f"{name} (val {runs[name]['val_loss']:.3f})", color=color)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss (EMA 0.9)")
    ax_loss.legend()
    fig.suptitle(f"Muon vs MuonClip, lr {args.lr:g}, {args.steps} steps, {args.batch_size}x{args.seq_len} tokens/step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


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
    runs = {name: train(name, args, data) for name in ("muon", "muonclip")}
    summary = {
        "muon_max_logit": max(runs["muon"]["max_logit"]),
        "muonclip_max_logit_forward": max(runs["muonclip"]["max_logit"]),
        "muonclip_max_logit_after_clip": max(runs["muonclip"]["max_logit_after_clip"]),
        "muonclip_clipped_heads_max_after_clip": max((x for x in runs["muonclip"]["clipped_heads_after_clip"] if x is not None),
                                                     default=None),
        "muonclip_steps_with_a_clip": sum(x is not None for x in runs["muonclip"]["clipped_heads_after_clip"]),
        "muon_final_train_loss": sum(runs["muon"]["loss"][-20:]) / 20,
        "muonclip_final_train_loss": sum(runs["muonclip"]["loss"][-20:]) / 20,
        "muon_val_loss": runs["muon"]["val_loss"],
        "muonclip_val_loss": runs["muonclip"]["val_loss"],
        "seconds": {name: round(run["seconds"], 1) for name, run in runs.items()},
    }
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
