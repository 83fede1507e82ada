"""The kernels as the compiler builds them for an H100 (sm_90), read on any machine.

`kimi_kernels.compile_report` compiles every launch of one forward+backward at the benchmark's K2 shape
with Triton's own ptxas, so these checks need no GPU. They hold the kernel code to what it was
changed for, judged by the compiler's output rather than by our own arithmetic: the weight-gradient
kernel's operand tiles get every pipeline stage as a buffer when their tokens are loaded ahead, and
the SwiGLU backward's epilogue no longer spills kilobytes of registers.
"""

import json
import os
import subprocess
import sys

import pytest


def _run_report(out, *flags, **env_vars):
    # Its own process: the kernel tests switch this one to the Triton interpreter, which cannot compile.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env_vars
    subprocess.run([sys.executable, "-m", "kimi_kernels.compile_report", "--out", str(out), *flags], env=env, check=True,
                   capture_output=True, text=True, timeout=900)
    return json.loads(out.read_text())["results"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return _run_report(tmp_path_factory.mktemp("compile") / "report.json")


def test_every_launch_of_a_forward_backward_is_compiled(report):
    launches = {row["launch"] for row in report}
    assert launches == {"gate_up_swiglu", "down", "combine", "swiglu_bwd", "dx", "wgrad_gate_up", "wgrad_down"}
    assert all(row["regs"] > 0 and row["smem"] >= 0 for row in report)


def test_wgrad_tokens_ahead_buffers_every_stage(report):
    ahead = [row for row in report if row["launch"].startswith("wgrad") and row["config"]["TOKENS_AHEAD"]]
    assert len(ahead) == 8  # two tile shapes, pointer or TMA loads, two weight gradients
    for row in ahead:
        assert row["buffers"] == [row["config"]["num_stages"]] * 2, row


def test_swiglu_backward_epilogue_does_not_spill_kilobytes(report):
    # The 8-warp 128-wide tile is what the autotuner picked on an H100. With the epilogue on the
    # whole tile it spilled 1320 B per thread (Triton 3.6) to 1760 B (3.9); on two halves, 0-88 B.
    rows = [r for r in report if r["launch"] == "swiglu_bwd" and r["config"]["BN"] == 128
            and r["config"]["num_warps"] == 8]
    assert len(rows) == 2  # weights through pointers or TMA
    for row in rows:
        assert row["spill"] < 256, row


def test_tma_candidates_copy_through_tma(report):
    # Pointer loads would compile too; only the compiler's TMA copies show the descriptor path is real.
    def tma(config):
        return bool(config.get("W_TMA") or config.get("SORTED_TMA"))
    for launch in ("gate_up_swiglu", "down", "swiglu_bwd", "dx", "wgrad_gate_up", "wgrad_down"):
        rows = [row for row in report if row["launch"] == launch]
        assert {tma(row["config"]) for row in rows} == {True, False}, launch
        for row in rows:
            assert (row["tma"] > 0) == tma(row["config"]), row


def test_wgrad_tma_candidates_are_pruned_for_unaligned_rows(tmp_path):
    # F = 2044: w*act's bf16 rows are 4088 bytes, not a multiple of 16, so no TMA descriptor can
    # cover them. The pruning runs through Triton's own autotuner code, as on a GPU.
    rows = _run_report(tmp_path / "report.json", "-F", "2044", "--only", "wgrad_down")
    assert rows and not any(row["config"]["SORTED_TMA"] for row in rows)


def test_kimi_kernel_tma_0_drops_every_tma_candidate(tmp_path):
    rows = _run_report(tmp_path / "report.json", "--only", "dx,wgrad_down", KIMI_KERNEL_TMA="0")
    assert {row["launch"] for row in rows} == {"dx", "wgrad_down"}
    assert not any(row["config"].get("W_TMA") or row["config"].get("SORTED_TMA") or row["tma"] for row in rows)


def test_rms_norm_compiles_for_k2_hidden_size_without_spills(tmp_path):
    out = tmp_path / "norm.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "kimi_kernels.compile_report", "--only", "rms", "--out", str(out)], env=env,
                   check=True, capture_output=True, text=True, timeout=900)
    rows = json.loads(out.read_text())["norm"]
    assert {row["launch"] for row in rows} == {"rms_fwd", "rms_bwd"}
    assert all(row["spill"] == 0 for row in rows), rows
