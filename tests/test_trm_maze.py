"""Mazes for TRM (trm/data/maze.py): generation, the hardness rule, tokens, the verifier, the augmentation.

References written here, not in the module: distances by repeated dilation of a boolean frontier
(numpy shifts, no queue), the path read back from the target by those distances, every shortest
path of an open room enumerated as the staircases choosing which of the moves go down, and each of
the 8 symmetries as a formula for where cell (r, c) goes (no numpy rotation).
"""

import itertools
import random

import numpy as np
import pytest
import torch

from trm.data import build
from trm.data.dihedral import DIHEDRAL_INVERSE
from trm.data.maze import (GOAL, OPEN, PAD, PATH, START, VOCAB_SIZE, WALL, Maze, augment, check_path, decode,
                           default_min_path_length, encode, encode_split, generate_mazes, symmetries, target,
                           transform, transform_tokens)


def _dilation_distances(walls: np.ndarray, source) -> np.ndarray:
    """Moves from source to every cell, -1 if unreachable: grow a frontier one step at a time."""
    open_ = ~walls
    dist = np.full(walls.shape, -1)
    frontier = np.zeros(walls.shape, dtype=bool)
    frontier[source] = True
    seen = frontier.copy()
    k = 0
    while frontier.any():
        dist[frontier] = k
        grown = np.zeros_like(frontier)
        grown[1:] |= frontier[:-1]
        grown[:-1] |= frontier[1:]
        grown[:, 1:] |= frontier[:, :-1]
        grown[:, :-1] |= frontier[:, 1:]
        frontier = grown & open_ & ~seen
        seen |= frontier
        k += 1
    return dist


def _from_rows(rows: list[str]) -> tuple[Maze, np.ndarray]:
    """A hand-drawn maze ('#' wall, '.' open, 'S', 'G', 'o' path) and its drawing as tokens [H, W]."""
    chars = np.array([list(r) for r in rows])
    tokens = np.select([chars == "#", chars == ".", chars == "S", chars == "G", chars == "o"],
                       [WALL, OPEN, START, GOAL, PATH], default=-1)
    assert (tokens >= 0).all()
    start, goal = (tuple(int(v) for v in np.argwhere(chars == ch)[0]) for ch in "SG")
    return Maze(chars == "#", start, goal), tokens


@pytest.fixture(scope="module")
def small_mazes():
    """Hundreds of small mazes, the sizes a CPU run trains on, with many loops to make ties."""
    return {(8, 8): generate_mazes(150, seed=1, height=8, width=8),
            (12, 12): generate_mazes(150, seed=2, height=12, width=12, loop_fraction=0.2),
            (9, 13): generate_mazes(50, seed=3, height=9, width=13)}


@pytest.fixture(scope="module")
def hard_mazes():
    """Maze-Hard's size and threshold."""
    return generate_mazes(6, seed=0)


def test_default_threshold_is_maze_hard_scaled_by_area():
    assert default_min_path_length(30, 30) == 110
    assert default_min_path_length(12, 12) == 18  # 110 * 144 / 900 = 17.6
    assert default_min_path_length(8, 8) == 8  # 7.8


def test_same_seed_same_mazes_and_a_longer_list_extends_a_shorter_one():
    a = generate_mazes(20, seed=7, height=10, width=10)
    b = generate_mazes(20, seed=7, height=10, width=10)
    c = generate_mazes(5, seed=7, height=10, width=10)
    other = generate_mazes(20, seed=8, height=10, width=10)
    assert [m.key() for m in a] == [m.key() for m in b]
    assert [m.key() for m in a[:5]] == [m.key() for m in c]
    assert len({m.key() for m in a} & {m.key() for m in other}) < 20


def test_every_maze_obeys_the_hardness_rule_by_an_independent_distance(small_mazes, hard_mazes):
    cases = [(shape, m) for shape, ms in small_mazes.items() for m in ms] + [((30, 30), m) for m in hard_mazes]
    for shape, m in cases:
        assert m.shape == shape and m.walls.dtype == bool
        assert m.start != m.goal and not m.walls[m.start] and not m.walls[m.goal]
        d = _dilation_distances(m.walls, m.start)[m.goal]
        assert d > default_min_path_length(*shape), (shape, d)
    assert min(_dilation_distances(m.walls, m.start)[m.goal] for m in hard_mazes) > 110


def test_mazes_in_a_list_are_distinct_and_exclude_makes_a_disjoint_test_set():
    train = generate_mazes(200, seed=0, height=8, width=8)
    assert len({m.key() for m in train}) == 200
    test = generate_mazes(200, seed=0, height=8, width=8, exclude=train)  # same seed: would repeat train
    assert not {m.key() for m in train} & {m.key() for m in test}


def test_loops_make_some_mazes_with_more_than_one_shortest_path(small_mazes):
    """Cells on some shortest path satisfy d(start, c) + d(c, goal) = d; a unique path has d + 1 of them."""
    tied = 0
    for m in small_mazes[(12, 12)]:
        ds, dg = _dilation_distances(m.walls, m.start), _dilation_distances(m.walls, m.goal)
        on_some = (ds >= 0) & (ds + dg == ds[m.goal])
        tied += int(on_some.sum()) > ds[m.goal] + 1
    assert tied >= 5, tied


def test_the_target_marks_a_shortest_path(small_mazes, hard_mazes):
    for m in [m for ms in small_mazes.values() for m in ms] + hard_mazes:
        t = target(m).reshape(m.shape)
        ds = _dilation_distances(m.walls, m.start)
        d = ds[m.goal]
        assert (t[t != PATH] == encode(m).reshape(m.shape)[t != PATH]).all()
        cells = sorted((int(ds[r, c]), (int(r), int(c))) for r, c in np.argwhere(t == PATH))
        assert [k for k, _ in cells] == list(range(1, d))  # one marked cell at each distance 1..d-1
        chain = [m.start] + [rc for _, rc in cells] + [m.goal]
        assert all(abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1 for a, b in zip(chain, chain[1:]))
        assert check_path(m, t) == (True, "ok")


def test_the_target_breaks_ties_walking_back_from_the_goal_up_first():
    m, _ = _from_rows(["S...",
                       "....",
                       "....",
                       "...G"])
    _, want = _from_rows(["Sooo",
                          "...o",
                          "...o",
                          "...G"])
    assert (target(m).reshape(4, 4) == want).all()
    ring, _ = _from_rows([".....",
                          ".S#G.",
                          "....."])
    _, over = _from_rows([".ooo.",
                          ".S#G.",
                          "....."])  # up before down: over the wall, not under it
    assert (target(ring).reshape(3, 5) == over).all()


def test_every_shortest_path_of_an_open_room_is_accepted_and_nothing_longer():
    m, _ = _from_rows(["S...",
                       "....",
                       "....",
                       "...G"])
    accepted = 0
    for downs in itertools.combinations(range(6), 3):  # which of the 6 moves go down: C(6, 3) = 20 paths
        grid, (r, c) = encode(m).reshape(4, 4), (0, 0)
        for k in range(5):
            r, c = (r + 1, c) if k in downs else (r, c + 1)
            grid[r, c] = PATH
        assert check_path(m, grid) == (True, "ok"), downs
        accepted += 1
    assert accepted == 20
    _, longer = _from_rows(["Soo.",
                            ".oo.",
                            ".ooo",
                            "...G"])  # connected, 7 cells marked: a shortest path marks 5
    ok, reason = check_path(m, longer)
    assert not ok and reason.startswith("detour"), reason


# A corridor along the top (4 moves) and a detour round the walls below it (8 moves).
ROOM = ["S...G",
        ".###.",
        "....."]


@pytest.mark.parametrize("drawing, reason", [
    (["SoooG", ".###.", "....."], "ok"),
    (["S...G", "o###o", "ooooo"], "detour"),  # the longer way round
    (["So.oG", ".###.", "....."], "gap"),
    (["SoooG", ".#o#.", "....."], "path through a wall"),
    (["SoooG", ".#.#.", "....."], "changed"),  # a wall knocked down
    (["SoooG", ".###.", "#...."], "changed"),  # a wall put up
    (["SoooG", ".###.", "....S"], "changed"),  # a second start
    (["oooSG", ".###.", "....."], "changed"),  # start moved
    (["SoooG", ".###.", "...o."], "stray"),
    (["SoooG", "o###.", "....."], "detour"),  # a branch hanging off the path
])
def test_the_verifier_on_hand_drawn_candidates(drawing, reason):
    m, _ = _from_rows(ROOM)
    _, candidate = _from_rows(drawing)
    ok, why = check_path(m, candidate)
    assert ok == (reason == "ok") and why.startswith(reason), (drawing, why)


def test_the_verifier_rejects_corrupted_targets_of_generated_mazes(hard_mazes, small_mazes):
    for m in hard_mazes + small_mazes[(12, 12)][:40]:
        good = target(m).reshape(m.shape)
        marked = np.argwhere(good == PATH)
        gap = good.copy()
        gap[tuple(marked[len(marked) // 2])] = OPEN
        assert check_path(m, gap)[1].startswith("gap")
        wall = tuple(np.argwhere(m.walls)[0])
        through = good.copy()
        through[wall] = PATH
        assert check_path(m, through)[1].startswith("path through a wall")
        knocked = good.copy()
        knocked[wall] = OPEN
        assert check_path(m, knocked)[1].startswith("changed")
        # One more open cell marked, one on no shortest path: off the path (stray) or hanging off it (detour).
        ds, dg = _dilation_distances(m.walls, m.start), _dilation_distances(m.walls, m.goal)
        off = [(int(r), int(c)) for r, c in np.argwhere((good == OPEN) & (ds + dg > ds[m.goal]))]
        extra = good.copy()
        extra[off[0]] = PATH
        assert check_path(m, extra)[1].startswith(("stray", "detour"))


@pytest.mark.parametrize("candidate, reason", [
    ([OPEN] * 14, "candidate: shape"),
    ([OPEN] * 15, "changed"),  # right length, start and goal gone
    (np.full((5, 3), OPEN), "candidate: shape"),
    (np.full((1, 15), OPEN), "candidate: shape"),
    ([], "candidate: shape"),
    (np.full(15, 2.0), "candidate: dtype"),
    (np.full(15, True), "candidate: dtype"),
    ([None] * 15, "candidate: dtype"),
    ([[1, 2], [3]], "candidate: unreadable"),
    ("SoooG.###......", "candidate: shape"),
    (None, "candidate: shape"),
    (np.array([PAD] * 15), "candidate: token 0"),
    (np.array([9] * 15), "candidate: token 9"),
])
def test_the_verifier_never_raises_on_malformed_candidates(candidate, reason):
    m, _ = _from_rows(ROOM)
    ok, why = check_path(m, candidate)
    assert not ok and why.startswith(reason), why


def test_the_verifier_reads_torch_and_flat_candidates_and_rejects_a_malformed_maze():
    m, _ = _from_rows(ROOM)
    _, good = _from_rows(["SoooG", ".###.", "....."])
    assert check_path(m, torch.from_numpy(good).reshape(-1)) == (True, "ok")
    assert check_path(m, good.reshape(-1).tolist()) == (True, "ok")
    assert check_path("not a maze", good)[1].startswith("maze:")
    shut, _ = _from_rows(["S#G"])
    assert check_path(shut, [START, WALL, GOAL])[1].startswith("maze: goal")


def test_tokens_round_trip_and_splits_have_the_vocabulary(small_mazes):
    mazes = small_mazes[(9, 13)]
    for m in mazes:
        assert decode(encode(m), 9, 13).key() == m.key()
        assert decode(torch.from_numpy(target(m)), 9, 13).key() == m.key()
    inputs, targets = encode_split(mazes)
    assert inputs.shape == targets.shape == (50, 9 * 13) and inputs.dtype == targets.dtype == torch.int64
    assert set(inputs.unique().tolist()) == {WALL, OPEN, START, GOAL}
    assert set(targets.unique().tolist()) == {WALL, OPEN, START, GOAL, PATH} and VOCAB_SIZE == PATH + 1
    assert ((inputs == START).sum(1) == 1).all() and ((targets == GOAL).sum(1) == 1).all()


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="decode: 2 start cells"):
        decode([START, OPEN, START, GOAL], 2, 2)
    with pytest.raises(ValueError, match="decode: token 7"):
        decode([START, 7, OPEN, GOAL], 2, 2)
    with pytest.raises(ValueError, match="decode: 3 tokens"):
        decode([START, OPEN, GOAL], 2, 2)
    with pytest.raises(ValueError, match="height = 3"):
        generate_mazes(1, seed=0, height=3, width=8)
    with pytest.raises(ValueError, match="loop_fraction"):
        generate_mazes(1, seed=0, height=8, width=8, loop_fraction=1.5)
    with pytest.raises(ValueError, match="min_path_length = 60 for 8x8"):
        generate_mazes(1, seed=0, height=8, width=8, min_path_length=60)  # 64 cells cannot hold it
    with pytest.raises(ValueError, match="one size per split"):
        encode_split(generate_mazes(1, seed=0, height=8, width=8) + generate_mazes(1, seed=0, height=10, width=10))


# ---- augmentation ---------------------------------------------------------------------------------

def _moved_to(k: int, h: int, w: int, r: int, c: int) -> tuple[int, int]:
    """Where symmetry k (trm/data/dihedral.py's numbering) takes cell (r, c) of an h x w grid."""
    return [(r, c), (w - 1 - c, r), (h - 1 - r, w - 1 - c), (c, h - 1 - r),  # identity, turns anticlockwise
            (r, w - 1 - c), (h - 1 - r, c), (c, r), (w - 1 - c, h - 1 - r)][k]  # mirrors: across, up-down, 2 diagonals


def _square(small_mazes, hard_mazes) -> list[Maze]:
    return small_mazes[(8, 8)][:40] + small_mazes[(12, 12)][:40] + hard_mazes


def test_each_symmetry_moves_walls_start_and_goal_as_its_formula(small_mazes):
    for m in small_mazes[(8, 8)][:10] + small_mazes[(9, 13)][:10]:
        h, w = m.shape
        for k in symmetries(h, w):
            t = transform(m, k)
            assert t.start == _moved_to(k, h, w, *m.start) and t.goal == _moved_to(k, h, w, *m.goal)
            for r, c in itertools.product(range(h), range(w)):
                assert t.walls[_moved_to(k, h, w, r, c)] == m.walls[r, c]
            assert (transform_tokens(encode(m), h, w, k) == encode(t)).all()  # tokens and Maze move alike


def test_every_symmetry_maps_the_target_to_a_shortest_path_and_back(small_mazes, hard_mazes):
    for m in _square(small_mazes, hard_mazes):
        h, w = m.shape
        d = _dilation_distances(m.walls, m.start)[m.goal]
        for k in range(8):
            moved = transform_tokens(target(m), h, w, k)
            maze_k = decode(transform_tokens(encode(m), h, w, k), h, w)  # start and goal read off the moved input
            assert maze_k.key() == transform(m, k).key()
            # The independent check: one marked cell at each distance 1..d-1 from the moved start, each a
            # step from the one before.
            ds = _dilation_distances(maze_k.walls, maze_k.start)
            assert ds[maze_k.goal] == d
            grid = moved.reshape(h, w)
            cells = sorted((int(ds[r, c]), (int(r), int(c))) for r, c in np.argwhere(grid == PATH))
            assert [k_ for k_, _ in cells] == list(range(1, d))
            chain = [maze_k.start] + [rc for _, rc in cells] + [maze_k.goal]
            assert all(abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1 for a, b in zip(chain, chain[1:]))
            assert check_path(maze_k, moved) == (True, "ok")
            back = DIHEDRAL_INVERSE[k]
            assert (transform_tokens(moved, h, w, back) == target(m)).all()
            assert transform(maze_k, back).key() == m.key()


def test_the_verifier_rejects_corrupted_transformed_targets(small_mazes, hard_mazes):
    for m in small_mazes[(12, 12)][:20] + hard_mazes:
        h, w = m.shape
        for k in range(1, 8):
            maze_k = transform(m, k)
            good = transform_tokens(target(m), h, w, k).reshape(h, w)
            marked = np.argwhere(good == PATH)
            gap = good.copy()
            gap[tuple(marked[len(marked) // 2])] = OPEN
            assert check_path(maze_k, gap)[1].startswith("gap")
            through = good.copy()
            through[tuple(np.argwhere(maze_k.walls)[0])] = PATH
            assert check_path(maze_k, through)[1].startswith("path through a wall")
            ds, dg = _dilation_distances(maze_k.walls, maze_k.start), _dilation_distances(maze_k.walls, maze_k.goal)
            off = np.argwhere((good == OPEN) & (ds + dg > ds[maze_k.goal]))
            extra = good.copy()
            extra[tuple(off[0])] = PATH
            assert check_path(maze_k, extra)[1].startswith(("stray", "detour"))
            # The untransformed answer does not fit the moved maze (none of these mazes is symmetric).
            assert maze_k.key() != m.key() and not check_path(maze_k, target(m))[0]


def test_an_oblong_maze_keeps_its_shape_under_four_symmetries_only(small_mazes):
    assert symmetries(9, 13) == (0, 2, 4, 5) and symmetries(8, 8) == tuple(range(8))
    m = small_mazes[(9, 13)][0]
    for k in (0, 2, 4, 5):
        assert check_path(transform(m, k), transform_tokens(target(m), 9, 13, k)) == (True, "ok")
    with pytest.raises(ValueError, match="a 9x13 maze keeps its shape under 0, 2, 4, 5"):
        transform(m, 1)
    with pytest.raises(ValueError, match="symmetry k = 8"):
        transform_tokens(encode(m), 9, 13, 8)
    with pytest.raises(ValueError, match="transform_tokens: 116 tokens; a 9x13 maze has 117"):
        transform_tokens(encode(m)[:-1], 9, 13, 0)


def test_augment_draws_every_symmetry_and_the_task_data_trains_on_it(small_mazes):
    m = small_mazes[(8, 8)][0]
    rng = random.Random(0)
    drawn = set()
    for _ in range(100):
        inputs, targets, k = augment(encode(m), target(m), 8, 8, rng)
        assert (inputs == transform_tokens(encode(m), 8, 8, k)).all()
        assert (targets == transform_tokens(target(m), 8, 8, k)).all()
        drawn.add(k)
    assert drawn == set(range(8))
    oblong = small_mazes[(9, 13)][0]
    assert {augment(encode(oblong), target(oblong), 9, 13, rng)[2] for _ in range(60)} == {0, 2, 4, 5}
    data = build("maze", {"size": 8, "train": 10, "val": 2, "test": 2}, seed=1)
    moved = 0
    for x, y in zip(*data.train):
        ax, ay = data.augment(x, y, random.Random(str(x.tolist())))
        assert ax.dtype == ay.dtype == torch.int64 and ax.shape == x.shape
        assert data.verify(ax.tolist(), ay.tolist()) == (True, "ok")
        moved += not torch.equal(ax, x)
    assert moved >= 5  # 1 in 8 draws is the identity
