"""Tile sizes and launch configurations shared by the Triton expert kernels.

Two regimes. Under the Triton interpreter (CPU tests) every program runs serially in Python, so we
use one small fixed tile that still forces tails, several K iterations and blocks straddling
expert boundaries on tiny shapes. On a GPU the M tile is fixed per call by `block_m` (the routing
metadata is built for it, so it cannot be left to the autotuner) and the autotuner picks the rest.
"""

import os

import torch
import triton
import triton.language as tl
from triton import knobs


def interpreting() -> bool:
    """True when kernels run on CPU tensors through `TRITON_INTERPRET=1`."""
    return bool(knobs.runtime.interpret)


# Interpreter tile: 16 rows so blocks straddle expert boundaries often; 32 wide so hidden sizes of
# 24-48 give a masked tail and, for K = 48, two K iterations.
INTERP_BM, INTERP_BN, INTERP_BK = 16, 32, 32


def block_m(num_rows: int, num_experts: int) -> int:
    """M tile of the grouped GEMMs. 128 keeps wgmma fed; 64 when experts average under ~2 tiles of
    rows, where half-empty 128-row blocks would waste more than the smaller tile costs."""
    if interpreting():
        return INTERP_BM
    return 128 if num_rows >= 192 * num_experts else 64


def gemm_configs(dual: bool):
    """Candidates for the row-gathered grouped GEMM. `dual` kernels (gate and up together) hold two
    accumulators, so their N tile is half as wide for the same register budget. The 256-wide tile
    (128 + 128 when dual) also comes with 4 stages: 192 KiB of shared memory, under sm_90's 227.
    The three 8-warp tiles also come with the weights read through TMA (W_TMA). The last entry is
    small enough for fp32/fp64 operands, whose tiles take 2-4x the shared memory."""
    cfgs = []
    for bn, bk, warps, stages, tma in ((128, 64, 8, 4, False), (128, 64, 4, 4, False), (256, 64, 8, 3, False),
                                       (256, 64, 8, 4, False), (64, 64, 4, 5, False),
                                       (128, 64, 8, 4, True), (256, 64, 8, 3, True), (256, 64, 8, 4, True)):
        if dual:
            bn //= 2
        cfgs.append(triton.Config({"BN": bn, "BK": bk, "GROUP_M": 8, "W_TMA": tma}, num_warps=warps, num_stages=stages))
    cfgs.append(triton.Config({"BN": 32, "BK": 32, "GROUP_M": 8, "W_TMA": False}, num_warps=4, num_stages=2))
    return cfgs


def _tiny(size: int) -> bool:
    """Test-sized weights (under 1M elements): benchmarking tile shapes would cost more compile time
    than any run saves, so only the last (smallest) candidate is kept."""
    return size < 1 << 20


def tma_enabled() -> bool:
    """`KIMI_KERNEL_TMA=0` drops the TMA candidates from the autotuner: a switch for an operator
    whose GPU, driver or Triton fails them, that needs no code change."""
    return os.environ.get("KIMI_KERNEL_TMA", "1") != "0"


def prune_gemm(configs, named_args, **kwargs):
    # Triton passes the positional arguments as named_args and the keyword ones apart.
    if _tiny(named_args["N"] * named_args["KD"]):
        return configs[-1:]
    tma = kwargs["W_TMA_OK"] and tma_enabled()
    return [c for c in configs if tma or not c.kwargs["W_TMA"]]


def prune_wgrad(configs, named_args, **kwargs):
    # Triton passes the positional arguments as named_args and the keyword ones apart.
    if _tiny(named_args["M"] * named_args["N"]):
        return configs[-1:]
    tma = kwargs["TMA_OK"] and tma_enabled()
    return [c for c in configs if tma or not c.kwargs["SORTED_TMA"]]


def tma_compatible(t: torch.Tensor, strides=None) -> bool:
    """Whether `t`, addressed with `strides` (default its own), can back a TMA descriptor: a
    16-byte aligned base (not a given for a view into a flat buffer, e.g. DeepSpeed's), one unit
    stride, and every other stride a multiple of 16 bytes."""
    strides = tuple(t.stride() if strides is None else strides)
    size = t.element_size()
    return (t.data_ptr() % 16 == 0 and 1 in strides
            and sum(s == 1 for s in strides) == 1 and all(s * size % 16 == 0 for s in strides if s != 1))


def _torch_scratch(size: int, alignment: int, stream):
    # PyTorch's caching allocator: its blocks are aligned well past the 128 bytes a descriptor needs.
    return torch.empty(size, device="cuda", dtype=torch.int8)


def use_triton_allocator() -> None:
    """Kernels that build TMA descriptors on the device need scratch memory from Triton's allocator.
    Give it PyTorch's unless the caller set one. Called before each such launch: Triton keeps the
    allocator in a ContextVar, so it is per thread, and autograd runs backward on its own threads."""
    from triton.runtime import _allocation  # no public getter for the current allocator
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)


def launch(kernel, tuned, grid, args, consts, config=None):
    """Run the autotuner's pick, or `config` on the plain kernel when one is given (a test's
    candidate, or the interpreter's tile). `grid(meta)` sizes the launch from the tile either way."""
    if not interpreting():
        use_triton_allocator()
    if config is None:
        tuned[grid](*args, **consts)
    else:
        kernel[grid(config.kwargs)](*args, **consts, **config.kwargs,
                                    num_warps=config.num_warps, num_stages=config.num_stages)


def wgrad_configs():
    """Candidates for the per-expert weight-gradient GEMM (output tile BM x BN, reduction over rows).
    Each tile shape is tried with the tokens loaded in the iteration that uses them (ahead=False:
    about half of num_stages become buffers, so 7 stages give 4) and one iteration ahead (all
    num_stages are buffers), and the 128x128 and 128x256 tiles also with the sorted operand read
    through TMA (tma=True); see `kimi_kernels.experts.wgrad`."""
    cfgs = [
        triton.Config({"BM": bm, "BN": bn, "BK": bk, "TOKENS_AHEAD": ahead, "SORTED_TMA": tma},
                      num_warps=w, num_stages=s)
        for bm, bn, bk, w, s, ahead, tma in (
            (128, 128, 64, 8, 4, False, False), (128, 128, 64, 8, 7, False, False), (128, 128, 64, 8, 4, True, False),
            (128, 128, 64, 8, 4, True, True), (128, 128, 64, 8, 7, False, True),
            (128, 256, 64, 8, 3, False, False), (128, 256, 64, 8, 5, False, False), (128, 256, 64, 8, 4, True, False),
            (128, 256, 64, 8, 4, True, True),
            (128, 128, 32, 4, 4, False, False), (64, 128, 64, 4, 4, False, False))
    ]
    cfgs.append(triton.Config({"BM": 32, "BN": 32, "BK": 32, "TOKENS_AHEAD": False, "SORTED_TMA": False},
                              num_warps=4, num_stages=2))
    return cfgs


def dot_types(dtype: torch.dtype):
    """Accumulator and tl.dot precision for operands of `dtype`: fp32 operands multiply in full fp32
    (tests compare them tightly; training runs bf16 anyway), fp64 (gradcheck) accumulates in fp64."""
    if dtype == torch.float64:
        return tl.float64, "ieee"
    return tl.float32, "ieee" if dtype == torch.float32 else "tf32"
