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
    verify: Callable[[list[int], list[int]], tuple[bool, str]]
    info: dict


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
    scaled by area, trm/data/maze.py); the target marks one shortest path, any shortest path is accepted."""
    for name, value in (("train", train), ("val", val), ("test", test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} = {value!r}; it must be an int >= 1 (mazes in that split)")
    mazes = maze.generate_mazes(train + val + test, seed, size, size, min_path_length)  # distinct by construction
    parts = _cut(train, val, test, seed)
    tensors = [maze.encode_split([mazes[i] for i in idx]) for idx in parts]

    def verify(inputs_L, predicted_L) -> tuple[bool, str]:
        return maze.check_path(maze.decode(inputs_L, size, size), predicted_L)

    threshold = maze.default_min_path_length(size, size) if min_path_length is None else min_path_length
    info = {"task": "maze", "size": size, "seed": seed, "train": train, "val": val, "test": test,
            "min_path_length": threshold}
    # No augmentation yet: the reference trains Maze-Hard with the 8 dihedral transforms (trm/data/arc.py has them).
    return PuzzleData("maze", maze.VOCAB_SIZE, size * size, *tensors, None, verify, info)


TASKS = {"sudoku": sudoku_data, "maze": maze_data}


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
