"""Pipeline parallelism (launch/parallel/pipeline.py) on CPU processes (gloo), against the
single-process stepper; see tests/dist/pipeline_check.py for what each launch runs.

Tolerances: 1e-6 relative on per-step lm loss, aux loss and grad norm, and on the final weights
(relative to the largest weight; 1e-5 with Muon and MuonClip); measured ~1e-7 (losses, norms) and
<= 4e-7 (weights; 1.6e-6 with Muon, 3.9e-7 with MuonClip): fp32 summation order. Router biases are
compared exactly: they move by +-speed steps.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from harness import REPO, tiny_train_flags, torchrun, torchrun_json  # noqa: E402

from launch.config.training import TrainConfig  # noqa: E402
from launch.parallel.pipeline import check_pipeline, stage_bounds  # noqa: E402
from launch.train import run  # noqa: E402
from moe.config import ConfigError, preset  # noqa: E402
from moe.model import Transformer  # noqa: E402

TOL = 1e-6
TRAINER_TAU = 0.06  # below the tiny trainer run's largest logits (measured 0.061-0.070 per step), so it clips


@pytest.fixture(scope="module")
def pp2(tmp_path_factory):
    return torchrun_json("pipeline_check.py", tmp_path_factory.mktemp("pp2"), nproc=2, timeout=300)


@pytest.fixture(scope="module")
def pp4(tmp_path_factory):
    return torchrun_json("pipeline_check.py", tmp_path_factory.mktemp("pp4"), nproc=4, timeout=300)


# AdamW divides by sqrt(v): where a gradient is near zero, fp32 rounding of the reductions becomes a
# visible step. Measured up to 1.6e-6 (PP=2 x DP=2); everything else agrees to TOL.
WEIGHTS_TOL = 5e-6


def assert_matches_reference(r, weights_tol=WEIGHTS_TOL):
    assert len(r["lm"]) == 5 and not any(r["skipped"])
    assert r["lm_rel"] <= TOL, (r["lm"], r)
    assert r["aux_rel"] <= TOL  # every stage's MoE balance losses, summed across stages
    assert r["norm_rel"] <= TOL  # clipping by the norm over all stages' gradients
    assert min(r["norm"]) > 0.5  # above grad_clip: every step really was clipped
    assert r["weights_rel"] <= weights_tol
    assert r["num_biases"] > 0 and r["bias_max"] > 0  # biases moved...
    assert r["bias_diff"] == 0.0  # ...exactly as with the global counts


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["balanced", "explicit"])
def test_pp2_matches_single_process(pp2, case):
    for rank in pp2:
        assert_matches_reference(rank[case])
    # Each stage holds its own share of the model, and together all of it, once.
    names = [set(rank[case]["stage_names"]) for rank in pp2]
    assert not names[0] & names[1]
    assert "embed_tokens.weight" in names[0] and "lm_head.weight" in names[1]
    assert pp2[0][case]["lm"] == pp2[1][case]["lm"]  # every stage logs the same loss


@pytest.mark.distributed
def test_pp2_partitions(pp2):
    assert pp2[0]["explicit"]["bounds"] == [0, 3, 4]
    model = Transformer(preset("tiny", num_layers=4, num_experts=4, num_experts_per_tok=2))
    assert pp2[0]["balanced"]["bounds"] == stage_bounds(model, 2)


@pytest.mark.distributed
def test_pp2_evaluate_matches_reference_model(pp2, pp4):
    for rank in pp2 + pp4:
        # The trained weights differ from the reference's by fp32 rounding (<= 4e-7): so does the loss.
        assert rank["eval"]["rel"] <= TOL
        assert rank["eval"]["training_after"]  # eval_batch leaves the module in eval mode; we restore it


@pytest.mark.distributed
def test_pp2_non_finite_step_skipped_on_every_stage(pp2):
    # A NaN in one last-stage gradient at step 2: both stages skip it, nothing moved, then train on.
    for rank in pp2:
        nan = rank["nan"]
        assert nan["skipped"] == [False, False, True, False, False]
        assert nan["unchanged"] == 0.0
    assert pp2[0]["nan"]["norm"] == pp2[1]["nan"]["norm"]


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["balanced", "ep2"])
def test_pp2_dp2_and_ep2_match_single_process(pp4, case):
    for rank in pp4:
        assert_matches_reference(rank[case])
    assert [rank["stage"] for rank in pp4] == [0, 0, 1, 1]  # pipe outermost: stage = rank // dp
    if case == "ep2":
        # Expert groups inside each stage: [0, 1] on stage 0, [2, 3] on stage 1; one MoE layer each.
        assert [rank["ep2"]["ep_group"] for rank in pp4] == [[0, 1], [0, 1], [2, 3], [2, 3]]
        assert [rank["ep2"]["ep_layers"] for rank in pp4] == [1, 1, 2, 2]


def test_stage_bounds():
    model = Transformer(preset("tiny", num_layers=4, num_experts=4))
    assert stage_bounds(model, 2, [1, 3]) == [0, 1, 4]
    assert stage_bounds(model, 3, [0, 4, 0]) == [0, 0, 4, 4]  # first / last stage: embedding / head only
    # Balanced: the cut with the smallest spread of stage parameter counts, found here by trying all.
    count = lambda *ms: sum(p.numel() for m in ms for p in m.parameters())  # noqa: E731
    def spread(b):
        first = count(model.embed_tokens, *model.layers[:b])
        last = count(*model.layers[b:], model.norm, model.lm_head)
        return abs(first - last)
    best = min(range(5), key=spread)
    assert stage_bounds(model, 2) == [0, best, 4]
    for bad in ([1, 2], [2, 2, 0, 0], [-1, 5]):
        with pytest.raises(ConfigError, match="blocks_per_stage"):
            stage_bounds(model, 2, bad)
    with pytest.raises(ConfigError, match="stage 1 of 3 would hold no block"):
        stage_bounds(model, 3, [2, 0, 2])
    with pytest.raises(ConfigError, match="exceeds num_layers"):
        stage_bounds(model, 7)


def _optimizer(name, model):
    import optim
    return optim.build(name, model, lr=1e-3)


@pytest.mark.parametrize("zero_stage, optimizer, match", [
    (2, "adamw", "zero_stage 1"),
    (3, "adamw", "zero_stage 1"),
    (1, "torch.optim.SGD", "'adamw', 'muon' and 'muonclip'"),
    (1, "muonclip", "MuonClip needs qk_clip_remeasure = False"),  # the default re-measure re-runs the pipeline
])
def test_check_pipeline_refuses(zero_stage, optimizer, match):
    cfg = preset("tiny")
    opt = _optimizer(optimizer, Transformer(cfg))
    with pytest.raises(ConfigError, match=match):
        check_pipeline(cfg, pp_size=2, zero_stage=zero_stage, optimizer=opt)
    check_pipeline(cfg, pp_size=1, zero_stage=zero_stage, optimizer=opt)  # nothing to refuse without a pipeline


def test_check_pipeline_takes_muonclip_without_remeasure():
    import optim
    cfg = preset("tiny")
    opt = optim.build("muonclip", Transformer(cfg), lr=1e-3, qk_clip_remeasure=False)
    check_pipeline(cfg, pp_size=2, zero_stage=1, optimizer=opt)


def test_check_pipeline_refuses_tied_embeddings():
    cfg = preset("tiny", tie_embeddings=True)
    with pytest.raises(ConfigError, match="tie_embeddings"):
        check_pipeline(cfg, pp_size=2, zero_stage=1, optimizer=_optimizer("adamw", Transformer(cfg)))
    check_pipeline(preset("tiny"), pp_size=2, zero_stage=1, optimizer=_optimizer("adamw", Transformer(preset("tiny"))))


@pytest.mark.distributed
def test_muon_pp2_and_pp2_ep2_match_single_process(pp2, pp4):
    # Newton-Schulz iterates on fp32 gradients that differ by rounding: measured <= 1.6e-6 (EP=2), 7e-7 (PP=2).
    for rank in pp2 + pp4:
        assert_matches_reference(rank["muon"], weights_tol=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("world, case", [(2, "muonclip"), (4, "muonclip_ep2"), (4, "muonclip_dp2")])
def test_muonclip_pp2_ep2_dp2_match_single_process(pp2, pp4, world, case):
    """QK-clip per stage (remeasure off, tau below most heads' logits) against one process's MuonClip."""
    for rank in pp2 if world == 2 else pp4:
        # The reference really clipped (heads over tau per step, of 16), and the clips moved it far
        # from the unclipped Muon run (measured 1.6e-2 at PP=2, 2.1e-2 on 4 ranks, of the largest weight): the check is not void.
        assert sum(rank["muonclip_ref_clipped"]) >= 5, rank["muonclip_ref_clipped"]
        assert rank["clip_effect"] > 1e-3
        r = rank[case]
        assert_matches_reference(r, weights_tol=1e-5)
        assert r["layers"] == 2
        # The maxima each stage clipped on are the reference's for its layers (measured <= 5.3e-7), and
        # the logged per-layer maxima, assembled over stages, are the reference's (measured <= 4.8e-7).
        assert r["max_logits_rel"] <= 1e-5 and r["logged_rel"] <= 1e-5
        assert r["master_diff"] == 0.0  # ZeRO's fp32 masters were clipped too, exactly as the working weights


def test_trainer_config_muonclip_under_pp_needs_remeasure_off():
    with pytest.raises(ConfigError, match="optimizer_args.qk_clip_remeasure = false, got True"):
        TrainConfig(pp_size=2, optimizer="muonclip")
    with pytest.raises(ConfigError, match="needs optimizer 'adamw', 'muon' or 'muonclip'"):
        TrainConfig(pp_size=2, optimizer="torch.optim.SGD")
    TrainConfig(pp_size=2, optimizer="muonclip", optimizer_args={"qk_clip_remeasure": False, "qk_clip_tau": 50.0})
    TrainConfig(pp_size=1, optimizer="muonclip")  # the re-measure stays the default without a pipeline


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_trainer_pp2_matches_single_process_and_resumes(tmp_path):
    """launch.train --pp-size 2 against the one-process trainer on the same data (dp = 1 in both):
    4 steps with a checkpoint, then a resume to 6. Every logged loss, grad norm and val loss agrees."""
    flags = [*tiny_train_flags(tmp_path, tmp_path / "unused"), "--grad-accum", "2", "--eval-every", "2",
             "--eval-batches", "2", "--checkpoint-every", "2"]
    flags = flags[:flags.index("--out-dir")] + flags[flags.index("--out-dir") + 2:]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    single, piped = tmp_path / "single", tmp_path / "pp"
    for steps, resume in (("4", []), ("6", ["--resume"])):
        args = [*flags, "--steps", steps, *resume]
        subprocess.run([sys.executable, "-m", "launch.train", *args, "--out-dir", str(single)], cwd=REPO, env=env,
                       check=True, capture_output=True, timeout=300)
        torchrun(["-m", "launch.train", *args, "--pp-size", "2", "--out-dir", str(piped)], nproc=2)
    ref, got = _metrics(single), _metrics(piped)
    assert [r["step"] for r in got] == [r["step"] for r in ref] and got[-1]["step"] == 6
    summary = json.loads((piped / "summary.json").read_text())
    assert summary["start_step"] == 4  # really resumed
    # Each stage allocated only its own layers (built on meta, moe/model.py's materialize).
    assert summary["params_largest_rank"] < 0.75 * summary["params_total"]
    assert json.loads((single / "summary.json").read_text())["params_largest_rank"] == summary["params_total"]
    for a, b in zip(got, ref):
        for key in ("lm_loss", "aux_loss", "grad_norm", "val_loss"):
            if key in b:
                assert abs(a[key] - b[key]) <= TOL * abs(b[key]), (key, a, b)


@pytest.mark.distributed
def test_trainer_pp2_muonclip_matches_single_process(tmp_path):
    """launch.train --pp-size 2 --optimizer muonclip (remeasure off) against the one-process trainer:
    the same losses, grad norms and logged max logits (each layer's, assembled from both stages)."""
    # first_k_dense 0: both stages hold an MoE block, hence the same param groups (check_stage_groups).
    flags = [*tiny_train_flags(tmp_path, tmp_path / "unused"), "--model.first_k_dense", "0", "--grad-accum", "2",
             "--eval-every", "4", "--eval-batches", "1", "--steps", "4", "--optimizer", "muonclip", "--lr", "1e-2",
             "--optimizer-args", f"{{qk_clip_tau: {TRAINER_TAU}, qk_clip_remeasure: false}}"]
    flags = flags[:flags.index("--out-dir")] + flags[flags.index("--out-dir") + 2:]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    single, piped = tmp_path / "single", tmp_path / "pp"
    subprocess.run([sys.executable, "-m", "launch.train", *flags, "--out-dir", str(single)], cwd=REPO, env=env,
                   check=True, capture_output=True, timeout=300)
    torchrun(["-m", "launch.train", *flags, "--pp-size", "2", "--out-dir", str(piped)], nproc=2)
    ref = [r for r in _metrics(single) if "lm_loss" in r]
    got = [r for r in _metrics(piped) if "lm_loss" in r]
    assert [r["step"] for r in got] == [r["step"] for r in ref] and len(ref) == 4
    assert max(r["max_logit"] for r in ref) > TRAINER_TAU  # some head really was clipped
    for a, b in zip(got, ref):
        assert a["qk_clip_tau"] == b["qk_clip_tau"] == TRAINER_TAU
        for key in ("lm_loss", "grad_norm", "max_logit"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), (key, a, b)
        assert len(a["max_logit_by_layer"]) == len(b["max_logit_by_layer"])
        # Every MoE layer's load statistic, whichever stage holds it (dp = 1: the same counts).
        assert a["router_max_over_mean"] == pytest.approx(b["router_max_over_mean"], abs=1e-3), (a, b)
        for x, y in zip(a["max_logit_by_layer"], b["max_logit_by_layer"]):
            assert abs(x - y) <= 1e-5 * abs(y), (a, b)


@pytest.mark.distributed
def test_trainer_refuses_stages_with_different_param_groups(tmp_path):
    # tiny: block 0 dense (stage 0), block 1 MoE (stage 1, the experts' fused gate/up group): ZeRO-1
    # would all-reduce 2 group norms on one stage and 3 on the other, and hang; refused instead.
    proc = torchrun(["-m", "launch.train", *tiny_train_flags(tmp_path, tmp_path / "run"), "--steps", "1",
                     "--pp-size", "2", "--optimizer", "muon"], nproc=2, check=False)
    assert proc.returncode != 0
    assert ("config error: pp_size = 2: the stages' optimizers have different param groups (stage 0: muon, adamw; "
            "stage 1: muon, muon_2_row_blocks, adamw)") in proc.stderr


def test_trainer_refuses_pp_without_launcher_or_with_zero2(tmp_path):
    with pytest.raises(ConfigError, match="pp_size = 2 needs zero_stage = 1"):
        TrainConfig(pp_size=2, zero_stage=2)
    with pytest.raises(ConfigError, match="needs several processes"):
        run(TrainConfig(pp_size=2, out_dir=str(tmp_path / "run")))


@pytest.mark.distributed
def test_trainer_refuses_a_world_that_pp_times_ep_does_not_divide(tmp_path):
    proc = torchrun(["-m", "launch.train", *tiny_train_flags(tmp_path, tmp_path / "run"), "--steps", "1",
                     "--pp-size", "2", "--ep-size", "2"], nproc=2, check=False)
    assert proc.returncode != 0
    assert "config error: pp_size x ep_size = 2 x 2 must divide the number of processes (WORLD_SIZE = 2)" in proc.stderr
