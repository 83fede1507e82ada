"""What the kernel tests and the benchmark share: where kernels run, synthetic routings, tolerances.

Shape legend: T tokens, K experts per token, E experts, A = T*K.

Tests run the same files in two modes. With CUDA they use it natively (bf16 included); without,
they run every kernel through the Triton interpreter on CPU tensors, which must be switched on
before the first `@triton.jit` in `kernels` executes. Test modules therefore call
`use_interpreter_without_cuda()` before importing any Triton-backed module of `kernels`.
"""

import functools
import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def use_interpreter_without_cuda() -> None:
    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        _check_interpreter_runs_loops()


@functools.cache
def _check_interpreter_runs_loops() -> None:
    """Triton's interpreter before the fix for triton-lang/triton#9171 (in 3.6, not in 3.9)
    turns a loop bound into a Python int with int() on a one-element array, which NumPy 2.4
    refuses: every kernel test with a `range` over a runtime argument would fail with an opaque
    InterpreterError. One tiny kernel says so once, with the way out, before any test runs."""
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def count(out_ptr, n):
        total = 0
        for _ in range(0, n, 1):
            total += 1
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count[(1,)](out, 3)
    except Exception as err:  # InterpreterError wraps the TypeError
        if "0-dimensional" not in str(err):
            raise
        raise RuntimeError(
            f"Triton {triton.__version__}'s interpreter cannot run a loop over a kernel argument under "
            f"NumPy {numpy.__version__} (triton-lang/triton#9171); install numpy<2.4 or a Triton with the "
            f"fix (3.9 has it)") from err


def check_kernels_interpreted() -> None:
    """Fail loudly if the kernels were compiled for a GPU we do not have (imported too early)."""
    from kimi_kernels.experts.grouped_gemm import _expert_gemm

    if DEVICE == "cpu" and type(_expert_gemm).__name__ != "InterpretedFunction":
        raise RuntimeError("kimi_kernels.experts.grouped_gemm was imported before TRITON_INTERPRET=1 was set; "
                           "call kimi_kernels.testing.use_interpreter_without_cuda() first")


def dtype_params():
    """fp32 and fp16 everywhere; bf16 only natively on CUDA (the interpreter's bf16 tl.dot is wrong,
    upstream triton issue 11584), so it is marked `gpu` and reported as skipped on CPU."""
    import pytest

    bf16 = pytest.param(torch.bfloat16, marks=[pytest.mark.gpu, pytest.mark.skipif(
        DEVICE != "cuda", reason="bf16 tl.dot is wrong in the Triton interpreter; runs on CUDA")])
    return [torch.float32, torch.float16, bf16]


# Relative tolerance per operand dtype, applied against an fp64 reference as
# atol = tol * max|ref|, rtol = tol. fp16/bf16 round act and h to 11/8 mantissa bits.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def assert_close_to(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    tol = TOLERANCE[dtype]
    scale = ref.abs().max().item() if ref.numel() else 1.0
    torch.testing.assert_close(ours.double().cpu(), ref.double().cpu(), rtol=tol, atol=tol * max(scale, 1e-3),
                               msg=lambda m: f"{what} ({dtype}): {m}")


# ---- routings ---------------------------------------------------------------------------------

def random_ids(T, K, E, gen):
    """Each token picks K distinct experts uniformly."""
    return torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K]


def balanced_ids(T, K, E, gen):
    """Exactly T*K/E assignments per expert when E divides T*K: assignment a goes to expert a mod E
    (distinct within a token since K <= E), then tokens are shuffled and experts relabelled."""
    ids = torch.arange(T * K).view(T, K) % E
    return torch.randperm(E, generator=gen)[ids[torch.randperm(T, generator=gen)]]


def skewed_ids(T, K, E, gen, alpha=1.2):
    """Zipf-like popularity (expert rank r has weight r^-alpha), K distinct experts per token."""
    p = torch.arange(1, E + 1, dtype=torch.float64) ** -alpha
    return torch.multinomial(p[torch.randperm(E, generator=gen)].expand(T, E), K, generator=gen)


def one_expert_ids(T, K, E, gen):
    """Every token on the same K experts (all on one expert when K = 1); the rest get nothing."""
    hot = torch.randperm(E, generator=gen)[:K]
    return hot.expand(T, K).clone()


def empty_experts_ids(T, K, E, gen):
    """Only the even experts receive tokens (needs K <= ceil(E/2)): empty experts between full ones."""
    even = torch.arange(0, E, 2)
    return even[torch.rand(T, even.numel(), generator=gen).argsort(dim=1)[:, :K]]


ROUTINGS = {"random": random_ids, "balanced": balanced_ids, "skewed": skewed_ids,
            "one_expert": one_expert_ids, "empty_experts": empty_experts_ids}


def make_problem(T, K, E, D, F, dtype, routing="random", seed=0, device=DEVICE, requires_grad=True):
    """x [T, D], topk_ids [T, K], topk_weights [T, K], gate_up [E, 2F, D], down [E, D, F] at unit output scale."""
    gen = torch.Generator().manual_seed(seed)
    ids = ROUTINGS[routing](T, K, E, gen).to(torch.int64)
    x = torch.randn(T, D, generator=gen, dtype=torch.float64)
    w = torch.rand(T, K, generator=gen, dtype=torch.float64)
    gate_up = torch.randn(E, 2 * F, D, generator=gen, dtype=torch.float64) / D**0.5
    down = torch.randn(E, D, F, generator=gen, dtype=torch.float64) / F**0.5
    tensors = [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (x, w, gate_up, down)]
    x, w, gate_up, down = tensors
    return x, ids.to(device), w, gate_up, down


def ffn_grads(fn, x, ids, w, gate_up, down, dy):
    """(y, dx, dw, dgate_up, ddown) of an expert FFN for output gradient dy (None gradients when y is empty)."""
    y = fn(x, ids, w, gate_up, down)
    return (y, *torch.autograd.grad(y, (x, w, gate_up, down), dy)) if y.numel() else (y, None, None, None, None)


def check_ffn_against_reference(fn, T, K, E, D, F, routing, dtype):
    """fn's output and its four gradients on make_problem's problem, against the fp64 reference."""
    from kimi_kernels.experts.reference import expert_ffn_reference

    x, ids, w, gate_up, down = make_problem(T, K, E, D, F, dtype, routing)
    dy = torch.randn(T, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(DEVICE, dtype)
    ours = ffn_grads(fn, x, ids, w, gate_up, down, dy)
    ref64 = [t.detach().double().requires_grad_() for t in (x, w, gate_up, down)]
    ref = ffn_grads(expert_ffn_reference, ref64[0], ids, ref64[1], ref64[2], ref64[3], dy.double())
    for name, o, r in zip(("y", "dx", "dw", "dgate_up", "ddown"), ours, ref):
        if r is None:
            continue
        assert o.dtype == dtype and o.shape == r.shape, name
        assert_close_to(o, r, dtype, name)
