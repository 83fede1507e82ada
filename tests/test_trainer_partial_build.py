"""launch.train under expert or pipeline parallelism builds the model on the meta device and
allocates only this rank's part (moe/model.py's materialize): fresh, each tensor is initialised from
the model's seed and its name; from one of our sharded checkpoints (--init-from), each rank reads its
own part of each tensor. Reference: the one-process trainer on the same data, which builds the whole
model the ordinary way (or reads the whole checkpoint). Every step's loss must agree, and the largest
rank must hold less than the whole model."""

import json
import sys
from pathlib import Path

import pytest
import torch

from launch.config.training import parse_args
from launch.train import run
from moe.config import preset
from moe.model import Transformer
from moe.moe import RoutedExperts

DIST = Path(__file__).parent / "dist"
sys.path.insert(0, str(DIST))
from harness import tiny_train_flags, torchrun  # noqa: E402

PART_ONLY = "this rank's part of it only"  # what launch.train prints when it reads only its part


def _flags(tmp, out, steps, *extra):
    return [*tiny_train_flags(tmp, out), "--steps", str(steps), "--warmup-steps", "1", "--eval-every", "100",
            "--eval-batches", "1", "--device", "cpu", "--dist-timeout-s", "120", *extra]


def _summary_and_losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), {r["step"]: r["lm_loss"] for r in records if "lm_loss" in r}


def _assert_same_losses(ref, got):
    assert sorted(got) == sorted(ref) and ref
    # Same weights and tokens; only the summation order differs (as across tests/test_reshard.py's layouts).
    assert max(abs(got[s] - ref[s]) / ref[s] for s in ref) <= 1e-6, (ref, got)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The one-process run of 3 steps: the reference of a fresh start, and the checkpoint to start from."""
    tmp = tmp_path_factory.mktemp("partial")
    run(parse_args(_flags(tmp, tmp / "one", 3, "--grad-accum", "2")))
    return tmp


@pytest.mark.distributed
def test_expert_parallel_trainer_starts_from_the_one_process_model_and_holds_its_slice(base):
    torchrun(["-m", "launch.train", *_flags(base, base / "ep", 3, "--grad-accum", "1", "--ep-size", "2",
                                           "--zero-stage", "1")], nproc=2, timeout=400)
    (one, ref), (ep, got) = _summary_and_losses(base / "one"), _summary_and_losses(base / "ep")
    _assert_same_losses(ref, got)
    assert one["params_largest_rank"] == one["params_total"] == ep["params_total"]
    # What a rank of EP 2 must hold: the whole tiny model but half of each MoE block's routed experts.
    with torch.device("meta"):
        whole = Transformer(preset("tiny", vocab_size=one["vocab_size"]))
    routed = sum(p.numel() for m in whole.modules() if isinstance(m, RoutedExperts) for p in m.parameters())
    assert sum(p.numel() for p in whole.parameters()) == one["params_total"] and routed > 0
    assert ep["params_largest_rank"] == one["params_total"] - routed // 2


@pytest.mark.distributed
def test_init_from_a_checkpoint_reads_each_ranks_part_under_ep_and_pp(base):
    """--init-from the 3-step run: one process reads the whole model; EP 2 and PP 2 read their parts."""
    source = ("--init-from", str(base / "one"))
    one_out, ep_out, pp_out = base / "from-one", base / "from-ep", base / "from-pp"
    run(parse_args(_flags(base, one_out, 2, *source, "--grad-accum", "2")))
    ep = torchrun(["-m", "launch.train", *_flags(base, ep_out, 2, *source, "--grad-accum", "1", "--ep-size", "2",
                                                "--zero-stage", "1")], nproc=2, timeout=400)
    pp = torchrun(["-m", "launch.train", *_flags(base, pp_out, 2, *source, "--grad-accum", "2", "--pp-size", "2")],
                  nproc=2, timeout=400)
    assert PART_ONLY in ep.stderr and PART_ONLY in pp.stderr
    (one, ref) = _summary_and_losses(one_out)
    _, fresh = _summary_and_losses(base / "one")
    assert ref[1] < fresh[1] - 0.05  # it really started from the trained weights, not from a fresh model
    for out in (ep_out, pp_out):
        summary, got = _summary_and_losses(out)
        _assert_same_losses(ref, got)
        assert summary["params_largest_rank"] < 0.9 * one["params_total"] and summary["init_from"] == str(base / "one")


@pytest.mark.distributed
def test_init_from_hugging_face_weights_reads_each_ranks_part_under_ep(base):
    """--init-from the 3-step run exported to Hugging Face: EP 2 reads its experts from the
    safetensors files (moe/hf.py's load_hf_part) and logs the losses of one process reading it whole
    through transformers (import_hf)."""
    from launch.export import main as export

    hf_dir = base / "hf"
    export([str(base / "one" / "checkpoints"), "--hf-dir", str(hf_dir)])
    one_out, ep_out = base / "hf-one", base / "hf-ep"
    run(parse_args(_flags(base, one_out, 2, "--init-from", str(hf_dir), "--grad-accum", "2")))
    ep = torchrun(["-m", "launch.train", *_flags(base, ep_out, 2, "--init-from", str(hf_dir), "--grad-accum", "1",
                                                "--ep-size", "2", "--zero-stage", "1")], nproc=2, timeout=400)
    assert PART_ONLY in ep.stderr
    (_, ref), (summary, got) = _summary_and_losses(one_out), _summary_and_losses(ep_out)
    _assert_same_losses(ref, got)
    _, fresh = _summary_and_losses(base / "one")
    assert ref[1] < fresh[1] - 0.05  # it really started from the trained weights
    assert summary["params_largest_rank"] < 0.9 * summary["params_total"]


def _corrupted_copy(base, dest):
    """The 3-step run's checkpoint, copied, with one byte of its tensor file flipped."""
    import shutil

    ckpt = next((base / "one" / "checkpoints").glob("step_*"))
    shutil.copytree(ckpt, dest)
    tensors = dest / "rank00000.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-5] ^= 0xFF
    tensors.write_bytes(bytes(data))
    return dest


def test_part_source_checks_digests_unless_told_its_checkpoint_was_verified(base, tmp_path):
    from launch.checkpoint import store
    from launch.checkpoint.pretrained import part_source

    bad = _corrupted_copy(base, tmp_path / "step_bad")
    with pytest.raises(store.CheckpointError, match="SHA-256 differs"):
        part_source(str(bad))
    assert part_source(str(bad), check_digests=False).kind == "checkpoint"  # the manifest alone is intact


@pytest.mark.distributed
def test_a_corrupted_source_is_refused_on_every_rank_by_rank_0s_check(base, tmp_path):
    """Rank 0 alone hashes the source's files; its refusal reaches the other rank, and nothing trains."""
    bad = _corrupted_copy(base, tmp_path / "step_bad")
    proc = torchrun(["-m", "launch.train", *_flags(base, tmp_path / "run", 2, "--init-from", str(bad),
                                                  "--grad-accum", "1", "--ep-size", "2", "--zero-stage", "1")],
                    nproc=2, timeout=400, check=False)
    assert proc.returncode != 0 and "SHA-256 differs" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def hashed_by_rank(counts: Path) -> dict:
    """{rank: the source files it SHA-256'd} from tests/dist/digest_count.py's logs."""
    return {int(p.stem.removeprefix("rank")): sorted(p.read_text().split()) for p in counts.glob("rank*.txt")}


@pytest.mark.distributed
def test_only_rank_0_hashes_the_source_of_a_replicated_run(base, tmp_path):
    """Data parallelism (every rank reads the whole model): rank 0 checks each file of the source
    once, the other rank reads it trusting that check (before, every rank hashed every file)."""
    ckpt = next((base / "one" / "checkpoints").glob("step_*"))
    files = sorted(e["file"] for e in json.loads((ckpt / "manifest.json").read_text())["files"])
    counts = tmp_path / "counts"
    torchrun([str(DIST / "digest_count.py"), str(ckpt), str(counts), "launch.train",
              *_flags(base, tmp_path / "run", 1, "--init-from", str(ckpt), "--grad-accum", "1", "--zero-stage", "1")],
             nproc=2, timeout=400)
    assert hashed_by_rank(counts) == {0: files, 1: []}
    assert (tmp_path / "run" / "summary.json").is_file()


@pytest.mark.parametrize("entry", ["verify_source", "part_source", "load_pretrained"])
def test_a_runs_source_is_hashed_once(base, monkeypatch, entry):
    """Given a run directory, finding its newest good checkpoint verifies it (store.find_resumable):
    loading from it must not read every file again to hash it a second time."""
    from launch.checkpoint import pretrained, store

    hashed, hash_file = [], store._digest
    monkeypatch.setattr(store, "_digest", lambda path: hashed.append(path.name) or hash_file(path))
    getattr(pretrained, entry)(str(base / "one"))
    ckpt = next((base / "one" / "checkpoints").glob("step_*"))
    files = sorted(e["file"] for e in json.loads((ckpt / "manifest.json").read_text())["files"])
    assert sorted(hashed) == files
