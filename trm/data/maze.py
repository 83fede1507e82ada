"""Mazes for TRM in the style of Maze-Hard: seeded generation, the hardness rule, tokens, a verifier.

Maze-Hard (HRM, arXiv 2506.21734; used by TRM, arXiv 2510.04871 §5) is 1000 train and 1000 test
30x30 mazes whose shortest start-goal path is longer than 110. It cannot be downloaded here, so
`generate_mazes` stands in for it. A maze is carved, not walls sprinkled at random: random walls at
30-50% density (the generator HRM cites) almost never give a path longer than 110 on 30x30 (none in
2000 draws we tried), while a carved maze does about a third of the time.

How a maze is made (all from one `numpy.random.Generator` seeded by `seed`):
  1. Rooms are the cells whose row and column have the parity of a random offset (0 or 1 each), so a
     30x30 maze has 15x15 rooms and one all-wall border row and column, on a side that varies.
  2. A randomised depth-first search (recursive backtracker) joins every room by opening the wall
     cell between two rooms: a spanning tree with long corridors, hence long paths.
  3. `loop_fraction` of the walls still standing between two rooms are opened, so some mazes hold
     several shortest paths and the task needs the shortest, not the only, path.
  4. Start and goal are two distinct open cells drawn uniformly. The maze is kept only if its
     shortest path is longer than `min_path_length` and it differs from every maze kept before
     (and from `exclude`, so a test set can be disjoint from its training set).

Path length is counted in moves (the BFS distance): a path of length d marks d - 1 cells, the ones
strictly between start and goal. The default threshold is Maze-Hard's 110 scaled by area,
round(110 * H * W / 900): 8x8 -> 8, 12x12 -> 18. Scaling by area keeps the share of mazes kept about
the same across sizes (measured with loop_fraction = 0: 35% at 30x30, 42% at 12x12, 52% at 8x8).

Tokens are HRM's ("# SGo" -> 1..5 after a pad 0), so Maze-Hard files and models read ours:
0 pad (unused, a maze fills its H*W grid), 1 wall, 2 open, 3 start, 4 goal, 5 path.
Input: the maze. Target: the maze with the cells of one shortest path marked 5. When several shortest
paths exist the target is the one found walking back from the goal, stepping each time to the first
neighbour, in the order up, down, left, right, whose distance from the start is one less.
`check_path` accepts any shortest path, since the task is "a shortest path".

Augmentation (`augment`): the paper trains Maze-Hard under the 8 symmetries of the square
(trm/data/dihedral.py), applied to the input and target grids alike, so start, goal and path move
with the board. A symmetry maps neighbours to neighbours and walls to walls, so distances are kept
and the marked path stays a shortest path. It need not be the one `target` would mark in the new
frame (the tie-break order turns with the board): another reason the verifier takes any shortest path.
An oblong board (H != W) keeps its shape only under the 4 symmetries without a quarter turn.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from trm.data.dihedral import DIHEDRAL, SHAPE_KEEPING

PAD, WALL, OPEN, START, GOAL, PATH = range(6)
VOCAB_SIZE = 6
TOKEN_NAMES = {WALL: "wall", OPEN: "open", START: "start", GOAL: "goal", PATH: "path"}
MAZE_HARD_SIDE, MAZE_HARD_MIN_PATH = 30, 110
MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))  # up, down, left, right: also the target's tie-break order


@dataclass(frozen=True)
class Maze:
    """walls [H, W] bool (True: wall); start and goal are (row, column) of open cells."""

    walls: np.ndarray
    start: tuple[int, int]
    goal: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return self.walls.shape

    def key(self) -> tuple:
        """What makes two mazes the same maze (for de-duplication)."""
        return self.walls.shape, self.walls.tobytes(), self.start, self.goal


def default_min_path_length(height: int, width: int) -> int:
    """Maze-Hard's 110 on 30x30, scaled by area (see the module docstring)."""
    return round(MAZE_HARD_MIN_PATH * height * width / MAZE_HARD_SIDE**2)


def distances(walls: np.ndarray, source: tuple[int, int]) -> np.ndarray:
    """[H, W] int64: moves from `source` to each cell through open cells (BFS); -1 where unreachable."""
    h, w = walls.shape
    dist = np.full((h, w), -1, dtype=np.int64)
    dist[source] = 0
    queue = deque([source])
    while queue:
        r, c = queue.popleft()
        for dr, dc in MOVES:
            rr, cc = r + dr, c + dc
            if 0 <= rr < h and 0 <= cc < w and not walls[rr, cc] and dist[rr, cc] < 0:
                dist[rr, cc] = dist[r, c] + 1
                queue.append((rr, cc))
    return dist


def shortest_path(maze: Maze) -> list[tuple[int, int]]:
    """Cells from start to goal inclusive, the tie-break of the module docstring; ValueError if none."""
    dist = distances(maze.walls, maze.start)
    if dist[maze.goal] < 0:
        raise ValueError(f"maze: goal {maze.goal} cannot be reached from start {maze.start}")
    h, w = maze.shape
    path = [maze.goal]
    while path[-1] != maze.start:
        r, c = path[-1]
        path.append(next((r + dr, c + dc) for dr, dc in MOVES
                         if 0 <= r + dr < h and 0 <= c + dc < w and dist[r + dr, c + dc] == dist[r, c] - 1))
    return path[::-1]


def _carve(height: int, width: int, loop_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """walls [H, W] bool of a carved maze: steps 1-3 of the module docstring."""
    r0, c0 = int(rng.integers(2)), int(rng.integers(2))
    rows, cols = len(range(r0, height, 2)), len(range(c0, width, 2))  # rooms: (r0 + 2i, c0 + 2j)
    walls = np.ones((height, width), dtype=bool)
    seen = np.zeros((rows, cols), dtype=bool)
    first = (int(rng.integers(rows)), int(rng.integers(cols)))
    seen[first] = True
    walls[r0 + 2 * first[0], c0 + 2 * first[1]] = False
    stack = [first]
    while stack:
        i, j = stack[-1]
        fresh = [(i + di, j + dj) for di, dj in MOVES
                 if 0 <= i + di < rows and 0 <= j + dj < cols and not seen[i + di, j + dj]]
        if not fresh:
            stack.pop()
            continue
        ni, nj = fresh[int(rng.integers(len(fresh)))]
        seen[ni, nj] = True
        walls[r0 + 2 * ni, c0 + 2 * nj] = False
        walls[r0 + i + ni, c0 + j + nj] = False  # the cell between the two rooms
        stack.append((ni, nj))
    # Walls still standing between two rooms, left-right or up-down.
    between = [(r0 + 2 * i, c0 + 2 * j + 1) for i in range(rows) for j in range(cols - 1)]
    between += [(r0 + 2 * i + 1, c0 + 2 * j) for i in range(rows - 1) for j in range(cols)]
    standing = [cell for cell in between if walls[cell]]
    for k in rng.permutation(len(standing))[: round(loop_fraction * len(standing))]:
        walls[standing[k]] = False
    return walls


def generate_mazes(count: int, seed: int, height: int = 30, width: int = 30, min_path_length: int | None = None,
                   loop_fraction: float = 0.02, exclude=()) -> list[Maze]:
    """`count` distinct mazes whose shortest path is longer than `min_path_length` (None: the area-scaled
    default). The same arguments give the same mazes, and the first k of a longer list are those of a
    shorter one. loop_fraction 0.02 keeps about a quarter of 30x30 mazes at the default threshold."""
    # A side of 4 or more holds at least two rooms whatever the parity offset.
    for name, value, low in (("count", count, 1), ("height", height, 4), ("width", width, 4),
                             ("min_path_length", 0 if min_path_length is None else min_path_length, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"generate_mazes: {name} = {value!r}; must be an int >= {low}")
    if not 0.0 <= loop_fraction <= 1.0:
        raise ValueError(f"generate_mazes: loop_fraction = {loop_fraction!r}; must be in [0, 1]")
    threshold = default_min_path_length(height, width) if min_path_length is None else min_path_length
    rng = np.random.default_rng(seed)
    seen = {m.key() for m in exclude}
    mazes, longest, attempts = [], -1, 0
    max_attempts = 200 + 100 * count
    while len(mazes) < count:
        if attempts >= max_attempts:
            raise ValueError(f"generate_mazes: {len(mazes)} of {count} mazes in {attempts} attempts; the longest "
                             f"shortest path seen was {longest} moves, min_path_length = {threshold} for "
                             f"{height}x{width}. Ask for a lower min_path_length, a lower loop_fraction or fewer mazes")
        attempts += 1
        walls = _carve(height, width, loop_fraction, rng)
        cells = np.argwhere(~walls)
        a, b = rng.choice(len(cells), size=2, replace=False)
        start, goal = (int(cells[a][0]), int(cells[a][1])), (int(cells[b][0]), int(cells[b][1]))
        d = int(distances(walls, start)[goal])  # a carved maze is connected, so d >= 1
        longest = max(longest, d)
        maze = Maze(walls, start, goal)
        if d > threshold and maze.key() not in seen:
            seen.add(maze.key())
            mazes.append(maze)
    return mazes


# ---- tokens -----------------------------------------------------------------------------------------

def encode(maze: Maze) -> np.ndarray:
    """[H*W] int64 input tokens, row-major."""
    grid = np.where(maze.walls, WALL, OPEN).astype(np.int64)
    grid[maze.start], grid[maze.goal] = START, GOAL
    return grid.reshape(-1)


def target(maze: Maze) -> np.ndarray:
    """[H*W] int64: the input with the shortest path's cells between start and goal marked PATH."""
    grid = encode(maze).reshape(maze.shape)
    for cell in shortest_path(maze)[1:-1]:
        grid[cell] = PATH
    return grid.reshape(-1)


def decode(tokens, height: int, width: int) -> Maze:
    """The Maze of an input (or target: PATH reads as open) row of H*W tokens; ValueError if malformed."""
    grid = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens)
    if grid.size != height * width:
        raise ValueError(f"decode: {grid.size} tokens; a {height}x{width} maze has {height * width}")
    grid = grid.reshape(height, width)
    bad = ~np.isin(grid, list(TOKEN_NAMES))
    if bad.any():
        r, c = map(int, np.argwhere(bad)[0])
        raise ValueError(f"decode: token {int(grid[r, c])} at row {r}, column {c}; valid: {TOKEN_NAMES}")
    ends = {}
    for token in (START, GOAL):
        where = [tuple(map(int, rc)) for rc in np.argwhere(grid == token)]
        if len(where) != 1:
            raise ValueError(f"decode: {len(where)} {TOKEN_NAMES[token]} cells; a maze has exactly one")
        ends[token] = where[0]
    return Maze(grid == WALL, ends[START], ends[GOAL])


def encode_split(mazes) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [P, H*W], targets [P, H*W]) int64; every target is checked with check_path."""
    if not mazes:
        raise ValueError("encode_split: no mazes; need at least one")
    shape = mazes[0].shape
    inputs, targets = [], []
    for k, maze in enumerate(mazes):
        if maze.shape != shape:
            raise ValueError(f"encode_split: mazes[{k}] is {maze.shape}, mazes[0] is {shape}; one size per split")
        inputs.append(encode(maze))
        targets.append(target(maze))
        ok, reason = check_path(maze, targets[-1])
        if not ok:
            raise ValueError(f"encode_split: target of mazes[{k}] fails check_path: {reason}")
    return torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(targets))


# ---- augmentation -----------------------------------------------------------------------------------

def symmetries(height: int, width: int) -> tuple[int, ...]:
    """The DIHEDRAL indices that map an H x W maze to one of the same shape (the token length is fixed)."""
    return tuple(range(len(DIHEDRAL))) if height == width else SHAPE_KEEPING


def _check_symmetry(k, height: int, width: int) -> None:
    if isinstance(k, bool) or k not in symmetries(height, width):
        raise ValueError(f"symmetry k = {k!r}; a {height}x{width} maze keeps its shape under "
                         f"{', '.join(map(str, symmetries(height, width)))} (trm/data/dihedral.py)")


def transform_tokens(tokens, height: int, width: int, k: int) -> np.ndarray:
    """[H*W] int64: an input or target row of H*W tokens under DIHEDRAL[k]; the same call with
    DIHEDRAL_INVERSE[k] (trm/data/dihedral.py) undoes it."""
    _check_symmetry(k, height, width)
    grid = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens, dtype=np.int64)
    if grid.size != height * width:
        raise ValueError(f"transform_tokens: {grid.size} tokens; a {height}x{width} maze has {height * width}")
    return np.ascontiguousarray(DIHEDRAL[k](grid.reshape(height, width))).reshape(-1)


def transform(maze: Maze, k: int) -> Maze:
    """The maze under DIHEDRAL[k]: walls, start and goal moved together."""
    h, w = maze.shape
    _check_symmetry(k, h, w)
    # Where each cell lands: cell (r, c) of the moved grid holds the row-major index of the cell it came from.
    came_from = DIHEDRAL[k](np.arange(h * w).reshape(h, w))

    def moved(cell: tuple[int, int]) -> tuple[int, int]:
        r, c = np.argwhere(came_from == cell[0] * w + cell[1])[0]
        return int(r), int(c)

    return Maze(np.ascontiguousarray(DIHEDRAL[k](maze.walls)), moved(maze.start), moved(maze.goal))


def augment(inputs, targets, height: int, width: int, rng: random.Random) -> tuple[np.ndarray, np.ndarray, int]:
    """(inputs', targets', k): one symmetry of `symmetries(height, width)`, drawn uniformly, applied to
    both rows; transform_tokens(., height, width, DIHEDRAL_INVERSE[k]) undoes it."""
    choices = symmetries(height, width)
    k = choices[rng.randrange(len(choices))]
    return transform_tokens(inputs, height, width, k), transform_tokens(targets, height, width, k), k


# ---- verifier ---------------------------------------------------------------------------------------

def _read_candidate(candidate, height: int, width: int) -> tuple[np.ndarray | None, str]:
    """(grid [H, W] int64, "") or (None, what is wrong). Never raises."""
    try:
        if isinstance(candidate, torch.Tensor):
            candidate = candidate.detach().cpu().numpy()
        grid = np.asarray(candidate)
    except Exception as e:  # ragged lists, objects numpy cannot read
        return None, f"candidate: unreadable ({type(e).__name__}: {e})"
    if grid.size != height * width or grid.ndim not in (1, 2) or (grid.ndim == 2 and grid.shape != (height, width)):
        return None, f"candidate: shape {grid.shape}; expected ({height * width},) or ({height}, {width})"
    if grid.dtype == bool or not np.issubdtype(grid.dtype, np.integer):
        return None, f"candidate: dtype {grid.dtype}; must hold integer tokens"
    grid = grid.reshape(height, width).astype(np.int64)
    bad = ~np.isin(grid, list(TOKEN_NAMES))
    if bad.any():
        r, c = map(int, np.argwhere(bad)[0])
        return None, f"candidate: token {grid[r, c]} at row {r}, column {c}; valid: {TOKEN_NAMES}"
    return grid, ""


def check_path(maze: Maze, candidate) -> tuple[bool, str]:
    """(True, "ok") if `candidate` (H*W or [H, W] tokens) is `maze` with one shortest start-goal path
    marked: walls, start and goal unchanged, PATH only on open cells, the marked cells joining start
    to goal, as many of them as a shortest path has (d - 1). Otherwise (False, reason); the reason
    starts with "maze:", "candidate:", "path through a wall", "changed", "gap", "stray" or "detour",
    checked in that order. Never raises."""
    try:
        h, w = maze.shape
        dist = distances(maze.walls, maze.start)
        d = int(dist[maze.goal])
        truth = encode(maze).reshape(h, w)
    except Exception as e:  # not a Maze, or start/goal off the grid
        return False, f"maze: unreadable ({type(e).__name__}: {e})"
    if d < 0:
        return False, f"maze: goal {maze.goal} cannot be reached from start {maze.start}"
    grid, problem = _read_candidate(candidate, h, w)
    if grid is None:
        return False, problem
    marked = grid == PATH
    if (marked & maze.walls).any():
        r, c = map(int, np.argwhere(marked & maze.walls)[0])
        return False, f"path through a wall at row {r}, column {c}"
    changed = (grid != truth) & ~(marked & (truth == OPEN))
    if changed.any():
        r, c = map(int, np.argwhere(changed)[0])
        return False, (f"changed: row {r}, column {c} is {TOKEN_NAMES[truth[r, c]]} in the maze, "
                       f"{TOKEN_NAMES[grid[r, c]]} in the candidate")
    # Cells reachable from the start moving only onto marked cells or the goal.
    reached = np.zeros((h, w), dtype=bool)
    reached[maze.start] = True
    queue = deque([maze.start])
    while queue:
        r, c = queue.popleft()
        if (r, c) == maze.goal:
            continue  # the path ends at the goal; do not walk on from it
        for dr, dc in MOVES:
            rr, cc = r + dr, c + dc
            if 0 <= rr < h and 0 <= cc < w and not reached[rr, cc] and (marked[rr, cc] or (rr, cc) == maze.goal):
                reached[rr, cc] = True
                queue.append((rr, cc))
    n_marked = int(marked.sum())
    if not reached[maze.goal]:
        return False, (f"gap: the marked cells do not join start {maze.start} to goal {maze.goal} "
                       f"({int((reached & marked).sum())} of {n_marked} marked cells reached from the start)")
    stray = int((marked & ~reached).sum())
    if stray:
        return False, f"stray: {stray} marked cells are not connected to the start"
    if n_marked != d - 1:
        return False, f"detour: {n_marked} cells marked, a shortest path ({d} moves) marks {d - 1}"
    # d - 1 connected cells that join start to goal: any start-goal walk through them needs d - 1
    # distinct cells, so it uses them all and is a shortest path.
    return True, "ok"
