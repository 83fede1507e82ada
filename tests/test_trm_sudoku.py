"""Sudoku for TRM (trm/data/sudoku.py): unique puzzles, solver, rating, augmentations, verifier, encoding.

References we did not write: two published puzzles with their published solutions, the number
of 4x4 grids (288), and, for 4x4, a brute-force enumeration written here with sets and no bitmasks.
"""

import itertools
import random
import statistics

import numpy as np
import pytest
import torch

from trm.data import sudoku as S


def board(text: str) -> list[int]:
    return [0 if ch == "." else int(ch) for ch in text]


# The example puzzle of Wikipedia's "Sudoku" article (naked singles alone solve it) and Arto Inkala's
# 2012 "world's hardest Sudoku", each with its published solution.
WIKIPEDIA = (board("53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"),
             board("534678912672195348198342567859761423426853791713924856961537284287419635345286179"))
INKALA = (board("8..........36......7..9.2...5...7.......457.....1...3...1....68..85...1..9....4.."),
          board("812753649943682175675491283154237896369845721287169534521974368438526917796318452"))


def dumb_valid(grid, n: int) -> bool:
    """Every row, column and box holds 1..n once: with numpy reshapes and sets, not our verifier."""
    h, w = {4: (2, 2), 6: (2, 3), 9: (3, 3)}[n]
    g = np.asarray(grid).reshape(n, n)
    boxes = g.reshape(n // h, h, n // w, w).transpose(0, 2, 1, 3).reshape(n, n)
    return all(set(line) == set(range(1, n + 1)) for part in (g, g.T, boxes) for line in part.tolist())


def all_4x4_grids() -> list[tuple[int, ...]]:
    """Every 4x4 Sudoku grid: rows chosen among the 24 permutations, pruned by column and box sets."""
    grids = []

    def extend(rows):
        if len(rows) == 4:
            grids.append(tuple(v for row in rows for v in row))
            return
        for row in itertools.permutations(range(1, 5)):
            if any(row[c] == r[c] for r in rows for c in range(4)):
                continue
            band = rows[len(rows) // 2 * 2:]  # the rows above in this row's 2-row band
            if any({row[2 * s], row[2 * s + 1]} & {r[2 * s], r[2 * s + 1]} for r in band for s in range(2)):
                continue
            extend(rows + [row])

    extend([])
    return grids


GRIDS_4 = all_4x4_grids()


def brute_count(puzzle) -> int:
    return sum(all(p == 0 or p == g for p, g in zip(puzzle, grid)) for grid in GRIDS_4)


def test_brute_force_finds_the_known_288_grids_and_the_solver_counts_them_both_ways():
    assert len(GRIDS_4) == len(set(GRIDS_4)) == 288 and all(dumb_valid(g, 4) for g in GRIDS_4)
    for hidden in (True, False):  # rate() searches without hidden singles, generation with them
        solutions, _ = S._search([0] * 16, 4, limit=10_000, hidden=hidden)
        assert sorted(map(tuple, solutions)) == sorted(GRIDS_4)


def test_solution_counts_match_brute_force_on_random_4x4_clue_sets():
    rng = random.Random(0)
    counts = set()
    for _ in range(300):
        grid = rng.choice(GRIDS_4)
        keep = set(rng.sample(range(16), rng.randint(0, 8)))
        puzzle = [v if i in keep else 0 for i, v in enumerate(grid)]
        expected = brute_count(puzzle)
        counts.add(expected)
        for hidden in (True, False):
            assert len(S._search(puzzle, 4, limit=10_000, hidden=hidden)[0]) == expected
        assert S.count_solutions(puzzle) == min(expected, 2)
    assert {1, 288} < counts and len(counts) > 10  # the draw covered unique, open and empty boards


@pytest.mark.parametrize("size", [4, 6, 9])
def test_generated_puzzles_are_unique_minimal_and_solved(size):
    for index in range(20 if size < 9 else 4):
        puzzle, solution = S.generate(3, size, index)
        assert len(puzzle) == size * size and dumb_valid(solution, size)
        assert all(p in (0, s) for p, s in zip(puzzle, solution))
        assert S.count_solutions(puzzle) == 1 and S.solve(puzzle) == solution
        if size == 4:
            assert brute_count(puzzle) == 1
        for i in (i for i, v in enumerate(puzzle) if v):  # minimal: every clue is needed
            assert S.count_solutions(puzzle[:i] + [0] + puzzle[i + 1:]) == 2


def test_generation_is_deterministic_per_seed_size_and_index():
    assert S.generate(5, 9, 2) == S.generate(5, 9, 2)
    assert len({tuple(S.generate(seed, 6, index)[0]) for seed in (0, 1) for index in (0, 1)}) == 4
    assert S.make_split(10, 7, 6) == S.make_split(10, 7, 6)


def test_stopping_at_a_clue_count_keeps_a_superset_of_the_minimal_puzzle():
    for index in range(6):
        minimal, solution = S.generate(1, 9, index)
        partial, same = S.generate(1, 9, index, clues=40)
        assert same == solution and sum(v > 0 for v in partial) == 40 and S.count_solutions(partial) == 1
        assert all(m in (0, p) for m, p in zip(minimal, partial))


def test_solver_reproduces_published_solutions():
    for puzzle, solution in (WIKIPEDIA, INKALA):
        assert S.solve(puzzle) == solution


def test_rating_is_zero_for_singles_deterministic_relabel_invariant_and_ranks_inkala_hard():
    assert S.rate(WIKIPEDIA[0]) == 0
    assert S.rate(WIKIPEDIA[1][:-1] + [0]) == 0
    generated = [S.generate(0, 9, i)[0] for i in range(12)]
    ratings = [S.rate(p) for p in generated]
    assert ratings == [S.rate(p) for p in generated]
    assert S.rate(INKALA[0]) > 10 * statistics.median(ratings)
    # Our own count, pinned: it moves if the definition does (fewest candidates, ties to the lowest
    # cell, naked singles only, the whole tree).
    assert S.rate(INKALA[0]) == 3598
    spec = S.BoardSpec(9)
    for k, p in enumerate(generated[:4]):
        t = S.relabel(spec, random.Random(k).sample(range(1, 10), 9))
        assert S.rate(S.apply(t, p)) == ratings[k]  # the whole tree does not depend on digit order


def test_removing_clues_makes_puzzles_harder_on_average():
    pairs = [(S.generate(2, 9, i, clues=32)[0], S.generate(2, 9, i)[0]) for i in range(10)]
    assert statistics.fmean(S.rate(m) for _, m in pairs) > statistics.fmean(S.rate(p) for p, _ in pairs)


def test_hardest_split_is_the_top_of_its_pool():
    n, k = 30, 4
    split = S.make_split(n, 4, 6, pool_factor=k)
    pool = S.make_split(n * k, 4, 6, hardest=False)  # the same first n * k draws
    assert split.ratings == [S.rate(p) for p in split.puzzles]
    assert len({tuple(p) for p in pool.puzzles}) == n * k
    assert sorted(split.ratings, reverse=True) == sorted(pool.ratings, reverse=True)[:n]
    assert set(map(tuple, split.puzzles)) <= set(map(tuple, pool.puzzles))
    st = split.stats
    assert st["guesses_min"] == min(split.ratings) >= st["pool_guesses_median"] == statistics.median(pool.ratings)
    assert st["guesses_max"] == max(pool.ratings) and st["pool"] == n * k and st["n_puzzles"] == n
    assert st["clues_mean"] == statistics.fmean(sum(v > 0 for v in p) for p in split.puzzles)
    assert st["guesses_max"] > 0  # 6x6 minimal puzzles do need guesses now and then


# ---- augmentations ----

def pieces(spec: S.BoardSpec, rng: random.Random) -> dict:
    n, h, w = spec.n, spec.box_rows, spec.box_cols
    out = {
        "relabel": S.relabel(spec, rng.sample(range(1, n + 1), n)),
        "bands": S.permute_bands(spec, rng.sample(range(n // h), n // h)),
        "stacks": S.permute_stacks(spec, rng.sample(range(n // w), n // w)),
        "rows": S.permute_rows(spec, [rng.sample(range(h), h) for _ in range(n // h)]),
        "cols": S.permute_cols(spec, [rng.sample(range(w), w) for _ in range(n // w)]),
        "random": S.random_transform(spec, rng),
    }
    if h == w:
        out["transpose"] = S.transpose(spec)
    return out


@pytest.mark.parametrize("size", [4, 6, 9])
def test_every_augmentation_keeps_solutions_valid_and_inverts_exactly(size):
    spec, rng = S.BoardSpec(size), random.Random(size)
    puzzle, solution = S.generate(0, size)
    for _ in range(5):
        for name, t in pieces(spec, rng).items():
            p, s = S.apply(t, puzzle), S.apply(t, solution)
            assert dumb_valid(s, size) and S.is_valid_solution(p, s) == (True, "ok"), name
            assert S.count_solutions(p) == 1 and sum(map(bool, p)) == sum(map(bool, puzzle)), name
            back = S.invert(t)
            assert S.apply(back, s) == solution and S.apply(back, p) == puzzle, name
            assert S.apply(t, S.apply(back, solution)) == solution, name


def test_pieces_move_what_they_name():
    spec = S.BoardSpec(6)  # 2x3 boxes: 3 bands of 2 rows, 2 stacks of 3 columns
    g = np.arange(36).reshape(6, 6)  # cell ids stand in for digits to follow where each cell goes
    move = lambda t: np.asarray(t.cells).reshape(6, 6)
    assert (move(S.permute_bands(spec, [2, 0, 1])) == g[[4, 5, 0, 1, 2, 3]]).all()
    assert (move(S.permute_stacks(spec, [1, 0])) == g[:, [3, 4, 5, 0, 1, 2]]).all()
    assert (move(S.permute_rows(spec, [[1, 0], [0, 1], [1, 0]])) == g[[1, 0, 2, 3, 5, 4]]).all()
    assert (move(S.permute_cols(spec, [[2, 0, 1], [0, 1, 2]])) == g[:, [2, 0, 1, 3, 4, 5]]).all()
    nine = np.arange(81).reshape(9, 9)
    assert (np.asarray(S.transpose(S.BoardSpec(9)).cells).reshape(9, 9) == nine.T).all()
    assert S.apply(S.relabel(S.BoardSpec(4), [2, 3, 4, 1]), [0, 1, 2, 3] * 4) == [0, 2, 3, 4] * 4
    a, b = S.permute_bands(spec, [1, 2, 0]), S.relabel(spec, [6, 5, 4, 3, 2, 1])
    solution = S.generate(0, 6)[1]
    assert S.apply(S.compose(a, b), solution) == S.apply(b, S.apply(a, solution))


def test_augment_transforms_puzzle_and_solution_alike_and_varies():
    rng = random.Random(0)
    puzzle, solution = S.generate(0, 9)
    seen = set()
    for _ in range(40):
        p, s, t = S.augment(puzzle, solution, rng)
        assert S.is_valid_solution(p, s) == (True, "ok") and S.solve(p) == s
        assert S.apply(S.invert(t), p) == puzzle and S.apply(S.invert(t), s) == solution
        seen.add(tuple(s))
    assert len(seen) == 40


def test_six_by_six_never_transposes_and_bad_orders_are_named():
    with pytest.raises(ValueError, match="2x3 boxes"):
        S.transpose(S.BoardSpec(6))
    with pytest.raises(ValueError, match=r"band order = \[0, 0, 1\]"):
        S.permute_bands(S.BoardSpec(6), [0, 0, 1])
    with pytest.raises(ValueError, match="relabel perm"):
        S.relabel(S.BoardSpec(4), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="2 orders for 3 bands"):
        S.permute_rows(S.BoardSpec(9), [[0, 1, 2]] * 2)


# ---- verifier ----

def test_verifier_rejects_each_corruption_with_its_reason():
    puzzle, solution = S.generate(0, 9, 1)
    n = 9
    blanks = [i for i, v in enumerate(puzzle) if not v]
    clue = next(i for i, v in enumerate(puzzle) if v)
    # two blanks of one row with different digits, in different boxes: rows stay whole, columns break
    i, j = next((i, j) for i in blanks for j in blanks if i // n == j // n and i % n // 3 < j % n // 3)
    swapped = solution.copy()
    swapped[i], swapped[j] = swapped[j], swapped[i]
    changed = solution.copy()
    changed[blanks[0]] = changed[blanks[0]] % 9 + 1
    clue_changed = solution.copy()
    clue_changed[clue] = clue_changed[clue] % 9 + 1
    latin = [(r + c) % 9 + 1 for r in range(9) for c in range(9)]  # rows and columns fine, boxes not
    cases = [
        (solution, "ok"), (np.array(solution), "ok"), (torch.tensor(solution), "ok"),
        (swapped, "column"), (changed, "row"), (clue_changed, "clue at cell"),
        (solution[:-1], "candidate: length 80"), (solution + [1], "candidate: length 82"),
        (solution[:-1] + [10], "candidate: value 10"), (solution[:-1] + [0], "candidate: value 0"),
        (solution[:-1] + [-1], "candidate: value -1"), (solution[:-1] + [9.0], "candidate: cell 80 = 9.0"),
        (solution[:-1] + ["9"], "candidate: cell 80 = '9'"), (solution[:-1] + [True], "candidate: cell 80 = True"),
        (None, "candidate: is a NoneType"), ("1" * 81, "candidate: is a str"), (7, "candidate: is a int"),
        (np.array(solution).reshape(9, 9), "candidate: length 9"),
    ]
    for candidate, reason in cases:
        ok, why = S.is_valid_solution(puzzle, candidate)
        assert ok == (reason == "ok") and why.startswith(reason), (reason, why)
    ok, why = S.is_valid_solution([0] * 81, latin)
    assert not ok and why.startswith("box")


def test_verifier_never_raises_on_a_malformed_puzzle_or_a_sequence_that_breaks():
    class Broken(list):
        def __len__(self):
            raise RuntimeError("no length")

    solution = WIKIPEDIA[1]
    for puzzle, reason in ((WIKIPEDIA[0][:-1], "puzzle: length 80"), ([10] * 81, "puzzle: value 10"),
                           (Broken(WIKIPEDIA[0]), "puzzle: unreadable (RuntimeError")):
        ok, why = S.is_valid_solution(puzzle, solution)
        assert not ok and why.startswith(reason), why
    assert S.is_valid_solution(WIKIPEDIA[0], Broken(solution))[1].startswith("candidate: unreadable")


# ---- sizes and encoding ----

@pytest.mark.parametrize("bad", [5, 8, 16, 0, True, "9", 9.0])
def test_bad_sizes_name_the_value(bad):
    with pytest.raises(ValueError, match=f"n = {bad!r}; valid: 4"):
        S.BoardSpec(bad)
    with pytest.raises(ValueError, match=f"n = {bad!r}"):
        S.generate(0, bad)


def test_bad_boards_and_arguments_raise_clearly():
    with pytest.raises(ValueError, match=r"puzzle: length 20; valid: 16 \(4x4\)"):
        S.solve([0] * 20)
    with pytest.raises(ValueError, match="more than one solution"):
        S.solve([0] * 16)
    with pytest.raises(ValueError, match="no solution"):
        S.rate([1, 1] + [0] * 14)
    with pytest.raises(ValueError, match="n_puzzles = 0"):
        S.make_split(0, 0, 4)
    with pytest.raises(ValueError, match="limit = 0"):
        S.count_solutions([0] * 16, limit=0)
    with pytest.raises(ValueError, match="clues = 99"):
        S.generate(0, 9, clues=99)


def test_encode_split_gives_int64_tokens_below_the_vocab():
    split = S.make_split(8, 0, 6, hardest=False)
    inputs, targets = S.encode_split(split.puzzles, split.solutions)
    assert inputs.shape == targets.shape == (8, 36) and inputs.dtype == targets.dtype == torch.int64
    assert inputs.tolist() == split.puzzles and targets.tolist() == split.solutions
    assert int(targets.min()) == 1 and int(targets.max()) == 6 < S.vocab_size(6) == 7
    assert S.to_tokens(np.array(WIKIPEDIA[0])) == WIKIPEDIA[0]
    wrong = split.solutions[1].copy()
    clue = next(i for i, v in enumerate(split.puzzles[1]) if v)
    wrong[clue] = wrong[clue] % 6 + 1
    with pytest.raises(ValueError, match=r"solutions\[1\] does not solve puzzles\[1\]: clue"):
        S.encode_split(split.puzzles[:2], [split.solutions[0], wrong])
    with pytest.raises(ValueError, match=r"puzzles\[1\]: not a 6x6 board"):
        S.encode_split([split.puzzles[0], WIKIPEDIA[0]], [split.solutions[0], WIKIPEDIA[1]])
    with pytest.raises(ValueError, match="2 puzzles and 1 solutions"):
        S.encode_split(split.puzzles[:2], split.solutions[:1])
