"""Per stage of the Triton expert FFN, run our kernel or torch._grouped_mm, whichever is faster here.

Issue 4's figures put our forward+backward at about 1.02x torch._grouped_mm, with the weight-gradient
kernels the slowest stages, so on some shapes _grouped_mm may win a stage. Rather than leave the
user the slower one, each stage (STAGES) times both on its first call for a shape and keeps the
faster, as Triton's autotuner does for tile sizes. Our path is then never slower, stage by stage,
than the better of the two (up to what fusing a neighbour saves: the _grouped_mm stages in
`kimi_kernels.experts.grouped_mm_stages` gather, scatter and apply SwiGLU as separate ops).

`KIMI_EXPERT_STAGES` sets it, without code changes:
    auto          time both on the first call for each shape, keep the faster (default on a GPU)
    triton        our kernels only (the default under the Triton interpreter, where timing
                  interpreted kernels would say nothing)
    grouped_mm    torch._grouped_mm wherever it takes the operands
    wgrad_down=grouped_mm,dx=triton,...   per stage; stages not named stay auto
Where _grouped_mm cannot take the operands (fp64, fp16/fp32 on CUDA, pre-sm90 GPUs, rows not a
multiple of 16 bytes; `kimi_kernels.experts.grouped_mm_stages.available`), the stage runs our kernel.

The choice is per (stage, device, dtype, E, D, F, rows rounded up to a power of two): a batch whose
rows change a little keeps its choice. Timing syncs the device once per new key, like the
autotuner. A candidate that raises while being timed (an unsupported GPU, for instance) is dropped
for that key, with a warning. `choices()` reports every key's pick and times, for benchmarks.
Different processes may choose differently; their results agree to rounding, not to the bit (as
different tile sizes do).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
import warnings

import torch

from kimi_kernels.tiles import interpreting

STAGES = ("gate_up", "down", "swiglu_backward", "dx", "wgrad_gate_up", "wgrad_down")
IMPLS = ("triton", "grouped_mm")
MODES = ("auto", *IMPLS)
ENV = "KIMI_EXPERT_STAGES"

_chosen: dict[tuple, str] = {}
_times: dict[tuple, dict[str, float | None]] = {}
_forced: list[str] = []  # `forced(...)` scopes, innermost last


def parse(text: str | None) -> dict[str, str]:
    """KIMI_EXPERT_STAGES's value -> {stage: mode} for every stage. None or "": the default."""
    default = "triton" if interpreting() else "auto"
    if not text:
        return dict.fromkeys(STAGES, default)
    if text in MODES:
        return dict.fromkeys(STAGES, text)
    modes = dict.fromkeys(STAGES, "auto")
    for item in text.split(","):
        stage, _, mode = item.strip().partition("=")
        if stage not in STAGES:
            raise ValueError(f"{ENV}={text!r}: stage {stage!r} is not one of {', '.join(STAGES)} "
                             f"(or give one of {', '.join(MODES)} for every stage)")
        if mode not in MODES:
            raise ValueError(f"{ENV}={text!r}: {stage}={mode!r}; valid: {', '.join(MODES)}")
        modes[stage] = mode
    return modes


@contextlib.contextmanager
def forced(text: str):
    """Within the block, choose as if KIMI_EXPERT_STAGES were `text` (benchmarks compare the modes)."""
    parse(text)  # bad text fails here, not at the first stage
    _forced.append(text)
    try:
        yield
    finally:
        _forced.pop()


def modes() -> dict[str, str]:
    return parse(_forced[-1] if _forced else os.environ.get(ENV))


def rows_bucket(rows: int) -> int:
    return 1 << max(0, rows - 1).bit_length()


def device_seconds(fn, reps: int = 3) -> float:
    """Median seconds of fn() over reps calls after one warm-up call, synchronising a GPU around each."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(stage: str, key: tuple, triton_fn, grouped_fn, grouped_ok: bool, timer=None):
    """Run the stage by its mode: triton_fn(), grouped_fn(), or (auto) the one that timed faster for
    this key, timing both with `timer(fn) -> seconds` (default `device_seconds`) on the key's first
    call. Both must be pure (they allocate their outputs), since auto runs them several times."""
    mode = modes()[stage]
    if mode == "triton" or not grouped_ok:
        return triton_fn()
    if mode == "grouped_mm":
        return grouped_fn()
    full = (stage, *key)
    pick = _chosen.get(full)
    if pick is None:
        candidates = {"triton": triton_fn, "grouped_mm": grouped_fn}
        timer = timer or device_seconds
        times = {}
        for name, fn in candidates.items():
            try:
                times[name] = timer(fn)
            except RuntimeError as err:  # e.g. a GPU or driver _grouped_mm does not support
                if name == "triton":
                    raise
                warnings.warn(f"expert FFN stage {stage}: torch._grouped_mm failed ({str(err).splitlines()[0]}); "
                              f"our kernel runs this stage for {key}")
                times[name] = None
        pick = min((n for n in times if times[n] is not None), key=times.__getitem__)
        _chosen[full], _times[full] = pick, times
    return (triton_fn if pick == "triton" else grouped_fn)()


def choices() -> dict[str, dict]:
    """Every timed key: the pick and each candidate's seconds (None: it failed)."""
    return {" ".join(map(str, key)): {"chosen": _chosen[key], "seconds": _times[key]} for key in _chosen}


def reset() -> None:
    """Forget every choice (tests; a benchmark that changes device state)."""
    _chosen.clear()
    _times.clear()
