"""Verifiable tasks for RL, by name: each gives a training pool, a held-out set and an exact verifier.

    task = build_task("arithmetic", {"digits": [1, 2, 3]}, n_train=2000, n_eval=200, seed=0)
    task.train[i]   # {"id", "prompt" (the user's message), "answer", "difficulty", ...}
    task.verify(problem, text) -> (reward in [0, 1], reason)   # never raises: malformed output scores 0

A multi-turn task (`tools`: the live tool loop, posttrain/rl/tasks/tool_loop.py) has an `environment`
class: its problems carry "messages" (and "tools") to render the prompt from, each sample plays an
episode, and verify(problem, episode) scores the episode instead of a text.

The held-out set does not move with the run's seed, so runs with different seeds, objectives or
optimizers are scored on the same problems; its problems never appear in the pool (their text
hashes to the other split). To add a task: a module with make_problems(n, seed, split=..., **args)
and verify(problem, text), and one line in TASKS; a multi-turn task adds ENVIRONMENT, a class
taking (tokenizer, max_turns) with start(problem) -> episode and respond(sample, turn) (rollout.py).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from moe.config import ConfigError
from posttrain.rl.tasks import arithmetic, digits, gym, tool_loop

TASKS = {"arithmetic": arithmetic, "reverse": digits, "tools": tool_loop, "reasoning_gym": gym}
HELDOUT_SEED = 7


@dataclass
class Task:
    name: str
    train: list[dict]
    heldout: list[dict]
    verify: Callable[[dict, object], tuple[float, str]]
    environment: type | None = None  # multi-turn tasks: built with (tokenizer, max_turns)


def build_task(name: str, args: dict, n_train: int, n_eval: int, seed: int) -> Task:
    if name not in TASKS:
        raise ConfigError(f"task = {name!r}; valid: {', '.join(TASKS)}")
    module = TASKS[name]
    valid = [p for p in inspect.signature(module.make_problems).parameters if p not in ("n", "seed", "split")]
    if unknown := sorted(set(args) - set(valid)):
        raise ConfigError(f"task_args.{unknown[0]}: task {name!r} takes {', '.join(valid)}")
    try:
        train = module.make_problems(n_train, seed, split="train", **args)
        heldout = module.make_problems(n_eval, HELDOUT_SEED, split="heldout", **args)
    except ValueError as err:
        raise ConfigError(f"task_args: {err}") from None
    return Task(name, train, heldout, module.verify, getattr(module, "ENVIRONMENT", None))
