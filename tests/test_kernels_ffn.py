"""The Triton expert FFN end to end against the PyTorch reference, forward and backward.

Runs every kernel through the Triton interpreter on CPU, natively on CUDA (bf16 too) when present.
Shape legend: T tokens, K experts per token, E experts, D hidden, F expert FFN width.
"""

import pytest
import torch

import kimi_kernels
from kimi_kernels.testing import (DEVICE, check_ffn_against_reference, check_kernels_interpreted, dtype_params,
                             make_problem, use_interpreter_without_cuda)

use_interpreter_without_cuda()
import kimi_kernels.experts.triton_ffn as triton_ffn  # noqa: E402  (after the interpreter switch)

CASES = [
    # (T, K, E, D, F, routing)
    (19, 3, 5, 24, 20, "random"),  # odd D and F: column tails; A = 57 is no multiple of any block
    (33, 1, 4, 48, 40, "random"),  # K = 1: output written by the GEMM, no combine; D = 48: 2 K steps
    (40, 2, 8, 40, 24, "one_expert"),  # all tokens on the same 2 experts, 6 experts empty
    (21, 2, 9, 24, 36, "empty_experts"),  # empty experts between busy ones
    (1, 4, 4, 24, 20, "random"),  # T = 1, K = E: one token visits every expert
    (64, 2, 8, 24, 20, "balanced"),  # exactly 16 rows per expert: whole blocks only
    (0, 2, 4, 24, 20, "random"),  # no rows (an expert-parallel rank that received nothing)
]
BIG_E = (16, 8, 384, 16, 16, "skewed")  # E = 384, k = 8: most experts empty, many block boundaries
DTYPES = dtype_params()


@pytest.fixture(scope="module", autouse=True)
def _interpreted():
    check_kernels_interpreted()


def _compare(T, K, E, D, F, routing, dtype):
    check_ffn_against_reference(triton_ffn.expert_ffn_triton, T, K, E, D, F, routing, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,E,D,F,routing", CASES)
def test_forward_backward_matches_reference(T, K, E, D, F, routing, dtype):
    _compare(T, K, E, D, F, routing, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_384_experts_top8(dtype):
    _compare(*BIG_E, dtype)


def test_zero_tokens_give_zero_weight_grads():
    x, ids, w, gate_up, down = make_problem(0, 2, 4, 24, 20, torch.float32)
    y = triton_ffn.expert_ffn_triton(x, ids, w, gate_up, down)
    y.sum().backward()
    assert y.shape == (0, 24)
    assert torch.equal(gate_up.grad, torch.zeros_like(gate_up)) and torch.equal(down.grad, torch.zeros_like(down))


@pytest.mark.parametrize("routing", ["random", "empty_experts"])
def test_gradcheck_fp64(routing):
    """Analytic gradients (our backward kernels) against finite differences of our forward kernels."""
    x, ids, w, gate_up, down = make_problem(11, 2, 5, 20, 18, torch.float64, routing)
    assert torch.autograd.gradcheck(lambda *t: triton_ffn.expert_ffn_triton(t[0], ids, *t[1:]),
                                    (x, w, gate_up, down), fast_mode=True, atol=1e-8, rtol=1e-6)


def test_no_grad_forward_matches_training_forward():
    """Inference skips storing h; the output must not change."""
    x, ids, w, gate_up, down = make_problem(19, 3, 5, 24, 20, torch.float32)
    with torch.no_grad():
        y0 = triton_ffn.expert_ffn_triton(x, ids, w, gate_up, down)
    assert torch.equal(y0, triton_ffn.expert_ffn_triton(x, ids, w, gate_up, down).detach())


def test_bad_shapes_are_reported():
    x, ids, w, gate_up, down = make_problem(4, 2, 4, 24, 20, torch.float32)
    with pytest.raises(ValueError, match="want \\[E, D, F\\]"):
        triton_ffn.expert_ffn_triton(x, ids, w, gate_up, down.transpose(1, 2))
    with pytest.raises(TypeError, match="one dtype"):
        triton_ffn.expert_ffn_triton(x, ids, w, gate_up.half(), down)


def test_dispatch_picks_backend_by_device(monkeypatch):
    """One place chooses: CUDA -> Triton, CPU -> grouped-GEMM CPU path, KIMI_EXPERT_FFN=reference -> reference."""
    calls = []
    monkeypatch.setattr(triton_ffn, "expert_ffn_triton", lambda *a: calls.append("triton") or a[0])
    monkeypatch.setattr(kimi_kernels, "expert_ffn_cpu", lambda *a: calls.append("cpu") or a[0])
    monkeypatch.setattr(kimi_kernels, "expert_ffn_reference", lambda *a: calls.append("reference") or a[0])
    args = make_problem(4, 2, 4, 24, 20, torch.float32, device="cpu")
    kimi_kernels.expert_ffn(*args)
    expected = ["cpu"]
    if torch.cuda.is_available():
        cuda_args = make_problem(4, 2, 4, 24, 20, torch.float32, device="cuda")
        kimi_kernels.expert_ffn(*cuda_args)
        expected += ["triton"]
    monkeypatch.setenv("KIMI_EXPERT_FFN", "reference")
    kimi_kernels.expert_ffn(*args)
    expected += ["reference"]
    if torch.cuda.is_available():
        kimi_kernels.expert_ffn(*cuda_args)
        expected += ["reference"]
    assert calls == expected


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA: checks forward+backward never synchronise with the host")
def test_no_host_sync_in_forward_backward():
    x, ids, w, gate_up, down = make_problem(512, 8, 64, 256, 128, torch.bfloat16, "skewed")
    triton_ffn.expert_ffn_triton(x, ids, w, gate_up, down).sum().backward()  # compile + autotune first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = triton_ffn.expert_ffn_triton(x, ids, w, gate_up, down)
        torch.autograd.backward(y, torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
