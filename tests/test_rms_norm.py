"""The Triton RMSNorm (kimi_kernels/norm/rms_norm_triton.py) against its PyTorch reference and torch's F.rms_norm.

Runs through the Triton interpreter on CPU (bf16 included: no tl.dot here), natively on CUDA."""

import pytest
import torch
import torch.nn.functional as F

import kimi_kernels
from kimi_kernels.norm.rms_norm_reference import rms_norm_reference
from kimi_kernels.testing import DEVICE, use_interpreter_without_cuda

use_interpreter_without_cuda()
import kimi_kernels.norm.rms_norm_triton as rn  # noqa: E402  (after the interpreter switch)

SHAPES = [(3, 5, 24), (1, 1), (7, 100), (2, 33, 64), (0, 16)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(shape, x_dtype, w_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(*shape, generator=g)).to(DEVICE, x_dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(DEVICE, w_dtype).requires_grad_()
    dy = torch.randn(*shape, generator=g).to(DEVICE, torch.promote_types(x_dtype, w_dtype))
    return x, w, dy


def _run(fn, x, w, dy, eps=1e-6):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fn(x, w, eps)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def _close(ours, ref, dtype, what):
    tol = TOL[dtype]
    scale = max(ref.abs().max().item(), 1e-3) if ref.numel() else 1.0
    torch.testing.assert_close(ours.double(), ref.double(), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def test_kernels_are_interpreted_on_cpu():
    if DEVICE == "cpu":
        assert type(rn._rms_fwd).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                              (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.float32)])
def test_matches_the_reference_forward_and_backward(shape, x_dtype, w_dtype):
    """Mixed (bf16 x, fp32 w) is the autocast case: the output is fp32, as the reference's."""
    x, w, dy = _inputs(shape, x_dtype, w_dtype)
    ours, ref = _run(rn.rms_norm_triton, x, w, dy), _run(rms_norm_reference, x, w, dy)
    assert ours[0].dtype == ref[0].dtype and ours[1].dtype == x_dtype and ours[2].dtype == w_dtype
    # fp64 reference on the same inputs: what both approximate.
    exact = _run(rms_norm_reference, x.double(), w.double(), dy.double())
    for name, o, r, e in zip(("y", "dx", "dw"), ours, ref, exact):
        _close(o, e, x_dtype, f"{name} vs fp64")
        _close(o, r, x_dtype, f"{name} vs reference")


def test_fp32_matches_torch_rms_norm():
    x, w, dy = _inputs((4, 9, 48), torch.float32, torch.float32, seed=3)
    ours = _run(rn.rms_norm_triton, x, w, dy, eps=1e-5)
    theirs = _run(lambda x, w, eps: F.rms_norm(x, (x.shape[-1],), w, eps), x, w, dy, eps=1e-5)
    for name, o, t in zip(("y", "dx", "dw"), ours, theirs):
        torch.testing.assert_close(o, t, rtol=1e-5, atol=1e-5, msg=name)


def test_strided_input_and_gradient():
    x, w, dy = _inputs((6, 40), torch.float32, torch.float32)
    wide = torch.randn(6, 80, device=DEVICE)
    view = wide[:, ::2].detach().requires_grad_()  # column stride 2
    ours = _run(rn.rms_norm_triton, view, w, dy.t().contiguous().t())
    ref = _run(rms_norm_reference, view, w, dy)
    for name, o, r in zip(("y", "dx", "dw"), ours, ref):
        _close(o, r, torch.float32, name)


def test_bad_weight_shape_names_both_shapes():
    x, w, _ = _inputs((2, 8), torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"weight \(7,\) must be \[D\] with D = x's last dim 8"):
        rn.rms_norm_triton(x, w[:7], 1e-6)


def test_dispatch_by_device_and_switch(monkeypatch):
    calls = []
    monkeypatch.setattr(rn, "rms_norm_triton", lambda *a: calls.append("triton") or a[0])
    monkeypatch.setattr(kimi_kernels, "rms_norm_reference", lambda *a: calls.append("reference") or a[0])
    x, w, _ = _inputs((2, 8), torch.float32, torch.float32)
    kimi_kernels.rms_norm(x.cpu(), w.cpu(), 1e-6)
    expected = ["reference"]
    if torch.cuda.is_available():
        kimi_kernels.rms_norm(x.cuda(), w.cuda(), 1e-6)
        monkeypatch.setenv("KIMI_RMSNORM", "reference")
        kimi_kernels.rms_norm(x.cuda(), w.cuda(), 1e-6)
        expected += ["triton", "reference"]
    assert calls == expected


def test_model_with_the_kernel_matches_the_reference_model(monkeypatch):
    """Every RMSNorm of a tiny model through the kernel (as on CUDA): the same loss and gradients."""
    import copy

    from moe.config import preset
    from moe.model import Transformer

    torch.manual_seed(0)
    base = Transformer(preset("tiny")).to(DEVICE).train()
    other = copy.deepcopy(base)
    tokens = torch.randint(0, base.cfg.vocab_size, (2, 17), device=DEVICE)
    monkeypatch.setattr(kimi_kernels, "rms_norm", rms_norm_reference)
    want = base(tokens, tokens)
    want.loss.backward()
    monkeypatch.setattr(kimi_kernels, "rms_norm", rn.rms_norm_triton)
    got = other(tokens, tokens)
    got.loss.backward()
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(base.named_parameters(), other.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
