"""Sudoku for TRM: puzzles with one solution, a hardness rating, the paper's augmentations, a verifier.

A board is a flat row-major sequence of N*N ints, 0 blank and 1..N digits, for N = 4 (2x2 boxes),
6 (boxes of 2 rows by 3 columns) and 9 (3x3). Cells, rows, columns, bands and stacks are numbered
from 0. The TRM paper trains on Sudoku-Extreme (arXiv 2510.04871 §5), which cannot be downloaded
here; `make_split` stands in for it: a pool of minimal puzzles, of which it keeps the hardest.
"""

from __future__ import annotations

import numbers
import random
import statistics
from dataclasses import dataclass
from functools import lru_cache

import torch

BOXES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}  # N -> (box rows, box columns)
POPCOUNT = tuple(bin(m).count("1") for m in range(1 << 9))


@dataclass(frozen=True)
class BoardSpec:
    """An N x N board's box shape: `box_rows` rows by `box_cols` columns, so N // box_rows bands
    (horizontal groups of boxes) and N // box_cols stacks (vertical groups)."""

    n: int

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n not in BOXES:
            raise ValueError(f"Sudoku size n = {self.n!r}; valid: 4 (2x2 boxes), 6 (2x3 boxes), 9 (3x3 boxes)")

    @property
    def box_rows(self) -> int:
        return BOXES[self.n][0]

    @property
    def box_cols(self) -> int:
        return BOXES[self.n][1]

    @property
    def cells(self) -> int:
        return self.n * self.n


@lru_cache(maxsize=None)
def _units(n: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Per cell: its row, its column and its box (boxes numbered row-major)."""
    h, w = BOXES[n]
    rows = tuple(i // n for i in range(n * n))
    cols = tuple(i % n for i in range(n * n))
    boxes = tuple((r // h) * (n // w) + c // w for r, c in zip(rows, cols))
    return rows, cols, boxes


@lru_cache(maxsize=None)
def _peers(n: int) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """(per cell: the other cells sharing its row, column or box; per unit: its cells), units being
    the rows, then the columns, then the boxes."""
    units = [tuple(i for i in range(n * n) if unit_of[i] == u) for unit_of in _units(n) for u in range(n)]
    peers = tuple(tuple(sorted({j for unit in units if i in unit for j in unit} - {i})) for i in range(n * n))
    return peers, tuple(units)


# ---- reading boards -------------------------------------------------------------------------------

def _problem(board, n: int | None = None, blanks: bool = True) -> str | None:
    """What is wrong with `board` as a board (of size n, if given), or None. Never raises."""
    try:
        cells = board.tolist() if hasattr(board, "tolist") else board  # numpy / torch
        if not isinstance(cells, (list, tuple)):
            return f"is a {type(board).__name__}, not a flat list of ints"
        sizes = {s * s: s for s in BOXES} if n is None else {n * n: n}
        if len(cells) not in sizes:
            valid = ", ".join(f"{s * s} ({s}x{s})" for s in sizes.values())
            return f"length {len(cells)}; valid: {valid}"
        n = sizes[len(cells)]
        low = 0 if blanks else 1
        for i, v in enumerate(cells):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                return f"cell {i} = {v!r} is a {type(v).__name__}, not an int"
            if not low <= v <= n:
                return f"value {v} at cell {i} is out of range {low}..{n}" + ("" if blanks else " (no blanks)")
        return None
    except Exception as e:  # a sequence whose len() or items misbehave
        return f"unreadable ({type(e).__name__}: {e})"


def _cells(board, name: str = "board", n: int | None = None, blanks: bool = True) -> list[int]:
    """The board as a list of ints, or a ValueError naming what is wrong; for inputs at the edge."""
    if problem := _problem(board, n, blanks):
        raise ValueError(f"{name}: {problem}")
    cells = board.tolist() if hasattr(board, "tolist") else board
    return [int(v) for v in cells]


def size_of(board) -> int:
    """N of a board, from its length (16, 36 or 81 cells)."""
    return int(len(_cells(board)) ** 0.5 + 0.5)


# ---- search -----------------------------------------------------------------------------------------

def _search(cells: list[int], n: int, limit: int, rng: random.Random | None = None,
            hidden: bool = True) -> tuple[list[list[int]], int]:
    """Depth-first search: (up to `limit` solutions, guesses made).

    Each node propagates naked singles (a blank with one candidate left is filled) and, with
    `hidden`, hidden singles (a digit with one place left in a row, column or box), until neither
    is left; then it branches on the blank with fewest candidates (lowest index on ties), trying
    its candidates in increasing order (random order with `rng`). A guess is one candidate tried
    at a branch: a blank with k candidates whose subtrees are all explored adds k.
    """
    row_of, col_of, box_of = _units(n)
    peers, units = _peers(n)
    full = (1 << n) - 1
    rows, cols, boxes = [0] * n, [0] * n, [0] * n  # bitmask of the digits each unit holds
    grid = [0] * (n * n)
    solutions: list[list[int]] = []
    guesses = 0

    def place(i: int, bit: int) -> None:
        grid[i] = bit.bit_length()
        rows[row_of[i]] |= bit
        cols[col_of[i]] |= bit
        boxes[box_of[i]] |= bit

    def clear(i: int) -> None:
        bit = 1 << (grid[i] - 1)
        rows[row_of[i]] ^= bit
        cols[col_of[i]] ^= bit
        boxes[box_of[i]] ^= bit
        grid[i] = 0

    def propagate(queue: list[int], placed: list[int]) -> bool:
        """Fill singles, starting from the cells in `queue`; False on a contradiction."""
        while True:
            while queue:  # a filled cell queues its peers, so when the queue runs dry no naked single is left
                i = queue.pop()
                if grid[i]:
                    continue
                m = full & ~(rows[row_of[i]] | cols[col_of[i]] | boxes[box_of[i]])
                if not m:
                    return False
                if m & (m - 1) == 0:
                    place(i, m)
                    placed.append(i)
                    queue.extend(peers[i])
            if not hidden:
                return True
            # Hidden singles, all found from one snapshot of the candidates, then placed; two that
            # disagree (one cell, two digits; one digit, two cells of a unit) are a contradiction.
            cand = [0 if v else full & ~(rows[row_of[i]] | cols[col_of[i]] | boxes[box_of[i]])
                    for i, v in enumerate(grid)]
            used, found = rows + cols + boxes, []
            for u, unit in enumerate(units):
                once = twice = 0
                for i in unit:
                    twice |= once & cand[i]
                    once |= cand[i]
                if once | used[u] != full:
                    return False  # a digit has no place left in this unit
                single = once & ~twice
                while single:
                    bit = single & -single
                    single ^= bit
                    found.append((next(i for i in unit if cand[i] & bit), bit))
            for i, bit in found:
                if grid[i] == bit.bit_length():
                    continue
                if grid[i] or (rows[row_of[i]] | cols[col_of[i]] | boxes[box_of[i]]) & bit:
                    return False
                place(i, bit)
                placed.append(i)
                queue.extend(peers[i])
            if not queue:
                return True

    def descend(blank: list[int], queue: list[int]) -> None:
        """blank: the cells blank on entry, ascending; queue: those that may have become singles."""
        nonlocal guesses
        placed: list[int] = []
        if propagate(queue, placed):
            rest, best, best_mask, best_count = [], -1, 0, n + 1
            for i in blank:
                if not grid[i]:
                    rest.append(i)
                    m = full & ~(rows[row_of[i]] | cols[col_of[i]] | boxes[box_of[i]])
                    if POPCOUNT[m] < best_count:
                        best, best_mask, best_count = i, m, POPCOUNT[m]
            if not rest:
                solutions.append(grid.copy())
            else:
                others = [j for j in rest if j != best]
                bits = [1 << d for d in range(n) if best_mask >> d & 1]
                if rng is not None:
                    rng.shuffle(bits)
                for bit in bits:
                    guesses += 1
                    place(best, bit)
                    descend(others, list(peers[best]))
                    clear(best)
                    if len(solutions) >= limit:
                        break
        for i in placed:
            clear(i)

    for i, v in enumerate(cells):
        if v:
            if (rows[row_of[i]] | cols[col_of[i]] | boxes[box_of[i]]) >> (v - 1) & 1:
                return [], 0  # two clues clash
            place(i, 1 << (v - 1))
    blank = [i for i, v in enumerate(grid) if not v]
    descend(blank, blank[::-1])
    return solutions, guesses


def count_solutions(puzzle, limit: int = 2) -> int:
    """Solutions of `puzzle`, counting stops at `limit` (2 is enough to tell unique from not)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit = {limit!r}; must be an int >= 1")
    cells = _cells(puzzle, "puzzle")
    return len(_search(cells, size_of(cells), limit)[0])


def _unique(cells: list[int], n: int, hidden: bool) -> tuple[list[int], int]:
    solutions, guesses = _search(cells, n, limit=2, hidden=hidden)
    if len(solutions) != 1:
        raise ValueError(f"puzzle has {'no' if not solutions else 'more than one'} solution; "
                         "solve and rate need exactly one")
    return solutions[0], guesses


def solve(puzzle) -> list[int]:
    """The solution of a puzzle that has exactly one (ValueError otherwise)."""
    cells = _cells(puzzle, "puzzle")
    return _unique(cells, size_of(cells), hidden=True)[0]


def rate(puzzle) -> int:
    """Hardness: guesses `_search` makes over its whole tree, i.e. to find the solution and to prove
    it is the only one. 0: naked singles alone solve it. Counting the whole tree rather than the path
    to the first solution makes the rating independent of the order candidates are tried in, so it
    is unchanged by digit relabelling (it can change under other augmentations, which reorder ties)."""
    cells = _cells(puzzle, "puzzle")
    return _unique(cells, size_of(cells), hidden=False)[1]


# ---- generation -------------------------------------------------------------------------------------

def generate(seed: int, size: int, index: int = 0, clues: int | None = None) -> tuple[list[int], list[int]]:
    """(puzzle, solution): puzzle number `index` of the stream `seed`, with exactly one solution.

    The solution is a random full grid (a search over the empty board with random candidate
    order: varied, not uniform over all grids). Clues are then removed in a random order, each
    only if the solution stays unique. With `clues` = None one pass makes the puzzle minimal (no
    clue can be removed): a clue that could not go stays necessary, since removing others only
    adds solutions. With `clues` = k removal stops at k clues (or at a minimal puzzle above k).
    """
    spec = BoardSpec(size)
    if clues is not None and not 0 <= clues <= spec.cells:
        raise ValueError(f"clues = {clues!r}; valid: None (minimal) or 0..{spec.cells}")
    rng = random.Random(f"trm.sudoku:{size}:{seed}:{index}")
    solution = _search([0] * spec.cells, size, limit=1, rng=rng)[0][0]
    puzzle = solution.copy()
    order = list(range(spec.cells))
    rng.shuffle(order)
    kept, peers = spec.cells, _peers(size)[0]
    for i in order:
        if clues is not None and kept <= clues:
            break
        # The puzzle with clue i has one solution, so without it any other solution differs at i.
        others = set(range(1, size + 1)) - {puzzle[j] for j in peers[i]} - {solution[i]}
        if any(_search(puzzle[:i] + [w] + puzzle[i + 1:], size, limit=1)[0] for w in others):
            continue
        puzzle[i] = 0
        kept -= 1
    return puzzle, solution


@dataclass
class Split:
    puzzles: list[list[int]]
    solutions: list[list[int]]
    ratings: list[int]  # rate() of each puzzle
    stats: dict  # what the README states about the set's hardness


def make_split(n_puzzles: int, seed: int, size: int, hardest: bool = True, pool_factor: int = 5) -> Split:
    """`n_puzzles` distinct minimal puzzles. hardest: the highest rated of a pool `pool_factor` times
    larger (ties to the earlier drawn), in their drawing order; otherwise the first n drawn.

    A stand-in for Sudoku-Extreme. Splits are independent streams per seed, so a train and a test
    split from different seeds share puzzles only by chance (likely for 4x4, which has few).
    """
    BoardSpec(size)
    if isinstance(n_puzzles, bool) or not isinstance(n_puzzles, int) or n_puzzles < 1:
        raise ValueError(f"n_puzzles = {n_puzzles!r}; must be an int >= 1")
    if isinstance(pool_factor, bool) or not isinstance(pool_factor, int) or pool_factor < 1:
        raise ValueError(f"pool_factor = {pool_factor!r}; must be an int >= 1")
    pool_size = n_puzzles * pool_factor if hardest else n_puzzles
    pool, seen, index = [], set(), 0
    while len(pool) < pool_size:
        if index >= 4 * pool_size + 100:
            raise ValueError(f"make_split(size={size}): found only {len(pool)} distinct puzzles in {index} draws, "
                             f"{pool_size} needed; ask for fewer (n_puzzles = {n_puzzles}, pool_factor = {pool_factor})")
        puzzle, solution = generate(seed, size, index)
        index += 1
        if tuple(puzzle) not in seen:
            seen.add(tuple(puzzle))
            pool.append((puzzle, solution, _search(puzzle, size, limit=2, hidden=False)[1]))
    keep = sorted(range(pool_size), key=lambda j: (-pool[j][2], j))[:n_puzzles] if hardest else range(pool_size)
    chosen = [pool[j] for j in sorted(keep)]
    ratings = [g for _, _, g in chosen]
    stats = {
        "size": size, "n_puzzles": n_puzzles, "pool": pool_size, "draws": index,
        "guesses_min": min(ratings), "guesses_median": statistics.median(ratings), "guesses_max": max(ratings),
        "pool_guesses_median": statistics.median(g for _, _, g in pool),
        "clues_mean": statistics.fmean(sum(v > 0 for v in p) for p, _, _ in chosen),
    }
    return Split([p for p, _, _ in chosen], [s for _, s, _ in chosen], ratings, stats)


# ---- augmentations (TRM's for Sudoku, after HRM's data builder) ---------------------------------------

@dataclass(frozen=True)
class Transform:
    """new[i] = digits[old[cells[i]]]: a permutation of cells (a gather) and a relabelling of digits
    (digits[0] = 0, so blanks stay blank). Each piece below maps valid solutions to valid solutions."""

    n: int
    cells: tuple[int, ...]
    digits: tuple[int, ...]


def apply(t: Transform, board) -> list[int]:
    b = _cells(board, n=t.n)
    return [t.digits[b[j]] for j in t.cells]


def invert(t: Transform) -> Transform:
    cells, digits = [0] * len(t.cells), [0] * len(t.digits)
    for i, j in enumerate(t.cells):
        cells[j] = i
    for d, e in enumerate(t.digits):
        digits[e] = d
    return Transform(t.n, tuple(cells), tuple(digits))


def compose(first: Transform, then: Transform) -> Transform:
    """The transform that applies `first`, then `then`."""
    return Transform(first.n, tuple(first.cells[j] for j in then.cells), tuple(then.digits[d] for d in first.digits))


def _permutation(order, k: int, name: str, base: int = 0) -> list[int]:
    if sorted(order) != list(range(base, base + k)):
        raise ValueError(f"{name} = {list(order)!r}; must be a permutation of {base}..{base + k - 1}")
    return list(order)


def _lines(spec: BoardSpec, row_of: list[int], col_of: list[int]) -> Transform:
    """new row r, column c = old row row_of[r], column col_of[c]."""
    n = spec.n
    return Transform(n, tuple(row_of[i // n] * n + col_of[i % n] for i in range(spec.cells)), tuple(range(n + 1)))


def identity(spec: BoardSpec) -> Transform:
    return _lines(spec, list(range(spec.n)), list(range(spec.n)))


def relabel(spec: BoardSpec, perm) -> Transform:
    """Digit d becomes perm[d - 1]; perm is a permutation of 1..N."""
    perm = _permutation(perm, spec.n, "relabel perm", base=1)
    return Transform(spec.n, identity(spec).cells, (0, *perm))


def transpose(spec: BoardSpec) -> Transform:
    """Rows become columns. Square boxes only: a 6x6 board's 2x3 boxes would become 3x2, a board
    of another shape than every other 6x6 one, so 6x6 augmentation never transposes."""
    if spec.box_rows != spec.box_cols:
        raise ValueError(f"transpose: n = {spec.n} has {spec.box_rows}x{spec.box_cols} boxes, which transposing "
                         f"turns into {spec.box_cols}x{spec.box_rows}; only 4 and 9 (square boxes) transpose")
    n = spec.n
    return Transform(n, tuple((i % n) * n + i // n for i in range(spec.cells)), tuple(range(n + 1)))


def permute_bands(spec: BoardSpec, order) -> Transform:
    """New band k is old band order[k] (a band: box_rows consecutive rows)."""
    h = spec.box_rows
    order = _permutation(order, spec.n // h, "band order")
    return _lines(spec, [order[r // h] * h + r % h for r in range(spec.n)], list(range(spec.n)))


def permute_stacks(spec: BoardSpec, order) -> Transform:
    """New stack k is old stack order[k] (a stack: box_cols consecutive columns)."""
    w = spec.box_cols
    order = _permutation(order, spec.n // w, "stack order")
    return _lines(spec, list(range(spec.n)), [order[c // w] * w + c % w for c in range(spec.n)])


def permute_rows(spec: BoardSpec, orders) -> Transform:
    """Within band k, new row j is old row orders[k][j]; one permutation of 0..box_rows-1 per band."""
    h, bands = spec.box_rows, spec.n // spec.box_rows
    if len(orders) != bands:
        raise ValueError(f"permute_rows: {len(orders)} orders for {bands} bands")
    orders = [_permutation(o, h, f"row order of band {k}") for k, o in enumerate(orders)]
    return _lines(spec, [(r // h) * h + orders[r // h][r % h] for r in range(spec.n)], list(range(spec.n)))


def permute_cols(spec: BoardSpec, orders) -> Transform:
    """Within stack k, new column j is old column orders[k][j]; one permutation of 0..box_cols-1 per stack."""
    w, stacks = spec.box_cols, spec.n // spec.box_cols
    if len(orders) != stacks:
        raise ValueError(f"permute_cols: {len(orders)} orders for {stacks} stacks")
    orders = [_permutation(o, w, f"column order of stack {k}") for k, o in enumerate(orders)]
    return _lines(spec, list(range(spec.n)), [(c // w) * w + orders[c // w][c % w] for c in range(spec.n)])


def random_transform(spec: BoardSpec, rng: random.Random) -> Transform:
    """A random digit relabelling, transposition (half the time, square boxes only), band, stack,
    row-in-band and column-in-stack permutation, composed."""
    def shuffled(k: int, base: int = 0) -> list[int]:
        order = list(range(base, base + k))
        rng.shuffle(order)
        return order

    h, w, n = spec.box_rows, spec.box_cols, spec.n
    t = relabel(spec, shuffled(n, base=1))
    if h == w and rng.random() < 0.5:
        t = compose(t, transpose(spec))
    for piece in (permute_bands(spec, shuffled(n // h)), permute_stacks(spec, shuffled(n // w)),
                  permute_rows(spec, [shuffled(h) for _ in range(n // h)]),
                  permute_cols(spec, [shuffled(w) for _ in range(n // w)])):
        t = compose(t, piece)
    return t


def augment(puzzle, solution, rng: random.Random) -> tuple[list[int], list[int], Transform]:
    """(puzzle', solution', t): one random transform applied to both; apply(invert(t), .) undoes it."""
    p = _cells(puzzle, "puzzle")
    t = random_transform(BoardSpec(size_of(p)), rng)
    return apply(t, p), apply(t, _cells(solution, "solution", n=t.n)), t


# ---- verifier and encoding ----------------------------------------------------------------------------

def is_valid_solution(puzzle, candidate) -> tuple[bool, str]:
    """(True, "ok") if `candidate` fills `puzzle`: same length, every clue kept, every row, column
    and box a permutation of 1..N. Otherwise (False, reason); the reason starts with "puzzle:",
    "candidate:", "clue", "row", "column" or "box", checked in that order. Never raises."""
    if problem := _problem(puzzle):
        return False, f"puzzle: {problem}"
    p = _cells(puzzle)
    n = size_of(p)
    if problem := _problem(candidate, n, blanks=False):
        return False, f"candidate: {problem}"
    c = _cells(candidate)
    for i, (clue, v) in enumerate(zip(p, c)):
        if clue and v != clue:
            return False, f"clue at cell {i} (row {i // n}, column {i % n}) is {clue}, candidate has {v}"
    for kind, unit_of in zip(("row", "column", "box"), _units(n)):
        seen = [0] * n
        for i, u in enumerate(unit_of):
            if seen[u] >> c[i] & 1:
                return False, f"{kind} {u} repeats digit {c[i]}"
            seen[u] |= 1 << c[i]
    return True, "ok"


def vocab_size(n: int) -> int:
    """Tokens: 0 blank, 1..N digits. Boards have a fixed N*N cells, so nothing needs a pad."""
    return BoardSpec(n).n + 1


def to_tokens(board) -> list[int]:
    """The model's tokens for a board: the board's own values (0 blank, 1..N digits)."""
    return _cells(board)


def encode_split(puzzles, solutions) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [P, N*N], targets [P, N*N]) int64; every pair is checked with is_valid_solution."""
    if len(puzzles) != len(solutions) or not puzzles:
        raise ValueError(f"encode_split: {len(puzzles)} puzzles and {len(solutions)} solutions; "
                         "need the same number, at least one")
    n = size_of(puzzles[0])
    for k, (p, s) in enumerate(zip(puzzles, solutions)):
        if _problem(p, n):
            raise ValueError(f"puzzles[{k}]: not a {n}x{n} board like puzzles[0] ({_problem(p, n)})")
        ok, reason = is_valid_solution(p, s)
        if not ok:
            raise ValueError(f"solutions[{k}] does not solve puzzles[{k}]: {reason}")
    inputs = torch.tensor([to_tokens(p) for p in puzzles], dtype=torch.int64)
    targets = torch.tensor([to_tokens(s) for s in solutions], dtype=torch.int64)
    return inputs, targets
