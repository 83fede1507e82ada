"""The expert FFN's per-stage choice between our Triton kernels and torch._grouped_mm (kimi_kernels.experts.stage_choice).

On CPU the Triton stages run in the interpreter and torch._grouped_mm natively, so every mix of the two is
checked against the PyTorch reference here; the timing that picks between them is exercised with an
injected timer (timings of interpreted kernels would mean nothing). On CUDA the same tests run natively.
"""

import warnings

import pytest
import torch

from kimi_kernels.testing import (DEVICE, check_ffn_against_reference, check_kernels_interpreted, make_problem,
                             use_interpreter_without_cuda)

use_interpreter_without_cuda()
import kimi_kernels.experts.triton_ffn as triton_ffn  # noqa: E402  (after the interpreter switch)
from kimi_kernels.experts import grouped_mm_stages, stage_choice  # noqa: E402

DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # what _grouped_mm takes on each
CASES = [
    # (T, K, E, D, F, routing): D and F multiples of 4 (16-byte fp32 rows, as _grouped_mm needs)
    (19, 3, 5, 24, 20, "random"),
    (33, 1, 4, 48, 40, "random"),  # K = 1: no combine
    (21, 2, 9, 24, 36, "empty_experts"),  # experts without rows: zero weight gradients
    (1, 4, 4, 24, 20, "random"),
]
MIXES = ["grouped_mm",
         "gate_up=grouped_mm,down=triton,swiglu_backward=grouped_mm,dx=triton,wgrad_gate_up=triton,wgrad_down=grouped_mm",
         "gate_up=triton,down=grouped_mm,swiglu_backward=triton,dx=grouped_mm,wgrad_gate_up=grouped_mm,wgrad_down=triton"]


@pytest.fixture(autouse=True)
def _fresh():
    check_kernels_interpreted()
    stage_choice.reset()
    yield
    stage_choice.reset()


def _check(T, K, E, D, F, routing, dtype=DTYPE):
    check_ffn_against_reference(triton_ffn.expert_ffn_triton, T, K, E, D, F, routing, dtype)


@pytest.mark.parametrize("mix", MIXES, ids=["all-grouped_mm", "mix-a", "mix-b"])
@pytest.mark.parametrize("T,K,E,D,F,routing", CASES)
def test_any_mix_of_stages_matches_reference(T, K, E, D, F, routing, mix):
    x, _, _, gate_up, down = make_problem(T, K, E, D, F, DTYPE, routing)
    assert grouped_mm_stages.available(x, gate_up, down)
    with stage_choice.forced(mix):
        _check(T, K, E, D, F, routing)


def test_auto_keeps_the_faster_per_stage_and_times_once(monkeypatch):
    """A fake timer says _grouped_mm wins the two weight-gradient stages and loses the rest."""
    timed = []

    def timer_for(stage):
        def seconds(fn):  # run calls it with our kernel first, then with _grouped_mm
            fn()
            timed.append(stage)
            ours = timed.count(stage) % 2 == 1
            return 1.0 if ours else (0.5 if stage.startswith("wgrad") else 2.0)
        return seconds

    real_run = stage_choice.run

    def run_with_timer(stage, key, triton_fn, grouped_fn, grouped_ok, timer=None):
        return real_run(stage, key, triton_fn, grouped_fn, grouped_ok, timer=timer_for(stage))

    monkeypatch.setattr(stage_choice, "run", run_with_timer)
    with stage_choice.forced("auto"):
        _check(19, 3, 5, 24, 20, "random")
        assert len(timed) == 2 * len(stage_choice.STAGES)  # each candidate of each stage, once
        picks = {key.split()[0]: c["chosen"] for key, c in stage_choice.choices().items()}
        assert picks == {s: "grouped_mm" if s.startswith("wgrad") else "triton" for s in stage_choice.STAGES}
        _check(19, 3, 5, 24, 20, "random")  # the same key again: no new timing
        assert len(timed) == 2 * len(stage_choice.STAGES)
        _check(300, 3, 5, 24, 20, "random")  # 900 rows: another bucket, timed anew
        assert len(timed) == 4 * len(stage_choice.STAGES)


def test_a_failing_grouped_mm_is_dropped_with_a_warning():
    calls = {"triton": 0}

    def ours():
        calls["triton"] += 1
        return "ours"

    def broken():
        raise RuntimeError("grouped gemm is not supported on this device\nmore")

    with stage_choice.forced("auto"):
        with pytest.warns(UserWarning, match="wgrad_down: torch._grouped_mm failed .grouped gemm is not supported"):
            assert stage_choice.run("wgrad_down", ("k",), ours, broken, True, timer=lambda fn: (fn(), 1.0)[1]) == "ours"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # decided: no second attempt, no second warning
            assert stage_choice.run("wgrad_down", ("k",), ours, broken, True, timer=lambda fn: 1 / 0) == "ours"
    assert stage_choice.choices() == {"wgrad_down k": {"chosen": "triton", "seconds": {"triton": 1.0, "grouped_mm": None}}}


def test_operands_grouped_mm_cannot_take_run_our_kernels():
    """fp16 rows of F = 20 are 40 bytes, not a multiple of 16: forced grouped_mm still gives the right answer."""
    x, _, _, gate_up, down = make_problem(19, 3, 5, 24, 20, torch.float16)
    assert not grouped_mm_stages.available(x, gate_up, down)
    with stage_choice.forced("grouped_mm"):
        _check(19, 3, 5, 24, 20, "random", torch.float16)
    x64 = torch.zeros(4, 24, dtype=torch.float64)
    assert not grouped_mm_stages.available(x64, torch.zeros(2, 40, 24, dtype=torch.float64),
                                           torch.zeros(2, 24, 20, dtype=torch.float64))
    x = torch.zeros(4, 24)
    misaligned = torch.zeros(2 * 40 * 24 + 1)[1:].view(2, 40, 24)  # a view 4 bytes into a flat buffer
    assert not grouped_mm_stages.available(x, misaligned, torch.zeros(2, 24, 20))


def test_settings_parse_and_reject_bad_values(monkeypatch):
    assert stage_choice.parse(None) == dict.fromkeys(stage_choice.STAGES, "triton" if DEVICE == "cpu" else "auto")
    assert stage_choice.parse("grouped_mm") == dict.fromkeys(stage_choice.STAGES, "grouped_mm")
    assert stage_choice.parse("dx=triton")["dx"] == "triton"
    assert stage_choice.parse("dx=triton")["wgrad_down"] == "auto"
    with pytest.raises(ValueError, match="stage 'wgrad' is not one of"):
        stage_choice.parse("wgrad=triton")
    with pytest.raises(ValueError, match="dx='cublas'; valid: auto, triton, grouped_mm"):
        stage_choice.parse("dx=cublas")
    with pytest.raises(ValueError, match="KIMI_EXPERT_STAGES='fast'"):
        with stage_choice.forced("fast"):
            pass
    monkeypatch.setenv("KIMI_EXPERT_STAGES", "wgrad_gate_up=grouped_mm")
    assert stage_choice.modes()["wgrad_gate_up"] == "grouped_mm"
    with stage_choice.forced("triton"):
        assert stage_choice.modes()["wgrad_gate_up"] == "triton"  # the innermost setting wins
