"""Data parallelism under DeepSpeed ZeRO on 2 CPU processes (gloo), against the single-process stepper.

All checks share one torchrun launch (tests/dist/parity_check.py); see its docstring for what each
compares. Tolerances: losses agree to 1e-6 relative over 5 steps (measured ~1.5e-7: fp32 summation
order of the gradient all-reduce). Final weights agree to 1e-4 relative to the largest weight with
MuonClip and 3e-3 with AdamW (measured 2e-5 and 5e-4 on one CPU, 3e-5 and 1.4e-3 on another, with
the same code: the CPU's kernels round differently): Adam divides by sqrt(v), so on weights whose
gradient is ~0 the rounding noise of the reduction becomes an update of its own (the script raises
Adam's eps to 1e-6 to keep the worst of it, a full-size step, out).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from harness import torchrun_json  # noqa: E402

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    return torchrun_json("parity_check.py", tmp_path_factory.mktemp("parity"), timeout=300)


@pytest.mark.parametrize("case", ["adamw_zero1", "adamw_zero2", "muonclip_zero1", "muonclip_zero2", "muonclip_zero1_chunked",
                                  "ep2_zero2_muonclip"])
def test_dp2_matches_single_process(parity, case):
    weights_tol = 3e-3 if case.startswith("adamw") else 1e-4
    for rank in parity:
        r = rank[case]
        assert len(r["dp"]) == 5
        assert r["loss_rel"] <= 1e-6, (r["ref"], r["dp"])
        assert r["weights_rel"] <= weights_tol
    assert parity[0][case]["dp"] == parity[1][case]["dp"]  # every rank logs the same global loss


def test_muonclip_parity_run_actually_clipped(parity):
    assert parity[0]["clipped_heads_last_step"] > 0


def test_qk_clip_rescales_zero_fp32_masters(parity):
    for rank in parity:
        qk = rank["qk"]
        assert qk["clipped_heads"] > 0
        assert qk["master_changed"] > 1e-4  # the clip moved the master weights...
        assert qk["master_vs_expected"] <= 1e-6  # ...by exactly the per-row clip factors
        assert qk["working_vs_master"] == 0.0  # and the next forward reads the clipped weights
