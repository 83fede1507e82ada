"""Training entry point: `python -m launch.train` (console script `kimi-train`).

With no arguments it trains the `small` preset on the embedded default corpus (the Python standard
library's source, tokenised with a locally trained BPE) and writes to runs/<preset>-<time>/:
config.yaml (the resolved config), metrics.jsonl, loss.png and summary.json.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

import optim
from launch.config import TrainConfig, default_out_dir, parse_args
from launch.data import build_data, TrainBatches, ValBatches
from launch.metrics import MetricsLog, plot_losses
from moe.config import ConfigError
from moe.model import Transformer
from moe.params import count_parameters


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1 over warmup_steps, then cosine down to min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but no CUDA device is visible; use --device cpu or auto")
    return torch.device(name)


def prepare_out_dir(cfg: TrainConfig) -> Path:
    """A fresh directory for this run. An existing non-empty one is refused, never overwritten."""
    out = Path(cfg.out_dir or default_out_dir(cfg))
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"out_dir {str(out)!r} already holds files; pick another --out-dir (nothing was overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    cfg.out_dir = str(out)
    return out


def autocast(device: torch.device):
    # bf16 autocast on GPU (weights and optimizer state stay fp32); plain fp32 on CPU.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def train_step(model, optimizer, batches, cfg: TrainConfig, device) -> dict:
    """One optimizer step over grad_accum micro-batches; returns the step's scalars."""
    lm_sum = aux_sum = 0.0
    for _ in range(cfg.grad_accum):
        inputs, targets = (t.to(device, non_blocking=True) for t in next(batches))
        with autocast(device):
            out = model(inputs, targets)
        (out.loss / cfg.grad_accum).backward()
        lm_sum += out.lm_loss.item()
        aux_sum += out.aux_loss.item()
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    record = {"lm_loss": lm_sum / cfg.grad_accum, "aux_loss": aux_sum / cfg.grad_accum, "grad_norm": grad_norm}
    record["router_max_over_mean"] = [round(r.load_stats()["max_over_mean"], 4) for r in model.routers()]
    model.update_router_biases()
    return record


@torch.no_grad()
def evaluate(model, val_batches, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in val_batches:
        with autocast(device):
            total += model(inputs.to(device), targets.to(device)).lm_loss.item()
        count += 1
    model.train()
    return total / count


def run(cfg: TrainConfig) -> dict:
    """Train as configured; returns the summary also written to summary.json."""
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = build_data(cfg.data, cfg.seq_len)
    model_cfg = cfg.model_config(vocab_size=data.vocab_size)
    out = prepare_out_dir(cfg)
    (out / "config.yaml").write_text(yaml.safe_dump({**cfg.to_dict(), "resolved_model": vars(model_cfg)}, sort_keys=False))

    model = Transformer(model_cfg).to(device)
    counts = count_parameters(model)
    optimizer = optim.build(cfg.optimizer, model, lr=cfg.lr, weight_decay=cfg.weight_decay, **cfg.optimizer_args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    batches = iter(TrainBatches(data.train, cfg.micro_batch_size, seed=cfg.seed))
    val_batches = ValBatches(data.val, cfg.micro_batch_size, cfg.eval_batches)
    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * cfg.seq_len
    print(
        f"model {cfg.model.get('preset')}: {counts['total'] / 1e6:.1f}M total / {counts['active'] / 1e6:.1f}M active "
        f"parameters; {len(data.train)} train / {len(data.val)} val sequences of {cfg.seq_len} tokens; "
        f"{tokens_per_step} tokens per step on {device}; writing {out}",
        file=sys.stderr,
    )

    log = MetricsLog(out / "metrics.jsonl")
    first_val = evaluate(model, val_batches, device)
    log.write({"step": 0, "val_loss": first_val})
    val_loss, start = first_val, time.perf_counter()
    bar = tqdm(range(1, cfg.steps + 1), desc="train", unit="step", dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        record = {"step": step, "lr": scheduler.get_last_lr()[0]}
        record.update(train_step(model, optimizer, batches, cfg, device))
        scheduler.step()
        record["tokens_per_s"] = tokens_per_step / (time.perf_counter() - t0)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_loss = record["val_loss"] = evaluate(model, val_batches, device)
        if step % cfg.log_every == 0 or "val_loss" in record:
            log.write(record)
        bar.set_postfix(loss=f"{record['lm_loss']:.3f}", val=f"{val_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
    log.close()
    plot_losses(out / "metrics.jsonl", out / "loss.png", title=f"{cfg.model.get('preset')} on {cfg.data.path or 'stdlib source'}")
    summary = {
        "params_total": counts["total"], "params_active": counts["active"], "vocab_size": model_cfg.vocab_size,
        "steps": cfg.steps,
        "tokens": tokens_per_step * cfg.steps, "first_val_loss": first_val, "final_val_loss": val_loss,
        "wall_s": round(time.perf_counter() - start, 1), "device": str(device), "out_dir": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = parse_args(argv)
        run(cfg)
    except ConfigError as err:
        sys.exit(f"config error: {err}")


if __name__ == "__main__":
    main()
