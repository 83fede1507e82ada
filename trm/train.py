"""Train a Tiny Recursive Model: `python -m trm.train --preset tiny-sudoku-mlp` (console script `kimi-trm`).

One optimizer step per supervision step of the batch (trm/supervision.py): every slot of the batch
takes one supervision step of its example, the loss is backpropagated through the last recursion
only, the optimizer steps, and slots whose example halted take the next one. The weights' EMA is
what the evaluations score.

Splits (trm/data/__init__.py): training examples are drawn in a seeded order, epoch after epoch, each with
a fresh augmentation; validation is scored every eval_every steps (exact accuracy after each
supervision step, and where the halting head would stop); the EMA weights that score best on
validation are kept and the test split is scored once with them, at the end. The reference code
selects checkpoints on the test set; we do not.

Processes: under torchrun every rank holds the model and batch_size slots of its own, and the
gradients are averaged over ranks before each step (plain data parallelism: TRM's 5-7M parameters
and their optimizer state fit any device whole, so there is no ZeRO). The ranks' slots are one
batch of world * batch_size: the halted slots are refilled, in rank order, from one draw stream
(the same on every rank, each taking its share), so P processes train as one process with P times
the slots, up to the order of floating-point sums (tests/test_trm_distributed.py). The logged
figures are over all ranks' slots.

A run directory as launch.train's: config.yaml, data.json (the splits' sizes, seeds and hardness),
metrics.jsonl (+ TensorBoard), checkpoints (safetensors + JSON: model, EMA, optimizer, the batch
in progress, the draw streams; --resume continues exactly), trm.png and summary.json.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

import optim
from launch.checkpoint import resume, run_dir
from launch.checkpoint import store as checkpoint
from launch.parallel.distributed import DistInfo, sum_gradients
from launch.metrics.log import MetricsLog, check_writers
from launch.runtime import replicated_run, run_cli
from moe.config import ConfigError
from trm.config import TRMConfig, preset
from trm.model import TRM, parameter_count
from trm.run_config import TRMRunConfig, parse
from trm.supervision import Carry, evaluate, new_carry, refill, supervision_step
from trm.data import PuzzleData, build

# Fields a resume may change: how long, how often to evaluate, log and save.
FREE = {"steps", "time_budget_s", "eval_every", "eval_batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
        "device", "precision", "resume", "out_dir", "tensorboard", "wandb"}


def forward_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the model's forward computes in: bf16 (autocast) or fp32 ("auto": bf16 on CUDA only,
    where it is the reference code's choice and the tensor cores' rate; CPU autocast is slower)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


class Stream:
    """Indices into the training set, a seeded permutation per epoch; every rank holds the same one."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.position = n, seed, 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        # The seed once had "+ rank" (each rank its own shard): rank 0's, so one-process runs draw as before.
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 101)
        return torch.randperm(self.n, generator=g)

    def take(self, k: int) -> torch.Tensor:
        out = []
        while k > 0:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            chunk = self._order[self.position : self.position + k]
            out.append(chunk)
            self.position += len(chunk)
            k -= len(chunk)
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation()


def model_config(cfg: TRMRunConfig, data: PuzzleData) -> TRMConfig:
    """The preset, the user's fields, and what the data decides (vocabulary, length, puzzle ids, pad)."""
    given = {"vocab_size": data.vocab_size, "seq_len": data.seq_len, "puzzle_ids": data.num_puzzles,
             "ignore_token": data.ignore_token}
    for name, value in given.items():
        if name in cfg.model and cfg.model[name] != value:
            raise ConfigError(f"model.{name} = {cfg.model[name]}, but the {data.name} data has {name} = {value}; "
                              f"leave model.{name} out (the data sets it)")
    if not data.num_puzzles:
        given["puzzle_emb_len"] = 0  # a preset's prefix (trm-arc-att's 16) has nothing to hold without puzzle ids
    elif not cfg.model.get("puzzle_emb_len", preset(cfg.preset).puzzle_emb_len):
        given["puzzle_emb_len"] = 16  # the paper's ARC prefix, for a preset made for puzzles without ids
    return preset(cfg.preset, **{**cfg.model, **given})


class WithoutPuzzleEmbedding(nn.Module):
    """The model's parameters less the puzzle embedding, for the registry's optimizer (the same tensors)."""

    def __init__(self, model: TRM):
        super().__init__()
        self.embed_tokens, self.layers, self.lm_head, self.q_head = (model.embed_tokens, model.layers, model.lm_head,
                                                                     model.q_head)


class Trainer:
    def __init__(self, cfg: TRMRunConfig, data: PuzzleData, info: DistInfo | None, device):
        self.cfg, self.data, self.device = cfg, data, device
        self.rank, self.world = (0, 1) if info is None else (info.rank, info.world_size)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = TRM(model_config(cfg, data)).to(device)
        self.optimizer = optim.build(cfg.optimizer, WithoutPuzzleEmbedding(self.model), lr=cfg.lr,
                                     weight_decay=cfg.weight_decay, **cfg.optimizer_args)
        self.puzzle_optimizer = None
        if self.model.puzzle_emb is not None:
            self.puzzle_optimizer = torch.optim.AdamW(self.model.puzzle_emb.parameters(), lr=cfg.puzzle_emb_lr,
                                                      betas=(0.9, 0.95), weight_decay=0.0)
        # Linear warmup, then constant (the paper's schedule).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
        self.ema = None
        if cfg.ema:
            self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.stream = Stream(len(data.train[0]), cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed * 7919)  # halting exploration, as the stream
        self.draws = 0  # examples drawn by all ranks: the seed of each one's augmentation
        self.carry: Carry = new_carry(self.model, cfg.batch_size, device)
        self.best = {"val_exact": -1.0, "step": None}
        self.best_weights = None
        self.dtype = forward_dtype(cfg.precision, torch.device(device))

    def autocast(self):
        """The forward's precision; the backward and the optimizer run outside it, in fp32."""
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16,
                              enabled=self.dtype == torch.bfloat16)

    def draw(self, k: int, before: int, total: int):
        """This rank's k examples: numbers before .. before + k - 1 of the `total` all ranks take now."""
        index = self.stream.take(total)[before : before + k]
        inputs, targets = self.data.train[0][index].clone(), self.data.train[1][index].clone()
        if self.cfg.augment and self.data.augment is not None:
            for j in range(k):
                # "-0-" was the rank when each rank had its own stream: one-process runs augment as before.
                rng = random.Random(f"{self.cfg.seed}-0-{self.draws + before + j}")
                inputs[j], targets[j] = self.data.augment(inputs[j], targets[j], rng)
        self.draws += total
        ids = torch.zeros(k, dtype=torch.int64) if self.data.puzzle_ids is None else self.data.puzzle_ids[0][index]
        return index, inputs, targets, ids

    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(values)
        return values

    def step(self) -> dict:
        counts = torch.zeros(self.world, dtype=torch.int64, device=self.device)
        counts[self.rank] = self.carry.halted_B.sum()
        counts = self._sum_over_ranks(counts).tolist()  # halted slots per rank
        before, total = sum(counts[: self.rank]), sum(counts)
        refill(self.model, self.carry, lambda k: self.draw(k, before, total), self.generator, before, total)
        steps_before = self.carry.steps_B.clone()
        with self.autocast():
            loss, figures = supervision_step(self.model, self.carry)
        self.optimizer.zero_grad(set_to_none=True)
        if self.puzzle_optimizer is not None:
            self.puzzle_optimizer.zero_grad(set_to_none=True)
        (loss / self.world).backward()  # each rank's loss is its slots' mean: the sum over ranks / world is the mean
        if self.world > 1:
            sum_gradients(self.model)
        limit = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit))
        record = {"grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0], "refilled": total,
                  **self._figures(loss, figures, steps_before)}
        if not math.isfinite(grad_norm):
            record["skipped"] = True
            return record
        self.optimizer.step()
        if self.puzzle_optimizer is not None:
            for group in self.puzzle_optimizer.param_groups:  # the same warmup as the rest
                group["lr"] = self.cfg.puzzle_emb_lr * self.scheduler.get_last_lr()[0] / self.cfg.lr if self.cfg.lr else 0.0
            self.puzzle_optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            # The decay ramps up to cfg.ema ((1 + t) / (10 + t), as TensorFlow's EMA with num_updates): a
            # short run's average is not dominated by the random initial weights.
            t = self.scheduler.last_epoch
            decay = min(self.cfg.ema, (1 + t) / (10 + t))
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.model.parameters()):
                    e.lerp_(p, 1 - decay)
        return record

    def _figures(self, loss: torch.Tensor, figures: dict, steps_before_B: torch.Tensor) -> dict:
        """Loss, exact accuracy... over every rank's slots (each rank's are means over as many slots)."""
        names = ("loss", "cell_loss", "q_loss", "exact", "halted")
        means = [loss.item(), *(figures[k] for k in names[1:])]
        # Exact accuracy by the supervision step the slots were at: how much recursion buys in training.
        n_sup = self.model.cfg.n_sup
        exact_B = figures["exact_B"].double()
        by_step = torch.zeros(2, n_sup, dtype=torch.float64, device=exact_B.device)
        by_step.index_add_(1, steps_before_B, torch.stack([exact_B, torch.ones_like(exact_B)]))
        summed = self._sum_over_ranks(torch.cat([torch.tensor(means, dtype=torch.float64, device=exact_B.device),
                                                 by_step.reshape(-1)])).cpu()
        record = dict(zip(names, (summed[: len(names)] / self.world).tolist()))
        right, slots = summed[len(names):].reshape(2, n_sup)
        record["exact_by_slot_step"] = {str(s + 1): float(right[s] / slots[s]) for s in range(n_sup) if slots[s]}
        return record

    def evaluated_model(self) -> TRM:
        return self.ema if self.ema is not None else self.model

    def evaluate(self, split: str, model: TRM | None = None) -> dict:
        inputs, targets = getattr(self.data, split)
        ids = None if self.data.puzzle_ids is None else self.data.puzzle_ids[("train", "val", "test").index(split)]
        with self.autocast():
            report = evaluate(model or self.evaluated_model(), inputs, targets, ids,
                              batch_size=self.cfg.eval_batch_size)
        predictions = report.pop("predictions")
        out = {f"{split}_{k}": v for k, v in report.items()}
        if self.data.verify is not None:  # the task's own verifier on each answer (any valid solution counts)
            verified = sum(self.data.verify(i.tolist(), p.tolist())[0] for i, p in zip(inputs, predictions))
            out[f"{split}_verified"] = verified / len(inputs)
        if self.data.score is not None:  # e.g. ARC's pass@2 over augmentations
            out.update({f"{split}_{k}": v for k, v in self.data.score(split, predictions).items()})
        return out

    def state_dict(self) -> dict:
        c = self.carry
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "stream": self.stream.state_dict(), "draws": self.draws,
                 "generator": self.generator.get_state(), "best": dict(self.best), "rng": checkpoint.rng_state(),
                 "carry": {f.name: getattr(c, f.name) for f in dataclasses.fields(c)}}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.puzzle_optimizer is not None:
            state["puzzle_optimizer"] = self.puzzle_optimizer.state_dict()
        if self.best_weights is not None:
            state["best_weights"] = self.best_weights
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["stream"])
        self.draws = state["draws"]
        self.generator.set_state(state["generator"])
        self.best = state["best"]
        self.best_weights = state.get("best_weights")
        checkpoint.set_rng_state(state["rng"])
        self.carry = Carry(**{k: v.to(self.device) for k, v in state["carry"].items()})
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.puzzle_optimizer is not None:
            self.puzzle_optimizer.load_state_dict(state["puzzle_optimizer"])


def run(cfg: TRMRunConfig, data: PuzzleData | None = None) -> dict:
    """Train as configured; returns the summary also written to summary.json. `data`: the splits
    build(cfg.task, cfg.task_args, cfg.seed) gives, if already built (the demo shares one set)."""
    try:
        optim.check(cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, **cfg.optimizer_args)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.optimizer == "muonclip":
        raise ConfigError("optimizer = 'muonclip': QK-clip rescales MLA's query and key projections, which TRM "
                          "does not have; use muon (the same update without the clip) or adamw")
    check_writers(cfg.tensorboard, cfg.wandb)
    if data is None:
        data = build(cfg.task, cfg.task_args, cfg.seed)  # before any file is written: bad task_args cost nothing
    model_config(cfg, data)
    with replicated_run(cfg.device, cfg.out_dir, cfg.resume, "trm", 600.0) as (info, device, out, ckpt):
        cfg.out_dir = str(out)
        return _run(cfg, data, info, device, out, ckpt)


def _run(cfg: TRMRunConfig, data: PuzzleData, info, device, out: Path, ckpt: str | None) -> dict:
    is_main = info is None or info.rank == 0
    world = 1 if info is None else info.world_size
    start, changes = 0, {}
    trainer = Trainer(cfg, data, info, device)
    if ckpt is not None:
        manifest = checkpoint.read_manifest(Path(ckpt))
        if manifest["world_size"] != world:  # each rank's file holds its slots of the batch in progress
            raise ConfigError(f"{ckpt} was written by {manifest['world_size']} processes and this run has {world}; "
                              f"resume it with {manifest['world_size']} (torchrun --nproc_per_node)")
        changes = resume.compare(manifest["train_config"], {}, cfg.to_dict(), {}, free=FREE, schedule=set())
        start = manifest["step"]
        if start >= cfg.steps:
            raise ConfigError(f"steps = {cfg.steps}, but the run's newest checkpoint is at step {start}: nothing left "
                              f"to do; pass --steps above {start} to continue it")
        trainer.load_state_dict(checkpoint.load(Path(ckpt), rank=trainer.rank))
    config = cfg.to_dict()
    model_cfg = trainer.model.cfg
    if is_main:
        if ckpt is None:
            run_dir.mark(out)
        superseded = run_dir.supersede_metrics(out, start) if cfg.resume else 0
        run_dir.write_config(out, config)
        run_dir.append_history(out, {"start_step": start, "checkpoint": ckpt, "changed": changes,
                                     "superseded_metrics": superseded, "command": sys.argv, "config": config})
        (out / "data.json").write_text(json.dumps(data.info, indent=2))
        print(f"TRM {model_cfg.preset} ({parameter_count(trainer.model) / 1e6:.2f}M parameters, {model_cfg.mixer}, "
              f"T={model_cfg.T} n={model_cfg.n} n_sup={model_cfg.n_sup}) on {data.name}: {len(data.train[0])} train / "
              f"{len(data.val[0])} val / {len(data.test[0])} test puzzles; {world} x {device.type} "
              f"({str(trainer.dtype).removeprefix('torch.')} forward); writing {out}"
              + (f"; resuming at step {start}" if ckpt else ""), file=sys.stderr)
    log = MetricsLog(out / "metrics.jsonl", tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                     first_step=start + 1 if start else 0) if is_main else None
    meta = {"kind": "trm", "model_config": dataclasses.asdict(model_cfg), "train_config": config}

    def validate(step: int) -> dict:
        result = trainer.evaluate("val")
        if result["val_exact"] > trainer.best["val_exact"]:
            trainer.best = {"val_exact": result["val_exact"], "step": step}
            trainer.best_weights = {k: v.clone() for k, v in trainer.evaluated_model().state_dict().items()}
        return result

    if start == 0 and is_main:
        log.write({"step": 0, **validate(0)})
    t0, step, stopped_early, train_s = time.perf_counter(), start, False, 0.0
    for step in range(start + 1, cfg.steps + 1):
        t_step = time.perf_counter()
        record = {"step": step, **trainer.step()}
        train_s += time.perf_counter() - t_step
        record["train_s"] = round(train_s, 2)
        # The budget counts training only: runs that evaluate more often or longer get the same compute.
        out_of_time = cfg.time_budget_s > 0 and train_s >= cfg.time_budget_s
        if world > 1:  # every rank stops at the same step
            flag = torch.tensor([float(out_of_time)])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        last = step == cfg.steps or out_of_time
        if is_main and (step % cfg.eval_every == 0 or last):
            record.update(validate(step))
        if log and (step % cfg.log_every == 0 or "val_exact" in record or record.get("skipped")):
            log.write(record)
            if "val_exact" in record:
                print(f"step {step}: loss {record['loss']:.3f}, train exact {record['exact']:.1%}, "
                      f"val exact {record['val_exact']:.1%} (by step {_short(record['val_exact_by_step'])})",
                      file=sys.stderr)
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last:
            checkpoint.save(out / "checkpoints", step, trainer.state_dict(), meta, keep=cfg.keep_checkpoints)
        if out_of_time:
            stopped_early = True
            break
    summary = {"status": "ok", "preset": model_cfg.preset, "steps": step, "start_step": start,
               "stopped_by_time_budget": stopped_early, "wall_s": round(time.perf_counter() - t0, 1),
               "train_s": round(train_s, 1),
               "params": parameter_count(trainer.model), "world_size": world, "device": str(device),
               "forward_dtype": str(trainer.dtype).removeprefix("torch."),
               "out_dir": str(out), "best_val": trainer.best, "data": data.info}
    if is_main:
        if trainer.best_weights is not None:  # test once, with the weights validation chose
            scored = copy.deepcopy(trainer.evaluated_model())
            scored.load_state_dict(trainer.best_weights)
            # In summary.json, not metrics.jsonl: one figure per run, and a run stopped and resumed
            # must not keep the test score of its first attempt among its records.
            summary["test"] = trainer.evaluate("test", scored)
        log.close()
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        from trm.plots import plot_run

        plot_run(out / "metrics.jsonl", out / "trm.png", title=f"{model_cfg.preset} on {data.name}")
        print(json.dumps({k: summary[k] for k in ("status", "steps", "wall_s", "best_val")}
                         | {"test_exact": summary.get("test", {}).get("test_exact")}), file=sys.stderr)
    return summary


def _short(values: list[float]) -> str:
    return " ".join(f"{v:.0%}" for v in values)


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda: run(parse(argv)))


if __name__ == "__main__":
    main()
