"""Collectives whose buffers are freed on the caller's thread, for the 2-rank memory checks
(tests/dist/plan_memory_check.py, plan_pipeline_check.py).

Why the collectives are wrapped (`settle_collectives`): the profiler records a CPU allocation or free
only on the thread that runs it, the main one here. A buffer handed to gloo is also referenced by
the work item on gloo's worker thread, and whichever thread lets go last frees it: on the worker, the
free goes unrecorded and the buffer seems to live to the end of the step. That race moved the peak
of tiny ZeRO-2 by its whole 0.7 MB flat gradient (12%) between repeats of one step. Each wrapped
collective returns, and each wrapped work's wait() ends, only once the worker has dropped its
references (the tensors' use counts are back to what they were before the call), so every free
lands on the main thread, as soon as the caller lets go, as it does on a GPU's allocator.
"""

import functools
import time

import torch


def _tensor_args(args, kwargs) -> list[torch.Tensor]:
    found = []
    for a in (*args, *kwargs.values()):
        for t in (a if isinstance(a, (list, tuple)) else [a]):
            if torch.is_tensor(t):
                found.append(t)
    return found


def _use_count(t: torch.Tensor) -> int:
    return t._use_count()  # references to this TensorImpl: the caller's and the work item's


def _wait_released(tensors: list, before: list, limit_s: float = 1.0) -> None:
    """Spin until gloo's worker holds no reference to `tensors` (1 s at most: a caller's new view would
    keep a count up; the measurement is then what it was without the wrapper)."""
    deadline = time.monotonic() + limit_s
    while any(_use_count(t) > n for t, n in zip(tensors, before)) and time.monotonic() < deadline:
        time.sleep(0)


class _SettledWork:
    """An async collective's handle whose wait() also waits for the worker to let go of the tensors."""

    def __init__(self, work, tensors, before):
        self._work, self._tensors, self._before = work, tensors, before

    def wait(self, *args, **kwargs):
        if self._work is not None:
            result = self._work.wait(*args, **kwargs)
            self._work = None  # our handle's reference to the work item, and so to the tensors
            _wait_released(self._tensors, self._before)
            self._tensors = []
            return result
        return True

    def __getattr__(self, name):
        return getattr(self._work, name)


def _settled(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        tensors = _tensor_args(args, kwargs)
        before = [_use_count(t) for t in tensors]
        work = fn(*args, **kwargs)
        if not hasattr(work, "wait"):  # a blocking call: None, or recv's source rank
            _wait_released(tensors, before)
            return work
        return _SettledWork(work, tensors, before)
    call.settled = True
    return call


def settle_collectives() -> None:
    """Wrap the tensor collectives DeepSpeed and launch/parallel call, in both modules they are read from
    (deepspeed.comm keeps its all-gather and reduce-scatter functions from its init: call this first)."""
    for module in (torch.distributed, torch.distributed.distributed_c10d):
        for name in ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "_all_gather_base",
                     "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all",
                     "all_to_all_single", "send", "recv", "isend", "irecv"):
            if hasattr(module, name) and not hasattr(getattr(module, name), "settled"):
                setattr(module, name, _settled(getattr(module, name)))
