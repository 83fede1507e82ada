"""RL iteration cost: `python benchmarks/rl_bench.py [--preset small] [--out benchmarks/rl-cpu.json]`.

A script, not a test: prints and writes JSON. One RL iteration of posttrain/rl's pieces on a randomly
initialised model, without a task (random prompt ids, no stop token, so every response runs to its
budget, the worst case): sampling --prompts x --k responses of --response-tokens tokens through
rollout.grow (MLA's compressed cache, routing recorded), then the reference forward and one
optimizer step of the k15 objective with routing replay (batch.py's Rows and token_logprobs, MuonClip).
Reports sampling tokens/s and the share of the iteration spent sampling vs training, best of --repeats.
On a GPU both run under bf16 autocast, as posttrain.rl does.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import optim  # noqa: E402
from launch.runtime import autocast  # noqa: E402
from moe.config import preset  # noqa: E402
from moe.model import Transformer  # noqa: E402
from posttrain.rl import objectives  # noqa: E402
from posttrain.rl.rollout import GrowSettings, grow, new_group  # noqa: E402
from posttrain.rl.batch import Rows, eval_logprobs, token_logprobs  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def iteration(model, optimizer, objective, args, device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    groups = [new_group(i, torch.randint(0, model.cfg.vocab_size, (args.prompt_len,), generator=g).tolist(), args.k,
                        seed=seed * 10_000 + i * args.k) for i in range(args.prompts)]
    settings = GrowSettings(budget=args.response_tokens, segment=args.response_tokens, temperature=1.0, top_p=None,
                            stop_tokens=(), loop_period=0, loop_repeats=2, record_routing=True,
                            batch_size=args.batch_size)
    sync(device)
    t0 = time.perf_counter()
    with autocast(device):
        drawn = grow(model, [s for grp in groups for s in grp.samples], settings)
    sync(device)
    t1 = time.perf_counter()
    micro = [Rows(groups[i : i + args.micro_groups], device) for i in range(0, len(groups), args.micro_groups)]
    refs = [eval_logprobs(model, rows, True) for rows in micro]
    total = args.prompts * args.k
    for rows, ref in zip(micro, refs):
        rewards = torch.rand(rows.mask_ST.shape[0], generator=g).round().to(device)
        loss, _ = objective(objectives.PolicyBatch(token_logprobs(model, rows, True), ref, rows.mask_ST, rewards,
                                                   rows.groups_S))
        (loss * rows.mask_ST.shape[0] / total).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    t2 = time.perf_counter()
    return {"sample_s": t1 - t0, "train_s": t2 - t1, "tokens": drawn, "sample_tokens_per_s": drawn / (t1 - t0),
            "sample_share": (t1 - t0) / (t2 - t0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=128, help="sequences per generate call")
    p.add_argument("--micro-groups", type=int, default=4, help="groups per training forward/backward")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Transformer(preset(args.preset)).to(device).train()
    optimizer = optim.build("muonclip", model, lr=1e-4, weight_decay=0.0)
    objective = objectives.build("k15")
    runs = [iteration(model, optimizer, objective, args, device, seed) for seed in range(args.repeats)]
    best = min(runs, key=lambda r: r["sample_s"] + r["train_s"])
    result = {"preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              platform.processor() or "cpu", "torch": torch.__version__, **vars(args), "best": best, "runs": runs}
    print(f"{args.preset} on {result['device']}: {args.prompts} x {args.k} responses of {args.response_tokens} tokens; "
          f"sampling {best['sample_tokens_per_s']:.0f} tokens/s ({best['sample_s']:.2f} s), training {best['train_s']:.2f} s; "
          f"{best['sample_share']:.0%} of the iteration sampling")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
