"""The RL run's configuration: one typed dataclass, filled from defaults, then a YAML/TOML file, then flags.

Every field is a flag (`--samples-per-prompt 8`, `--objective grpo`, `--objective-args '{tau: 0.05}'`),
and `--config FILE` gives any of them as a table; the resolved config is written to
<out_dir>/config.yaml, itself a valid --config. Each field's one-line help (its `doc` below) is what
`--help` prints, with its default, so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from launch.config.flags import flat_parser, parse_flat
from moe.config import ConfigError, check_field_types, doc_field as _f


@dataclass
class RLConfig:
    init_from: str | None = _f(None, "run directory, checkpoint or Hugging Face directory of the policy to start from (an SFT run)")
    out_dir: str | None = _f(None, "run directory to write; None: runs/rl-<time>")
    resume: bool = _f(False, "continue the run in --out-dir from its newest good checkpoint")
    seed: int = _f(0, "seed of the problems drawn, the samples and the held-out set")
    device: str = _f("auto", "auto | cpu | cuda")
    # Task and problems
    task: str = _f("arithmetic", "verifiable task (posttrain/rl/tasks/__init__.py): arithmetic, reverse, tools "
                                   "(the live tool loop, multi-turn), reasoning_gym (any reasoning-gym dataset)")
    task_args: dict = _f({}, "keyword arguments of the task's problem generator, e.g. {digits: [1, 2, 3]}")
    train_problems: int = _f(2000, "problems in the training pool")
    eval_problems: int = _f(200, "held-out problems scored greedily every eval_every iterations")
    # Sampling
    iterations: int = _f(40, "RL iterations: sample, score, train")
    prompts_per_iteration: int = _f(16, "groups (prompts) in flight per iteration, across all processes")
    samples_per_prompt: int = _f(8, "responses sampled per prompt (k)")
    max_response_tokens: int = _f(48, "token budget of one response; a response that reaches it is truncated "
                                      "(multi-turn: every token after the prompt, tool results included)")
    max_turns: int = _f(4, "assistant turns per episode of a multi-turn task (tools)")
    partial_rollout_tokens: int = _f(0, "tokens a response may grow by per iteration (k1.5 partial rollouts); "
                                        "0: whole responses")
    temperature: float = _f(1.0, "sampling temperature at the first iteration")
    final_temperature: float | None = _f(None, "temperature reached at the last iteration, linearly (K2's "
                                               "decaying temperature); None: constant")
    top_p: float = _f(1.0, "nucleus sampling mass (1: off)")
    sample_batch_size: int = _f(128, "sequences per generate call")
    # Rewards
    length_penalty: float = _f(0.0, "weight of k1.5's length reward (0: off)")
    length_penalty_after: int = _f(0, "iterations before the length reward switches on (warm-up)")
    truncation_penalty: float = _f(0.5, "reward -penalty for a response that hit max_response_tokens")
    repetition_penalty: float = _f(0.5, "reward -penalty for a response ended by loop detection")
    loop_period: int = _f(8, "longest repeated block loop detection looks for (0: off)")
    loop_repeats: int = _f(6, "repeats of one block that end a response as a loop")
    # Objective and optimisation
    objective: str = _f("k15", "policy loss by name (posttrain/rl/objectives.py): k15, grpo")
    objective_args: dict = _f({}, "keyword arguments of the objective, e.g. {tau: 0.1} or {clip_eps: 0.2}")
    optimizer: str = _f("muonclip", "optimizer from optim's registry or a dotted torch.optim path")
    lr: float = _f(2e-4, "learning rate (constant)")
    weight_decay: float = _f(0.0, "decoupled weight decay")
    optimizer_args: dict = _f({}, "extra keyword arguments of optim.build")
    grad_clip: float = _f(1.0, "max global gradient norm; 0 disables clipping")
    steps_per_iteration: int = _f(1, "optimizer steps on each iteration's samples")
    micro_batch_groups: int = _f(4, "groups per forward/backward (gradients accumulate over a step)")
    routing_replay: bool = _f(True, "train through the experts that produced each sampled token (R3)")
    ptx_weight: float = _f(0.0, "weight of a language-model loss on pre-training text (0: off)")
    ptx_data: str | None = _f(None, "corpus of the PTX loss (launch.data.build paths); None: the default corpus")
    ptx_batch: int = _f(4, "PTX sequences per optimizer step")
    ptx_seq_len: int = _f(128, "tokens per PTX sequence")
    # Curriculum and prioritized sampling
    promote_at: float = _f(0.6, "success rate at the current difficulty that opens the next one")
    min_trials: int = _f(4, "trials a problem needs before its success rate counts for promotion")
    # Bookkeeping
    eval_every: int = _f(5, "iterations between held-out evaluations (and at the first and last)")
    checkpoint_every: int = _f(10, "iterations between checkpoints (and at the last)")
    keep_checkpoints: int = _f(2, "newest complete checkpoints kept; 0 keeps all")
    tensorboard: bool = _f(True, "also write the logged scalars as TensorBoard events in out_dir/tensorboard")
    wandb: bool = _f(False, "also log them to an offline Weights & Biases run in out_dir/wandb (needs the wandb package)")
    dist_timeout_s: float = _f(600.0, "collective timeout under a launcher")

    def __post_init__(self):
        check_field_types(self)
        for names, ok, valid in _RANGES:
            for name in names:
                value = getattr(self, name)
                if value is not None and not ok(value):
                    raise ConfigError(f"RLConfig.{name} = {value} must be {valid}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"RLConfig.device = {self.device!r}; valid: auto, cpu, cuda")
        if not self.init_from:
            raise ConfigError("init_from is required: the run, checkpoint or Hugging Face directory of the policy "
                              "(e.g. an SFT run) to start from (--init-from)")
        if self.resume and self.out_dir is None:
            raise ConfigError("resume = true needs out_dir: the run directory to continue (--out-dir)")
        if self.partial_rollout_tokens >= self.max_response_tokens:
            raise ConfigError(f"partial_rollout_tokens = {self.partial_rollout_tokens} must be below "
                              f"max_response_tokens = {self.max_response_tokens} (0 turns partial rollouts off)")
        for name in ("task_args", "objective_args", "optimizer_args"):
            bad = [k for k in getattr(self, name) if not isinstance(k, str) or not k.isidentifier()]
            if bad:
                raise ConfigError(f"{name} key {bad[0]!r} is not a keyword-argument name")

    def temperature_at(self, iteration: int) -> float:
        """The sampling temperature of iteration `iteration` (0-based): linear from temperature to final_temperature."""
        if self.final_temperature is None or self.iterations == 1:
            return self.temperature
        return self.temperature + (self.final_temperature - self.temperature) * iteration / (self.iterations - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# (fields, test, what is valid); each test fails for a NaN.
_RANGES = [
    (("train_problems", "eval_problems", "iterations", "prompts_per_iteration", "samples_per_prompt",
      "max_response_tokens", "sample_batch_size", "steps_per_iteration", "micro_batch_groups", "ptx_batch",
      "ptx_seq_len", "eval_every", "dist_timeout_s", "loop_repeats", "min_trials", "max_turns"), lambda v: v > 0, "> 0"),
    (("partial_rollout_tokens", "length_penalty", "length_penalty_after", "truncation_penalty", "repetition_penalty",
      "loop_period", "lr", "weight_decay", "grad_clip", "ptx_weight", "checkpoint_every", "keep_checkpoints"),
     lambda v: v >= 0, ">= 0"),
    (("temperature", "final_temperature"), lambda v: v > 0, "> 0 (RL samples; greedy decoding is for evaluation)"),
    (("top_p", "promote_at"), lambda v: 0 < v <= 1, "in (0, 1]"),
]

HELP = ("python -m posttrain.rl", "RL on verifiable rewards from a fine-tuned policy: sample k responses per "
        "prompt with the model's own sampler, score them with the task's verifier, train with Kimi k1.5's objective "
        "(or grpo). Needs --init-from SOURCE.")


def build_parser() -> argparse.ArgumentParser:
    return flat_parser(RLConfig, HELP)


def parse(argv: list[str] | None = None, defaults: dict | None = None) -> RLConfig:
    """Defaults <- --config file <- flags; with --resume, the run's saved config.yaml is the base."""
    return parse_flat(RLConfig, build_parser(), argv, defaults)
