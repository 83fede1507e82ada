"""The shard index: every element written once, evenly; any range read back from the pieces; crafted
indexes and piece files refused with a CheckpointError. In one process (several ranks simulated)."""

import json

import pytest
import torch

import optim
from launch.checkpoint import shards, state_files
from launch.checkpoint import store as checkpoint
from launch.parallel.engine import LocalStepper
from moe.config import ModelConfig
from moe.model import Transformer

E, M = 8, 6  # an [E, M] "expert stack": 48 elements


def _ranks():
    """Four ranks as EP 2 x DP 2: a dense [10, 7] tensor on all, experts [0, 4) on ranks 0 and 2 and
    [4, 8) on 1 and 3, and a momentum whose matrices at a partition boundary two ranks both hold."""
    dense = torch.arange(70.0).view(10, 7)
    experts = torch.arange(E * M, dtype=torch.float32).view(E, M) + 1000
    momentum = torch.arange(40.0) - 500
    held = []
    for r in range(4):
        half = r % 2
        h = [shards.Held("model/dense", (10, 7), 0, 70, dense.reshape(-1)),
             shards.Held("model/experts", (E, M), half * 24, half * 24 + 24, experts.reshape(-1)[half * 24:half * 24 + 24])]
        lo, hi = [(0, 15), (10, 25), (20, 35), (30, 40)][r]  # overlaps of 5: boundary matrices
        h.append(shards.Held("optimizer/m", (40,), lo, hi, momentum[lo:hi]))
        held.append(shards.ShardSet(h, {"optimizer/dense/step": {"value": 3, "tensor": True}}))
    return held, {"model/dense": dense, "model/experts": experts, "optimizer/m": momentum}


def _write(tmp_path, held, index):
    for r, s in enumerate(held):
        state_files.save({"rank": r}, tmp_path / f"rank{r:05d}.json", tmp_path / f"rank{r:05d}.safetensors",
                         named=shards.owned(s, index, r))
    return shards.Reader(tmp_path, index, len(held), lambda r: f"rank{r:05d}.safetensors", error=checkpoint.CheckpointError)


def test_every_element_is_written_once_and_evenly():
    held, full = _ranks()
    index = shards.assign([shards.describe(s) for s in held])
    for key, value in full.items():
        pieces = sorted(index["tensors"][key]["pieces"], key=lambda p: p[1])
        assert pieces[0][1] == 0 and pieces[-1][2] == value.numel()
        assert all(a[2] == b[1] for a, b in zip(pieces, pieces[1:]))  # tiles: no gap, no overlap
        per_rank = [sum(hi - lo for r, lo, hi in pieces if r == rank) for rank in range(4)]
        if key != "optimizer/m":  # held by all, or by two ranks each half: 1/4 each
            assert max(per_rank) - min(per_rank) <= 1, (key, per_rank)
    held_m = {r: (h.lo, h.hi) for r, s in enumerate(held) for h in s.held if h.key == "optimizer/m"}
    for r, lo, hi in index["tensors"]["optimizer/m"]["pieces"]:  # a rank writes only what it holds
        assert held_m[r][0] <= lo < hi <= held_m[r][1]
    # A boundary range held twice ([10, 15), [20, 25), [30, 35)) is split between its two holders.
    for r, (lo, hi) in zip(range(3), [(10, 15), (20, 25), (30, 35)]):
        assert {o for o, a, b in index["tensors"]["optimizer/m"]["pieces"] if a < hi and b > lo} == {r, r + 1}
    assert index["scalars"] == {"optimizer/dense/step": {"value": 3, "tensor": True}}


def test_any_range_reads_back_from_the_pieces(tmp_path):
    held, full = _ranks()
    reader = _write(tmp_path, held, shards.assign([shards.describe(s) for s in held]))
    for key, value in full.items():
        assert torch.equal(reader.full(key), value)
    assert torch.equal(reader.read("model/experts", 20, 31), full["model/experts"].reshape(-1)[20:31])
    assert reader.read("optimizer/m", 7, 7).numel() == 0
    with pytest.raises(checkpoint.CheckpointError, match="holds no tensor 'model/other'"):
        reader.read("model/other")


def test_holes_in_what_the_ranks_hold_fail_at_save():
    held, _ = _ranks()
    held = [shards.ShardSet([h for h in s.held if h.key != "model/experts" or h.lo == 0], {}) for s in held]
    with pytest.raises(shards.ShardIndexError, match=r"model/experts: no rank holds elements \[24, 48\)"):
        shards.assign([shards.describe(s) for s in held])


@pytest.mark.parametrize("damage, match", [
    (lambda ix: ix["tensors"]["model/dense"]["pieces"].pop(), r"pieces of 'model/dense' end at \d+, its shape \[10, 7\] has 70"),
    (lambda ix: ix["tensors"]["model/dense"]["pieces"][0].__setitem__(2, 1), "do not tile"),
    (lambda ix: ix["tensors"]["model/dense"].__setitem__("shape", "big"), "'model/dense' is malformed"),
    (lambda ix: ix.pop("scalars"), "not an index of tensors and scalars"),
])
def test_crafted_index_is_refused(tmp_path, damage, match):
    held, _ = _ranks()
    index = shards.assign([shards.describe(s) for s in held])
    _write(tmp_path, held, index)
    damage(index)
    with pytest.raises(checkpoint.CheckpointError, match=match):
        shards.Reader(tmp_path, index, 4, lambda r: f"rank{r:05d}.safetensors", error=checkpoint.CheckpointError)


def test_index_that_names_a_piece_the_file_lacks_or_another_rank_is_refused(tmp_path):
    held, _ = _ranks()
    index = shards.assign([shards.describe(s) for s in held])
    reader = _write(tmp_path, held, index)
    first = index["tensors"]["model/dense"]["pieces"][0]
    first[0] = (first[0] + 1) % 4  # points at a rank whose file has no such piece
    with pytest.raises(checkpoint.CheckpointError, match=r"no readable tensor 'named:model/dense@0'"):
        reader.read("model/dense")
    first[0] = 9
    with pytest.raises(checkpoint.CheckpointError, match="a piece names rank 9; the checkpoint has 4 rank"):
        reader.read("model/dense")


def test_piece_files_hold_only_what_their_json_lists(tmp_path):
    """A tensor smuggled into a rank's safetensors, or a 'named' list of something else, is refused."""
    from safetensors.torch import save_file

    paths = tmp_path / "r.json", tmp_path / "r.safetensors"
    state_files.save({"a": torch.ones(2)}, *paths, named={"model/x@0": torch.ones(3)})
    assert torch.equal(state_files.load(*paths)["a"], torch.ones(2))
    save_file({"t0": torch.ones(2), "named:model/x@0": torch.ones(3), "extra": torch.ones(1)}, str(paths[1]))
    with pytest.raises(state_files.StateFormatError, match=r"holds tensor\(s\) \['extra'\]"):
        state_files.load(*paths)
    doc = json.loads(paths[0].read_text())
    paths[0].write_text(json.dumps({**doc, "named": ["t0"]}))
    with pytest.raises(state_files.StateFormatError, match="'named' is not a list of named:"):
        state_files.load(*paths)


def _trained(optimizer_name, seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=64, num_experts=4, tie_embeddings=True))  # tied: one tensor, two names
    stepper = LocalStepper(model, optim.build(optimizer_name, model, lr=1e-2), 1, 1.0)
    for _ in range(2):
        tokens = torch.randint(0, 64, (2, 9))
        stepper.backward(stepper.forward(tokens[:, :-1], tokens[:, 1:]).loss)
        stepper.step()
    return stepper


@pytest.mark.parametrize("optimizer_name", ["adamw", "muon"])
def test_one_process_state_round_trips_through_a_sharded_checkpoint(tmp_path, optimizer_name):
    saved = _trained(optimizer_name)
    checkpoint.save(tmp_path, 2, {"step": 2}, {}, keep=0, shards=saved.shards())
    fresh = _trained(optimizer_name, seed=1)
    fresh.load_shards(checkpoint.open_shards(tmp_path / "step_00000002"))
    for (name, a), b in zip(saved.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(a, b), name
    for p, q in zip(saved.model.parameters(), fresh.model.parameters()):
        a, b = saved.optimizer.state[p], fresh.optimizer.state[q]
        assert sorted(a) == sorted(b)
        for key in a:
            assert type(a[key]) is type(b[key]) and (torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key])
