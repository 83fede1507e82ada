"""RL on verifiable rewards: `python -m posttrain.rl --init-from SFT_RUN` (console script `kimi-rl`).

One iteration (Kimi k1.5 §2.3):
  1. draw       prompts from the task's pool: curriculum by difficulty, problem i drawn with
                probability proportional to 1 - s_i, its success rate so far (prompt_pool.py)
  2. sample     k responses per prompt with the model's own sampler (moe.generate: batched, MLA's
                compressed cache, per-token log-probabilities and experts kept); with partial
                rollouts, unfinished responses wait for the next iteration (rollout.py); on a
                multi-turn task (--task tools) a sample is a whole episode of the live tool loop:
                each turn's calls run and their results are appended for the model to read, with
                no loss taken on them (tasks/tool_loop.py)
  3. score      the task's verifier; rewards shaped by the length penalty, truncation and loop
                penalties (rewards.py); the pool learns each problem's success rate
  4. reference  log-probabilities of the samples under the policy pi_i this iteration starts from
                (no copy of the model: it is the policy before this iteration's steps)
  5. train      steps_per_iteration optimizer steps on the objective (objectives.py: k15, grpo), by
                the registry's optimizer (MuonClip by default), with routing replay: the training
                forward uses the experts each token was sampled through; plus an optional PTX loss

Logged per iteration (metrics.jsonl): reward, accuracy and response length of the samples, held-out
accuracy every eval_every iterations (greedy), KL(pi_i || pi_i+1) on the samples (k3 estimator),
the per-token |log p| mismatch between sampling and training, with the routing replayed and without,
sampling and training seconds.

Processes: under torchrun every rank holds the whole state (pool, buffer of partial rollouts), samples
the groups whose slot is its rank modulo the world size, and shares what it sampled; each rank then
trains on its share of the finished groups and the gradients are summed over ranks, weighted so a
step's gradient is the mean over every sample of the iteration: the same step as one process taking
the whole batch. The model is replicated (no ZeRO, no expert parallelism here: sampling would then be
a collective per decoding step), which fits every preset a CPU or one GPU node holds.

Checkpoints (launch/checkpoint/store.py: safetensors + JSON, digests, latest pointer) hold the model, the
optimizer, the pool's statistics and RNG, the buffer of unfinished rollouts and the iteration;
`--resume --out-dir RUN` continues exactly. `launch.export`, `posttrain.generate` and `--init-from`
read an RL run like any other run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import optim
from launch.checkpoint import resume, run_dir
from launch.checkpoint import store as checkpoint
from launch.parallel.distributed import DistInfo, sum_gradients
from launch.parallel.engine import LocalStepper, StepResult, finish_step
from launch.metrics.log import MetricsLog, check_writers
from launch.checkpoint.pretrained import load_pretrained, verify_source
from launch.data.tokenizer import BPETokenizer, save_run_tokenizer
from launch.runtime import autocast, on_main, replicated_run, run_cli
from moe.config import ConfigError, ModelConfig
from moe.model import Transformer
from posttrain.chat import render_generation_prompt
from posttrain.policy import chat_stops
from posttrain.rl import objectives
from posttrain.rl.config import RLConfig, parse
from posttrain.rl.prompt_pool import PromptPool
from posttrain.rl.rewards import shape_rewards
from posttrain.rl.batch import Rows, eval_logprobs, token_logprobs
from posttrain.rl.rollout import Group, GrowSettings, Sample, grow, new_group
from posttrain.rl.tasks import build_task

# Fields a resume may change: how long, how often to evaluate and save, how many checkpoints to keep, where metrics go.
FREE = {"iterations", "eval_every", "checkpoint_every", "keep_checkpoints", "dist_timeout_s", "device", "resume", "out_dir",
        "tensorboard", "wandb"}


def _world(info: DistInfo | None) -> tuple[int, int]:
    return (0, 1) if info is None else (info.rank, info.world_size)


class Trainer:
    def __init__(self, cfg: RLConfig, model: Transformer, tokenizer, info: DistInfo | None, device):
        self.cfg, self.model, self.tokenizer, self.info, self.device = cfg, model, tokenizer, info, device
        self.rank, self.world = _world(info)
        self.task = build_task(cfg.task, cfg.task_args, cfg.train_problems, cfg.eval_problems, cfg.seed)
        # A multi-turn task's environment answers each turn's end (tool results); None: one turn.
        self.environment = None if self.task.environment is None else self.task.environment(tokenizer, cfg.max_turns)
        self.prompts = [self.prompt(p) for p in self.task.train]
        self.heldout_prompts = [self.prompt(p) for p in self.task.heldout]
        longest = max(map(len, self.prompts + self.heldout_prompts))
        if longest + cfg.max_response_tokens > model.cfg.max_seq_len:
            raise ConfigError(f"max_response_tokens = {cfg.max_response_tokens} + the longest prompt ({longest} tokens) "
                              f"exceed the model's max_seq_len = {model.cfg.max_seq_len}")
        self.stops = chat_stops(tokenizer)
        self.pool = PromptPool([p["difficulty"] for p in self.task.train], cfg.seed, cfg.promote_at, cfg.min_trials)
        self.buffer: list[tuple[int, Group]] = []  # (slot, group) in flight: unfinished, or waiting to be trained
        self.next_slot = 0
        self.objective = objectives.build(cfg.objective, **cfg.objective_args)
        self.optimizer = optim.build(cfg.optimizer, model, lr=cfg.lr, weight_decay=cfg.weight_decay, **cfg.optimizer_args)
        # Gradients accumulate over micro-batches weighted by their share of the samples (train), so grad_accum 1.
        self.stepper = LocalStepper(model, self.optimizer, 1, cfg.grad_clip)
        self.ptx = self._ptx_batches() if cfg.ptx_weight > 0 else None

    def prompt(self, problem: dict) -> list[int]:
        messages = problem.get("messages") or [{"role": "user", "content": problem["prompt"]}]
        return render_generation_prompt(self.tokenizer, messages, problem.get("tools"))

    def episode(self, problem: dict) -> dict | None:
        return None if self.environment is None else self.environment.start(problem)

    def verdict(self, problem: dict, sample: Sample) -> tuple[float, str]:
        """The verifier on what it scores: a multi-turn sample's episode, else the response's text."""
        return self.task.verify(problem, sample.episode if self.environment is not None else self.text(sample.tokens))

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t not in self.stops])

    def _ptx_batches(self):
        from launch.data.build import DataConfig, TrainBatches, build_data

        data = build_data(DataConfig(path=self.cfg.ptx_data), self.cfg.ptx_seq_len, self.tokenizer)
        return TrainBatches(data.train, self.cfg.ptx_batch, seed=self.cfg.seed, rank=self.rank, world_size=self.world)

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "pool": self.pool.state_dict(), "buffer": [[slot, g.state()] for slot, g in self.buffer],
                 "next_slot": self.next_slot, "rng": checkpoint.rng_state()}
        if self.ptx is not None:
            state["ptx"] = self.ptx.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.pool.load_state_dict(state["pool"])
        self.buffer = [(slot, Group.from_state(g)) for slot, g in state["buffer"]]
        self.next_slot = state["next_slot"]
        checkpoint.set_rng_state(state["rng"])
        if self.ptx is not None:
            self.ptx.load_state_dict(state["ptx"])

    # ------------------------------------------------------------ one iteration

    def fill(self) -> None:
        """New groups up to prompts_per_iteration in flight; slot s samples with seeds from (seed, s)."""
        k, missing = self.cfg.samples_per_prompt, self.cfg.prompts_per_iteration - len(self.buffer)
        for problem in self.pool.draw(missing) if missing > 0 else []:
            seed = (self.cfg.seed * 1_000_003 + self.next_slot) * k
            group = new_group(problem, self.prompts[problem], k, seed, self.episode(self.task.train[problem]))
            self.buffer.append((self.next_slot, group))
            self.next_slot += 1

    def sample(self, iteration: int) -> int:
        """Grow this rank's unfinished groups, then share them: every rank ends with the whole buffer."""
        cfg = self.cfg
        settings = GrowSettings(
            budget=cfg.max_response_tokens, segment=cfg.partial_rollout_tokens or cfg.max_response_tokens,
            temperature=cfg.temperature_at(iteration), top_p=None if cfg.top_p == 1 else cfg.top_p,
            stop_tokens=self.stops, loop_period=cfg.loop_period, loop_repeats=cfg.loop_repeats,
            record_routing=cfg.routing_replay, batch_size=cfg.sample_batch_size, environment=self.environment)
        mine = [(slot, g) for slot, g in self.buffer if slot % self.world == self.rank and not g.finished]
        with autocast(self.device):  # the precision the training forward runs in
            drawn = grow(self.model, [s for _, g in mine for s in g.samples], settings)
        if self.world > 1:
            shared = [None] * self.world
            dist.all_gather_object(shared, ({slot: g.state() for slot, g in mine}, drawn))
            grown = {slot: Group.from_state(state) for part, _ in shared for slot, state in part.items()}
            self.buffer = [(slot, grown.get(slot, g)) for slot, g in self.buffer]
            drawn = sum(n for _, n in shared)
        return drawn

    def score(self, groups: list[Group], iteration: int) -> dict:
        """Rewards into each sample (s.reward), success statistics into the pool; the iteration's figures."""
        cfg = self.cfg
        length_weight = cfg.length_penalty if iteration >= cfg.length_penalty_after else 0.0
        correct_all, lengths, correct_lengths, finishes, rewards = [], [], [], [], []
        by_difficulty: dict[str, list[int]] = {}  # lengths of the correct samples per difficulty
        for g in groups:
            problem = self.task.train[g.problem]
            verdicts = [self.verdict(problem, s) for s in g.samples]
            correct = [v[0] == 1.0 and s.finish == "stop" for v, s in zip(verdicts, g.samples)]
            shaped = shape_rewards(correct, [s.model_tokens for s in g.samples], [s.finish for s in g.samples],
                                   length_weight=length_weight, truncation_penalty=cfg.truncation_penalty,
                                   repetition_penalty=cfg.repetition_penalty)
            for s, r, (_, reason) in zip(g.samples, shaped, verdicts):
                s.reward, s.reason = r, reason
            self.pool.update(g.problem, float(sum(correct)), len(correct))
            correct_all += correct
            lengths += [s.model_tokens for s in g.samples]
            correct_lengths += [s.model_tokens for s, c in zip(g.samples, correct) if c]
            by_difficulty.setdefault(str(problem["difficulty"]), []).extend(
                s.model_tokens for s, c in zip(g.samples, correct) if c)
            finishes += [s.finish for s in g.samples]
            rewards += shaped
        n = len(lengths)
        return {"reward": sum(rewards) / n, "accuracy": sum(correct_all) / n, "response_tokens": sum(lengths) / n,
                "correct_response_tokens": sum(correct_lengths) / len(correct_lengths) if correct_lengths else None,
                "correct_tokens_by_difficulty": {d: sum(v) / len(v) for d, v in sorted(by_difficulty.items()) if v},
                "truncated": finishes.count("length") / n, "loops": finishes.count("repeat") / n,
                "samples": n, "length_weight": length_weight}

    def train(self, groups: list[Group], total_samples: int) -> dict:
        """steps_per_iteration optimizer steps on this rank's `groups` (all ranks together: the iteration's
        total_samples samples); returns the figures of the last step and the mismatch/KL estimates."""
        cfg, model = self.cfg, self.model
        chunks = [groups[i : i + cfg.micro_batch_groups] for i in range(0, len(groups), cfg.micro_batch_groups)]
        micro = [Rows(c, self.device) for c in chunks]
        # The reference pi_i is the policy now, before this iteration's steps.
        refs = [eval_logprobs(model, rows, cfg.routing_replay) for rows in micro]
        rewards = [torch.tensor([s.reward for g in c for s in g.samples], device=self.device) for c in chunks]
        figures = {"mismatch": self._mean_over(micro, [(r - rows.sample_logp_ST).abs() for r, rows in zip(refs, micro)])}
        if cfg.routing_replay:  # the same samples through the experts the training weights would choose
            free = [eval_logprobs(model, rows, False) for rows in micro]
            figures["mismatch_without_replay"] = self._mean_over(micro, [(f - rows.sample_logp_ST).abs()
                                                                         for f, rows in zip(free, micro)])
        for _ in range(cfg.steps_per_iteration):
            metrics: dict[str, float] = {}
            for rows, ref, reward in zip(micro, refs, rewards):
                logp = token_logprobs(model, rows, cfg.routing_replay)
                loss, m = self.objective(objectives.PolicyBatch(logp, ref, rows.mask_ST, reward, rows.groups_S))
                weight = rows.mask_ST.shape[0] / total_samples
                (loss * weight).backward()
                for key, value in m.items():
                    metrics[key] = metrics.get(key, 0.0) + value * weight
            if self.ptx is not None:
                inputs, targets = (t.to(self.device) for t in next(self.ptx))
                with autocast(self.device):
                    ptx_loss = model(inputs, targets).lm_loss
                (ptx_loss * cfg.ptx_weight / self.world).backward()
                metrics["ptx_loss"] = ptx_loss.item()
            result = self.step()
            metrics["grad_norm"] = result.grad_norm
            if not result.applied:
                metrics["skipped"] = True
        if self.world > 1:  # the objective's figures are sums of per-rank shares: make them global
            keys = sorted(k for k in metrics if k not in ("grad_norm", "skipped"))
            values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(values)
            metrics.update(zip(keys, values.tolist()))
        # KL(pi_i || pi_i+1) on samples of pi_i, k3 estimator: r - 1 - log r, r = pi_i+1 / pi_i per token.
        log_r = [eval_logprobs(model, rows, cfg.routing_replay) - ref for rows, ref in zip(micro, refs)]
        figures["kl"] = self._mean_over(micro, [d.exp() - 1 - d for d in log_r])
        max_logits = getattr(self.optimizer, "last_max_logits_LH", None)
        if max_logits is not None:
            figures["max_logit"] = max_logits.max().item()
        return {**metrics, **figures}

    def _mean_over(self, micro: list[Rows], values: list[torch.Tensor]) -> float:
        """Mean over every masked token of every rank."""
        total = torch.tensor([sum(float((v * r.mask_ST).sum()) for v, r in zip(values, micro)),
                              sum(float(r.mask_ST.sum()) for r in micro)], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(total)
        return float(total[0] / total[1].clamp_min(1))

    def step(self) -> StepResult:
        """The gradients summed over ranks, then launch's one-process step: clip, skip a non-finite
        one, update; then the router biases from the global load."""
        if self.world > 1:
            sum_gradients(self.model)
        result = self.stepper.step()
        finish_step(self.model, result)
        return result

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy responses to the held-out problems (whole episodes for a multi-turn task): accuracy,
        and mean length (the model's tokens) overall and when right."""
        samples = [Sample(i, 0, list(prompt), episode=self.episode(problem))
                   for i, (prompt, problem) in enumerate(zip(self.heldout_prompts, self.task.heldout))]
        budget = self.cfg.max_response_tokens
        settings = GrowSettings(budget=budget, segment=budget, temperature=0.0, top_p=None, stop_tokens=self.stops,
                                loop_period=0, loop_repeats=1, record_routing=False,
                                batch_size=self.cfg.sample_batch_size, environment=self.environment)
        with autocast(self.device):
            grow(self.model, samples, settings)
        verdicts = [self.verdict(p, s) for p, s in zip(self.task.heldout, samples)]
        right = [s.model_tokens for s, (r, _) in zip(samples, verdicts) if r == 1.0]
        by_difficulty: dict[str, list[float]] = {}
        for problem, (reward, _) in zip(self.task.heldout, verdicts):
            by_difficulty.setdefault(str(problem["difficulty"]), []).append(reward)
        return {"heldout_accuracy": len(right) / len(samples),
                "heldout_by_difficulty": {d: sum(v) / len(v) for d, v in sorted(by_difficulty.items())},
                "heldout_tokens": sum(s.model_tokens for s in samples) / len(samples),
                "heldout_correct_tokens": sum(right) / len(right) if right else None}

    def iterate(self, iteration: int) -> dict:
        t0 = time.perf_counter()
        self.fill()
        drawn = self.sample(iteration)
        t1 = time.perf_counter()
        record = {"iteration": iteration + 1, "temperature": self.cfg.temperature_at(iteration),
                  "level": self.pool.level, "tokens_sampled": drawn, "sample_s": round(t1 - t0, 3)}
        done = [(slot, g) for slot, g in self.buffer if g.finished]
        # Every rank must take part in each step's collectives: with fewer finished groups than
        # ranks they wait (in the buffer) for the next iteration.
        if len(done) < self.world:
            record.update({"groups_trained": 0, "waiting": len(self.buffer)})
            return record
        self.buffer = [(slot, g) for slot, g in self.buffer if not g.finished]
        groups = [g for _, g in done]
        record.update(self.score(groups, iteration))
        total = sum(len(g.samples) for g in groups)
        record.update(self.train(groups[self.rank :: self.world], total))
        record.update({"groups_trained": len(groups), "waiting": len(self.buffer),
                       "train_s": round(time.perf_counter() - t1, 3)})
        record["level"] = self.pool.level
        return record


def run(cfg: RLConfig) -> dict:
    """Train as configured; returns the summary also written to summary.json."""
    try:
        optim.check(cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, **cfg.optimizer_args)
        objectives.check(cfg.objective, **cfg.objective_args)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_writers(cfg.tensorboard, cfg.wandb)
    with replicated_run(cfg.device, cfg.out_dir, cfg.resume, "rl", cfg.dist_timeout_s) as (info, device, out, ckpt):
        cfg.out_dir = str(out)
        return _run(cfg, info, device, out, ckpt)


def _run(cfg: RLConfig, info, device, out: Path, ckpt: str | None) -> dict:
    rank, world = _world(info)
    is_main = rank == 0
    start, changes = 0, {}
    if ckpt is not None:
        manifest = checkpoint.read_manifest(Path(ckpt))
        changes = resume.compare(manifest["train_config"], {}, cfg.to_dict(), {}, free=FREE, schedule=set())
        model = Transformer(ModelConfig(**manifest["model_config"]))
        tokenizer = BPETokenizer.load(str(out / "tokenizer.json"))
        start = manifest["step"]
        if start >= cfg.iterations:
            raise ConfigError(f"iterations = {cfg.iterations}, but the run's newest checkpoint is at iteration {start}: "
                              f"nothing left to do; pass --iterations above {start} to continue it")
    else:
        # Rank 0 verifies the source once for the job (every file's SHA-256); the ranks read what it chose.
        init = load_pretrained(on_main(info, lambda: verify_source(cfg.init_from)), check_digests=False)
        if init.tokenizer is None:
            raise ConfigError(f"init_from = {cfg.init_from!r}: {init.source} kept no tokenizer.json, so its token "
                              "ids cannot be read")
        model, tokenizer = init.model, init.tokenizer
    model = model.train().to(device)
    trainer = Trainer(cfg, model, tokenizer, info, device)
    if ckpt is not None:
        trainer.load_state_dict(checkpoint.load(Path(ckpt), rank=0))  # every rank's state is the same
    config = cfg.to_dict()
    if is_main:
        if ckpt is None:
            run_dir.mark(out)
        # Records past the checkpoint (or all, starting over) are of iterations this attempt redoes.
        superseded = run_dir.supersede_metrics(out, start, key="iteration") if cfg.resume else 0
        run_dir.write_config(out, config)
        run_dir.append_history(out, {"start_iteration": start, "checkpoint": ckpt, "changed": changes,
                                     "superseded_metrics": superseded, "command": sys.argv, "config": config})
        save_run_tokenizer(tokenizer, str(out))
        print(f"RL from {cfg.init_from}: {cfg.objective}, {cfg.samples_per_prompt} samples x "
              f"{cfg.prompts_per_iteration} prompts per iteration on {world} x {device.type}; writing {out}"
              + (f"; resuming at iteration {start}" if ckpt else ""), file=sys.stderr)
    log = MetricsLog(out / "metrics.jsonl", step_key="iteration", tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                     first_step=start + 1 if start else 0) if is_main else None
    meta = {"kind": "rl", "model_config": dataclasses.asdict(model.cfg), "train_config": config}
    t_start = time.perf_counter()
    first = last_eval = None
    if start == 0 and is_main:
        first = last_eval = trainer.evaluate()
        log.write({"iteration": 0, **first})
        print(f"iteration 0: held-out accuracy {first['heldout_accuracy']:.1%}", file=sys.stderr)
    for iteration in range(start, cfg.iterations):
        record = trainer.iterate(iteration)
        done = iteration + 1
        if is_main and (done % cfg.eval_every == 0 or done == cfg.iterations):
            last_eval = trainer.evaluate()
            record.update(last_eval)
        if log:
            log.write(record)
            print(_progress(record), file=sys.stderr)
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.iterations:
            checkpoint.save(out / "checkpoints", done, trainer.state_dict(), meta, keep=cfg.keep_checkpoints)
    summary = {"status": "ok", "objective": cfg.objective, "iterations": cfg.iterations, "start_iteration": start,
               "first_heldout": first, "final_heldout": last_eval, "wall_s": round(time.perf_counter() - t_start, 1),
               "world_size": world, "device": str(device), "out_dir": str(out), "init_from": cfg.init_from,
               "last_checkpoint": checkpoint.latest(out / "checkpoints")}
    if log:
        log.close()
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        from posttrain.rl.plots import plot_run

        plot_run(out / "metrics.jsonl", out / "rl.png", title=f"{cfg.objective} from {cfg.init_from}")
    return summary


def _progress(r: dict) -> str:
    parts = [f"iteration {r['iteration']}"]
    for key, fmt in (("reward", "{:.3f}"), ("accuracy", "{:.1%}"), ("response_tokens", "{:.1f}"), ("kl", "{:.2e}"),
                     ("heldout_accuracy", "{:.1%}"), ("sample_s", "{:.1f}s"), ("train_s", "{:.1f}s")):
        if r.get(key) is not None:
            parts.append(f"{key} " + fmt.format(r[key]))
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda: run(parse(argv)))


if __name__ == "__main__":
    main()
