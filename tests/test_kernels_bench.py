"""kimi_kernels.bench's reading of the autotuner, checked on CPU so a GPU session does not find a slip.

The benchmark itself needs CUDA; this checks how it reads Triton's Autotuner after a call: the
candidates' (median, p20, p80) timings, fastest first, a failed candidate (inf) as None.
"""

from types import SimpleNamespace

from kimi_kernels.testing import use_interpreter_without_cuda

use_interpreter_without_cuda()
import kimi_kernels.bench as bench  # noqa: E402


def test_autotune_timings_reads_the_tuner_that_ran(monkeypatch):
    ran, idle = SimpleNamespace(configs_timings={"old": [1.0]}), SimpleNamespace(configs_timings={"stale": [9.0]})
    monkeypatch.setattr(bench, "_tuners", lambda: {"ran": ran, "idle": idle})

    def call():  # what Triton's Autotuner.run leaves behind when it benchmarks a new key
        ran.configs_timings = {"BN: 128": [2.5, 2.4, 2.6], "BN: 256": [2.0, 1.9, 2.1], "BN: 512": [float("inf")] * 3}

    assert bench.autotune_timings(call) == {"BN: 256": 2.0, "BN: 128": 2.5, "BN: 512": None}
    assert bench.autotune_timings(lambda: None) == {}  # a cached key: nothing was timed


def test_forced_stages_sets_the_choice_for_the_call_only(monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "expert_ffn_triton", lambda *a: seen.append(bench.stage_choice.modes()["dx"]))
    bench.forced_stages("grouped_mm")(1, 2)
    bench.forced_stages("triton")(1, 2)
    assert seen == ["grouped_mm", "triton"] and bench.stage_choice.modes()["dx"] == "triton"  # interpreter default
