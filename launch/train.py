"""Training entry point: `python -m launch.train` (console script `kimi-train`).

With no arguments it trains the `small` preset on the embedded default corpus (the Python standard
library's source, tokenised with a locally trained BPE) and writes to runs/<preset>-<time>/:
config.yaml (the resolved config), metrics.jsonl, loss.png and summary.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

import optim
from launch.checkpoint import resume, run_dir
from launch.checkpoint import store as checkpoint
from launch.config.training import TrainConfig, default_out_dir, parse_args
from launch.config.warnings import warnings_for
from launch.data.batches import TrainBatches, ValBatches
from launch.parallel.distributed import DistInfo, init_distributed, launched
from launch.parallel.engine import LocalStepper, finish_step
from launch.metrics.dashboard import write_dashboard
from launch.metrics.log import MetricsLog, check_writers, plot_losses
from launch.checkpoint.pretrained import load_pretrained, part_source, verify_source
from launch.parallel.rank_model import build_rank_model, holds_part
from launch.parallel.recompute import apply_recompute
from launch.data.tokenizer import BPETokenizer, save_run_tokenizer
from launch.runtime import TrainingFailed, autocast, on_main, pick_device, run_cli
from launch.metrics.mfu import flops_per_token, gpu_peak_flops
from moe.config import ConfigError, ModelConfig
from moe.moe import weight_casts_once


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1 over warmup_steps, then cosine down to min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def accumulate(stepper, batches, grad_accum: int, device, info: DistInfo | None, casts_once: bool = True):
    """Forward and backward of grad_accum micro-batches (the gradients of one optimizer step);
    returns their (lm, aux) losses summed, [2] on `device`.

    casts_once: one autocast region spans all the micro-batches (each backward inside it with
    autocast off, as usual), so autocast's cache casts every nn.Linear weight to bf16 once per
    optimizer step instead of once per micro-batch, and `weight_casts_once` does the same for the
    routed experts. The bf16 copies live until the region ends, before the optimizer step; the fp32
    masters and their gradients are untouched. False: a region per micro-batch forward (as before).
    """
    losses = torch.zeros(2, device=device)
    with contextlib.ExitStack() as step_region:
        if casts_once:
            step_region.enter_context(autocast(device, info))
            step_region.enter_context(weight_casts_once())
        for _ in range(grad_accum):
            # (inputs, targets) of text; (inputs, targets, document ids) of packed conversations
            micro_batch = [t.to(device, non_blocking=True) for t in next(batches)]
            with contextlib.nullcontext() if casts_once else autocast(device, info):
                out = stepper.forward(*micro_batch)
            with torch.autocast(device.type, enabled=False):
                stepper.backward(out.loss)
            losses += torch.stack([out.lm_loss.detach().float(), out.aux_loss.detach().float()])
    return losses


def train_step(stepper, batches, cfg: TrainConfig, device, info: DistInfo | None) -> dict:
    """One optimizer step over grad_accum micro-batches; returns the step's scalars (global means)."""
    if hasattr(stepper, "train_step"):  # the pipeline engine runs the whole step, 1F1B over its stages
        return stepper.train_step(batches)
    losses = accumulate(stepper, batches, cfg.grad_accum, device, info)  # lm, aux: summed over micro-batches
    if info is not None:
        torch.distributed.all_reduce(losses)
        losses /= info.world_size
    result = stepper.step()
    lm, aux = (losses / cfg.grad_accum).tolist()
    record = {"lm_loss": lm, "aux_loss": aux, "grad_norm": result.grad_norm}
    if not result.applied:
        record["skipped"] = True
    else:
        record["router_max_over_mean"] = [round(r.load_stats()["max_over_mean"], 4) for r in stepper.model.routers()]
        if stepper.last_max_logits_LH is not None:  # QK-clip: the largest attention logits it saw, before clipping
            record["max_logit"] = stepper.last_max_logits_LH.max().item()
            record["max_logit_by_layer"] = stepper.last_max_logits_LH.max(dim=1).values.tolist()  # [L]: max over heads
            # DeepSpeed's stepper holds the QKClip; one process's is inside its MuonClip optimizer.
            record["qk_clip_tau"] = (getattr(stepper, "qk_clip", None) or stepper.optimizer.qk_clip).tau
    finish_step(stepper.model, result)  # global router counts -> bias update (or a clean slate if skipped)
    return record


@torch.no_grad()
def evaluate(model, val_batches, device, info: DistInfo | None = None) -> float:
    # Every rank evaluates the same batches (EP and ZeRO-3 forwards are collective).
    if hasattr(model, "pipelined_evaluate"):  # a pipeline stage: the engine runs the stages in turn
        return model.pipelined_evaluate(val_batches)
    model.eval()
    total, count = 0.0, 0
    for inputs, targets, *documents in val_batches:
        with autocast(device, info):
            documents = documents[0].to(device) if documents else None
            total += model(inputs.to(device), targets.to(device), document_ids_BT=documents).lm_loss.item()
        count += 1
    model.train()
    return total / count


def build_stepper(cfg: TrainConfig, model, optimizer, info: DistInfo | None, device):
    """The plain PyTorch stepper in one process; a DeepSpeed engine under a launcher. Returns
    (stepper, the optimizer whose param groups hold the lr, the DeepSpeed config or None)."""
    if info is None:
        return LocalStepper(model, optimizer, cfg.grad_accum, cfg.grad_clip), optimizer, None
    from launch.parallel.deepspeed_config import build_deepspeed_config
    from launch.parallel.engine import build_deepspeed_stepper

    ds = build_deepspeed_config(
        micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum, dp_size=info.dp_size,
        grad_clip=cfg.grad_clip, zero_stage=cfg.zero_stage, bf16=device.type == "cuda",
        user_file=cfg.deepspeed_config,
    )
    if cfg.pp_size > 1:
        from launch.parallel.pipeline import build_pipeline_stepper

        stepper = build_pipeline_stepper(model, optimizer, ds, expert_parallel=info.ep_size > 1)
    else:
        stepper = build_deepspeed_stepper(model, optimizer, ds, expert_parallel=info.ep_size > 1)
    return stepper, stepper.engine.optimizer.optimizer, ds  # the client optimizer's groups hold the lr


def check_run_tokenizer(out: Path, tokenizer) -> None:
    """A run keeps the tokenizer its token ids mean; a resume whose data pipeline built another one
    (a lost or changed cache) would feed the checkpoint different ids for the same text."""
    saved = out / "tokenizer.json"
    if saved.is_file() and Tokenizer.from_file(str(saved)).get_vocab() != tokenizer.to_tokenizers().get_vocab():
        raise ConfigError(f"{saved} is not the tokenizer this command built from the data (its vocabulary differs); "
                          "resume with the data and tokenizer settings the run was started with")


def starting_point(cfg: TrainConfig, out: Path, decision: dict, info: DistInfo | None = None):
    """(the source to start from or None, ModelConfig, tokenizer) of a run with init_from. The source
    is a Pretrained (the whole model, read), or where this rank will hold only part of the model
    (launch/parallel/rank_model.py's holds_part) a PartSource: its weights are left on disk for the rank to read its own part (our
    sharded checkpoints and Hugging Face directories; a checkpoint of the previous format is read whole).

    A run that resumes from its own checkpoint needs no source weights: its model is the one it
    recorded and its tokenizer the one it kept (a changed or lost source cannot change it)."""
    if decision["ckpt"] is not None:
        saved = out / "tokenizer.json"
        if not saved.is_file():
            raise ConfigError(f"{saved} is missing: the run started from {cfg.init_from!r} must keep that tokenizer")
        return None, ModelConfig(**decision["saved"]["model"]), BPETokenizer.load(str(saved))
    # Rank 0 resolves the source and verifies it (every file's SHA-256), once for the job; every rank
    # then opens the checkpoint or directory it chose, checking the manifest only.
    where = on_main(info, lambda: verify_source(cfg.init_from))
    init = part_source(where, check_digests=False) if holds_part(info) else None
    if init is not None:
        model_cfg, tokenizer, source = init.cfg, init.tokenizer, f"{init.where} (this rank's part of it only)"
    else:
        init = load_pretrained(where, check_digests=False)
        model_cfg, tokenizer, source = init.model.cfg, init.tokenizer, init.source
    if tokenizer is None:
        raise ConfigError(f"init_from = {cfg.init_from!r}: {source} kept no tokenizer.json, so its token ids "
                          "cannot be read; export it from its run (launch.export --hf-dir keeps the run's tokenizer)")
    if cfg.resolved_model is not None and cfg.resolved_model != dataclasses.asdict(model_cfg):
        raise ConfigError(f"init_from = {cfg.init_from!r} holds another model than this config's resolved_model; "
                          "delete resolved_model to train the source's model")
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"seq_len = {cfg.seq_len} exceeds the max_seq_len = {model_cfg.max_seq_len} of {source}")
    print(f"starting from {source}", file=sys.stderr)
    return init, model_cfg, tokenizer


def apply_schedule(scheduler, optimizer, cfg: TrainConfig) -> None:
    """Every param group's lr at the scheduler's position under `cfg`'s schedule: on resume the
    scheduler is this command's (built from its lr) and only its position comes from the checkpoint."""
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * lr_factor(scheduler.last_epoch, cfg)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def run(cfg: TrainConfig) -> dict:
    """Train as configured; returns the summary also written to summary.json."""
    # Every check that needs no data runs before any work: a typo in the optimizer costs nothing.
    try:
        optim.check(cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, **cfg.optimizer_args)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_writers(cfg.tensorboard, cfg.wandb)
    device = pick_device(cfg.device)
    info = None
    if launched():
        info = init_distributed(device, cfg.ep_size, cfg.dist_timeout_s, pp_size=cfg.pp_size)
        if device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
    elif cfg.ep_size != 1:
        raise ConfigError(f"ep_size = {cfg.ep_size} needs several processes; launch with torchrun or deepspeed")
    elif cfg.pp_size != 1:
        raise ConfigError(f"pp_size = {cfg.pp_size} needs several processes; launch with torchrun or deepspeed")
    if info is not None and cfg.zero_stage == 3:
        # ZeRO-3 gathers a weight only inside its own module's forward: our recompute runs modules again in
        # the backward, and the chunked loss reads lm_head.weight directly, both outside those gathers.
        for name, active, why, off in (
                ("recompute", cfg.recompute != "none", "ZeRO-3's released weights are not gathered again for the "
                 "recompute", "recompute none"),
                ("loss_chunk_tokens", cfg.loss_chunk_tokens != 0, "ZeRO-3 gathers lm_head's weight only for its "
                 "own forward", "0")):
            if active:
                raise ConfigError(f"{name} = {getattr(cfg, name)!r} with zero_stage 3 is not supported: {why}. "
                                  f"Use zero_stage 1 or 2, or {off}")
    is_main = info is None or info.is_main
    out = Path(on_main(info, lambda: cfg.out_dir or default_out_dir(cfg)))
    cfg.out_dir = str(out)
    # The layout goes into each checkpoint's manifest (with world_size) for the record; checkpoints are
    # sharded by single-device names, so a resume may use another one (same global batch, `resume.LAYOUT`).
    ckpt_meta = {"ep_size": 1 if info is None else info.ep_size, "zero_stage": None if info is None else cfg.zero_stage}
    setup = run_dir.RunSetup(out, cfg.resume, {checkpoint.SHARDED: True}) if is_main else None
    decision = on_main(info, lambda: setup.open())
    try:
        return _train(cfg, info, device, out, decision, setup, ckpt_meta)
    finally:
        if setup is not None:
            setup.close()


def _train(cfg: TrainConfig, info: DistInfo | None, device, out: Path, decision: dict, setup, ckpt_meta: dict) -> dict:
    is_main = info is None or info.is_main
    world = 1 if info is None else info.world_size
    rank = 0 if info is None else info.rank
    # The ranks of one pipeline read the same micro-batches: the data is split over data-parallel ranks.
    dp_rank, dp_size = (0, 1) if info is None else (info.dp_rank, info.dp_size)
    # Imported here, not at the top: `datasets` is only needed to read a corpus, and launch.bench,
    # which imports this module for `accumulate`, runs on GPU machines that lack it.
    from launch.data.build import build_data

    try:
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        init = None
        if cfg.init_from is None:
            data = build_data(cfg.data, cfg.seq_len)
            model_cfg = cfg.model_config(vocab_size=data.vocab_size)
        else:
            init, model_cfg, tokenizer = starting_point(cfg, out, decision, info)
            data = build_data(cfg.data, cfg.seq_len, tokenizer)
        config = {**cfg.to_dict(), "resolved_model": dataclasses.asdict(model_cfg)}
        check_run_tokenizer(out, data.tokenizer)
        start_step, changes = 0, {}
        if decision["resuming"]:
            saved = decision["saved"]
            changes = resume.compare(saved["train"], saved["model"], config, config["resolved_model"],
                                     free=resume.FREE | resume.LAYOUT)
            resume.check_global_batch(saved["train"], saved.get("world_size"), config, world)
            start_step = saved["step"]
            if start_step >= cfg.steps:
                raise ConfigError(f"steps = {cfg.steps}, but the run's newest checkpoint is at step {start_step}: "
                                  f"nothing left to train; pass --steps above {start_step} to continue it")

        # Only this rank's part is allocated, fresh or read from the source (launch/parallel/rank_model.py).
        model, counts, rank_params = build_rank_model(model_cfg, init, info, device, cfg.pp_size, cfg.grad_accum)
        apply_recompute(model, cfg.recompute)  # after EP (it recomputes the all_to_alls), before DeepSpeed
        model.loss_chunk_tokens = cfg.loss_chunk_tokens
        optimizer = optim.build(cfg.optimizer, model, lr=cfg.lr, weight_decay=cfg.weight_decay, **cfg.optimizer_args)
        stepper, optimizer, ds_config = build_stepper(cfg, model, optimizer, info, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
        batches = TrainBatches(data.train, cfg.micro_batch_size, seed=cfg.seed, rank=dp_rank, world_size=dp_size)
        if decision["ckpt"] is not None:
            ckpt = Path(decision["ckpt"])
            # The plain state is per rank. A rank the saved layout did not have takes the state of saved
            # rank (rank mod saved world): every rank starts from one seed, and the data position is global.
            state = checkpoint.load(ckpt, rank=rank % decision["saved"]["world_size"])
            stepper.load_shards(checkpoint.open_shards(ckpt))
            batches.load_state_dict(state["data"])
            checkpoint.set_rng_state(state["rng"])
            if state["step"] != start_step:
                raise checkpoint.CheckpointError(f"{decision['ckpt']}: holds step {state['step']}, its manifest says {start_step}")
            # The scheduler is this layout's (its param groups differ with EP), built from this command's
            # lr; only its position comes from the checkpoint, and every group's lr follows from it: under
            # a changed schedule the new one, else the saved run's next lr (a new `steps` bends it after).
            scheduler.last_epoch = state["scheduler"]["last_epoch"]
            schedule = cfg if changes.keys() & resume.SCHEDULE else dataclasses.replace(cfg, steps=saved["train"]["steps"])
            apply_schedule(scheduler, optimizer, schedule)
    except BaseException:
        if setup is not None:
            setup.abandon()
        raise
    if is_main:
        setup.accept(decision, config, start_step, changes)
        save_run_tokenizer(data.tokenizer, str(out))
        if ds_config is not None:
            from launch.parallel.deepspeed_config import write_deepspeed_config

            write_deepspeed_config(ds_config, out)
    val_batches = ValBatches(data.val, cfg.micro_batch_size, cfg.eval_batches)
    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum * cfg.seq_len * dp_size
    peak = gpu_peak_flops(device)
    step_flops = flops_per_token(model_cfg, counts["active"], cfg.seq_len) * tokens_per_step
    if is_main:
        for warning in warnings_for(cfg, data.vocab_size):
            print(f"warning: {warning}", file=sys.stderr)
        print(
            f"model {cfg.model.get('preset') if cfg.init_from is None else 'from ' + cfg.init_from}: {counts['total'] / 1e6:.1f}M total / {counts['active'] / 1e6:.1f}M active "
            f"parameters; {len(data.train)} train / {len(data.val)} val sequences of {cfg.seq_len} tokens; "
            f"{tokens_per_step} tokens per step on {world} x {device.type}"
            + (f" (ZeRO-{cfg.zero_stage}, EP {info.ep_size})" if info else "") + f"; writing {out}",
            file=sys.stderr,
        )
        if decision["resuming"]:
            print(f"resuming from {decision['ckpt']} at step {start_step}" if decision["ckpt"] else
                  f"resuming {out}: it has no checkpoint yet, so it starts over from step 0", file=sys.stderr)

    ckpt_root = out / "checkpoints"

    def save(step: int) -> None:
        state = {"scheduler": scheduler.state_dict(), "data": batches.state_dict(), "rng": checkpoint.rng_state(),
                 "step": step}
        meta = {**ckpt_meta, "model_config": config["resolved_model"], "train_config": config}
        checkpoint.save(ckpt_root, step, state, meta, keep=cfg.keep_checkpoints, shards=stepper.shards())

    log = MetricsLog(out / "metrics.jsonl", tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                     first_step=start_step + 1 if start_step else 0) if is_main else None
    val_loss = first_val = None
    if start_step == 0:
        first_val = val_loss = evaluate(stepper.model, val_batches, device, info)
        if log:
            log.write({"step": 0, "val_loss": first_val})
    start, skipped_in_a_row, skipped_total = time.perf_counter(), 0, 0
    batches = iter(batches)
    bar = tqdm(range(start_step + 1, cfg.steps + 1), desc="train", unit="step", dynamic_ncols=True, disable=not is_main,
               initial=start_step, total=cfg.steps)
    for step in bar:
        t0 = time.perf_counter()
        record = {"step": step, "lr": scheduler.get_last_lr()[0]}
        record.update(train_step(stepper, batches, cfg, device, info))
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        record["tokens_per_s"] = tokens_per_step / seconds
        if peak is not None:
            record["mfu"] = step_flops / seconds / (peak * world)
        if record.get("skipped"):
            skipped_in_a_row += 1
            skipped_total += 1
            if is_main:
                print(f"step {step}: non-finite loss or gradient (grad_norm {record['grad_norm']}); step skipped",
                      file=sys.stderr)
            if skipped_in_a_row > cfg.max_skipped_steps:
                if log:
                    log.write(record)
                raise TrainingFailed(
                    f"{skipped_in_a_row} steps in a row had a non-finite loss or gradient (max_skipped_steps = "
                    f"{cfg.max_skipped_steps}); stopping. The last good checkpoint is {checkpoint.latest(ckpt_root)}; "
                    "lower the lr or check the data before resuming"
                )
        else:
            skipped_in_a_row = 0
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_loss = record["val_loss"] = evaluate(stepper.model, val_batches, device, info)
        if log and (step % cfg.log_every == 0 or "val_loss" in record or record.get("skipped")):
            log.write(record)
        if skipped_in_a_row == 0 and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps):
            save(step)
        val_text = "-" if val_loss is None else f"{val_loss:.3f}"
        bar.set_postfix(loss=f"{record['lm_loss']:.3f}", val=val_text, tok_s=f"{record['tokens_per_s']:.0f}")
    trained = cfg.steps - start_step
    # A run whose last step was skipped ends without a checkpoint of it: that is not a finished run.
    status = "failed" if skipped_in_a_row else "ok"
    summary = {
        "status": status, "params_total": counts["total"], "params_active": counts["active"],
        "params_largest_rank": rank_params, "vocab_size": model_cfg.vocab_size, "steps": cfg.steps, "start_step": start_step,
        "skipped_steps": skipped_total, "tokens": tokens_per_step * cfg.steps, "first_val_loss": first_val,
        "final_val_loss": val_loss, "wall_s": round(time.perf_counter() - start, 1), "device": str(device),
        "world_size": world, "out_dir": str(out), "last_checkpoint": checkpoint.latest(ckpt_root),
        "init_from": cfg.init_from, "data": data.stats,
    }
    if log:
        log.close()
        plot_losses(out / "metrics.jsonl", out / "loss.png", title=f"{cfg.model.get('preset')} on {cfg.data.path or 'stdlib source'}")
        write_dashboard(out)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary), file=sys.stderr)
    if status != "ok":
        raise TrainingFailed(
            f"the last {skipped_in_a_row} of {trained} step(s) had a non-finite loss or gradient and were skipped, "
            f"so step {cfg.steps} was never trained or saved; the last good checkpoint is "
            f"{checkpoint.latest(ckpt_root)}. Lower the lr or check the data, then resume with a larger --steps"
        )
    return summary


def main(argv: list[str] | None = None, parse=parse_args) -> None:
    """Parse (`parse(argv) -> TrainConfig`; posttrain.sft brings its own) and train."""
    run_cli(lambda: run(parse(argv)))


if __name__ == "__main__":
    main()
