"""The Triton flash attention against our dumb reference and against torch's own attention.

Runs the kernels through the Triton interpreter on CPU, natively on CUDA (bf16 too) when present.
Shape legend: B batch, H heads, T sequence, Q query/key head dim, V value head dim.
Interpreter tiles (kimi_kernels.attention.flash_attention): forward and dQ own 32 query rows and walk 16 keys at a
time, dK/dV owns 32 keys and walks 16 queries.
"""

import pytest
import torch
import torch.nn.functional as F

from kimi_kernels.attention.attention_reference import attention_reference
from kimi_kernels.testing import DEVICE, assert_close_to, dtype_params, use_interpreter_without_cuda

use_interpreter_without_cuda()
import kimi_kernels.attention.flash_attention as fa  # noqa: E402  (after the interpreter switch)

CASES = [
    # (B, H, T, Q, V)
    (1, 1, 1, 24, 16),  # T = 1: one visible pair; every tile is 31/32 padding rows
    (2, 3, 37, 24, 16),  # odd T, a tail in every tile; batch and head strides; Q != V, Q not a power of two
    (1, 2, 64, 32, 16),  # T a multiple of every tile (whole tiles only); Q a power of two: no column tail
    (1, 2, 50, 40, 24),  # T = 50: the last query tile has 2 unmasked key tiles before the diagonal
    (2, 1, 17, 24, 40),  # one key past the first walked tile; V > Q
    (1, 2, 5, 12, 8),  # Q < 16: the second column tile is all padding; V < 16
]
DTYPES = dtype_params()


@pytest.fixture(scope="module", autouse=True)
def _interpreted():
    if DEVICE == "cpu" and type(fa._attn_fwd).__name__ != "InterpretedFunction":
        raise RuntimeError("kimi_kernels.attention.flash_attention was imported before TRITON_INTERPRET=1 was set")


def _inputs(B, H, T, Q, V, dtype, spread=1.0, seed=0):
    """q, k, v at unit scale (q times `spread`, which sharpens the softmax) and an upstream gradient.
    v is a strided view into a [B, T, H, Q + V] buffer, as MLA's kv_b_proj output gives it."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, Q, generator=gen, dtype=torch.float64) * spread
    kv = torch.randn(B, T, H, Q + V, generator=gen, dtype=torch.float64)
    dout = torch.randn(B, H, T, V, generator=gen, dtype=torch.float64)
    q = q.to(DEVICE, dtype).requires_grad_()
    kv = kv.to(DEVICE, dtype)
    k = kv[..., :Q].transpose(1, 2).contiguous().requires_grad_()
    # A non-contiguous leaf, strides (T*H*(Q+V), Q+V, H*(Q+V), 1): the kernels must honour strides.
    v = kv[..., Q:].transpose(1, 2).detach().requires_grad_()
    return q, k, v, dout.to(DEVICE, dtype)


def _run(fn, q, k, v, dout):
    out, max_H = fn(q, k, v)
    return (out, max_H, *torch.autograd.grad(out, (q, k, v), dout))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,T,Q,V", CASES)
def test_matches_reference_and_sdpa(B, H, T, Q, V, dtype):
    q, k, v, dout = _inputs(B, H, T, Q, V, dtype)
    scale = Q ** -0.5
    ours = _run(lambda *t: fa.flash_attention(*t, scale), q, k, v, dout)
    ref = _run(lambda *t: attention_reference(*t, scale), q, k, v, dout)
    # torch's attention in fp64 on the same (rounded) inputs: maths we did not write.
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True, scale=scale)
    sdpa = (out64, *torch.autograd.grad(out64, (q64, k64, v64), dout.double()))
    for name, o, r in zip(("out", "max_logit", "dq", "dk", "dv"), ours, ref):
        assert o.shape == r.shape and o.dtype == r.dtype, name
        assert_close_to(o, r, dtype, f"{name} vs reference")
    for name, o, s in zip(("out", "dq", "dk", "dv"), ours[:1] + ours[2:], sdpa):
        assert_close_to(o, s, dtype, f"{name} vs SDPA fp64")


@pytest.mark.parametrize("dtype", DTYPES)
def test_peaked_softmax_rescales_across_tiles(dtype):
    # Logits of +-30 or so: exp without the running max would overflow fp16's accumulator range,
    # and a missed rescale (alpha) between key tiles shows as a wrong output at once.
    q, k, v, dout = _inputs(1, 2, 45, 24, 16, dtype, spread=6.0, seed=1)
    scale = 24 ** -0.5
    ours = _run(lambda *t: fa.flash_attention(*t, scale), q, k, v, dout)
    ref = _run(lambda *t: attention_reference(*t, scale), q, k, v, dout)
    assert ref[1].min() > 10  # the case is as peaked as intended
    for name, o, r in zip(("out", "max_logit", "dq", "dk", "dv"), ours, ref):
        assert_close_to(o, r, dtype, name)


def test_max_logit_is_the_exact_causal_max_per_head():
    # fp32 inputs exactly representable products (small integers), so every dot is exact and the
    # kernel's max must equal the fp64 max over the visible pairs bit for bit, per head. A key past
    # the query's position holds the largest product of all: counting it would be the causal bug.
    gen = torch.Generator().manual_seed(3)
    B, H, T, Q, V = 2, 3, 37, 24, 16
    q = torch.randint(-3, 4, (B, H, T, Q), generator=gen).float()
    k = torch.randint(-3, 4, (B, H, T, Q), generator=gen).float()
    k[:, :, T - 1] = 3.0
    q[:, :, 0] = 3.0  # q_0 . k_{T-1} = 9 Q, the largest product, but s = T-1 > t = 0: not visible
    v = torch.randn(B, H, T, V, generator=gen)
    scale = 0.25  # a power of two: scaling is exact too
    _, max_H = fa.flash_attention(*(t.to(DEVICE) for t in (q, k, v)), scale)
    s_BHTT = torch.matmul(q.double(), k.double().transpose(-1, -2)).masked_fill(
        ~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    expected_H = (s_BHTT.amax(dim=(0, 2, 3)) * scale).float()
    assert torch.equal(max_H.cpu(), expected_H), (max_H, expected_H)
    assert (expected_H < 9 * Q * scale).all()
    assert max_H.dtype == torch.float32 and not max_H.requires_grad


def test_tiles_fit_the_kernels_assumptions():
    # The owned tile is a multiple of the walked one, or the unmasked loop would start inside the
    # diagonal tiles and count some pairs twice.
    for owned, walked, configs in (("BM", "BN", fa.FWD_CONFIGS + fa.DQ_CONFIGS + [fa.INTERP_FWD, fa.INTERP_DQ]),
                                   ("BN", "BM", fa.DKDV_CONFIGS + [fa.INTERP_DKDV])):
        for c in configs:
            assert c.kwargs[owned] % c.kwargs[walked] == 0, c
    # Q's two column tiles cover it with powers of two >= 16 and waste no tile at MLA's Q = 192.
    for Q in (1, 12, 16, 24, 32, 40, 100, 128, 192, 256):
        qa, qb = fa.q_tiles(Q)
        assert qa >= 16 and qb >= 16 and qa & (qa - 1) == 0 and qb & (qb - 1) == 0 and qa + qb >= Q
        assert Q <= 16 or qa < Q  # the second tile holds real columns unless Q fits the least tile
    assert fa.q_tiles(192) == (128, 64)


@pytest.mark.parametrize("i", range(max(map(len, (fa.FWD_CONFIGS, fa.DQ_CONFIGS, fa.DKDV_CONFIGS)))))
def test_every_gpu_candidate_at_mla_head_dims(i):
    # The autotuner times its candidates but never checks them: run each tile (cycling through the
    # shorter lists) at Q = 192, V = 128, where Q splits into 128 + 64 column tiles. T = 161 leaves a
    # tail in every candidate's tiles. Under the interpreter in fp16; natively in bf16.
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    fwd, dq, dkdv = (c[i % len(c)] for c in (fa.FWD_CONFIGS, fa.DQ_CONFIGS, fa.DKDV_CONFIGS))
    q, k, v, dout = _inputs(1, 1, 161, 192, 128, dtype, seed=i)
    scale = 192 ** -0.5
    out, lse, top = fa.attention_forward(q, k, v, scale, config=fwd)
    grads = fa.attention_backward(dout, q, k, v, out, lse, scale, dq_config=dq, dkdv_config=dkdv)
    ref = _run(lambda *t: attention_reference(*t, scale), q, k, v, dout)
    assert_close_to(out, ref[0], dtype, f"out {fwd}")
    assert_close_to(top.amax(dim=(0, 2)) * scale, ref[1], dtype, f"max logit {fwd}")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref[2:]):
        assert_close_to(g, r, dtype, f"{name} {dq} {dkdv}")


def test_output_is_a_view_of_token_major_memory_and_v_is_not_copied():
    # MLA reshapes out [B, H, T, V] to [B, T, H*V] next: the kernel writes that layout so it is a view.
    q, k, v, _ = _inputs(2, 3, 5, 24, 16, torch.float32)
    out, _ = fa.flash_attention(q, k, v, 0.2)
    assert out.transpose(1, 2).is_contiguous()
    # v is saved as the strided view it came as, not a copy: selective recompute
    # (launch.parallel.recompute) frees kv_b_proj's output after MLA's forward only in that case.
    saved_v = out.grad_fn.saved_tensors[2]
    assert saved_v.data_ptr() == v.data_ptr() and saved_v.stride() == v.stride() and not v.is_contiguous()


def test_errors_name_the_problem():
    q = torch.zeros(1, 2, 4, 24, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        fa.flash_attention(q.double(), q.double(), q.double(), 0.2)
    with pytest.raises(ValueError, match=r"v \(1, 2, 3, 16\)"):
        fa.flash_attention(q, q, torch.zeros(1, 2, 3, 16, device=DEVICE), 0.2)
    with pytest.raises(ValueError, match="T = 0"):
        fa.flash_attention(q[:, :, :0], q[:, :, :0], q[:, :, :0], 0.2)


def test_mla_records_the_kernels_max_and_matches_the_sdpa_path(monkeypatch):
    # The dispatch picks the kernel only for CUDA tensors; here it is forced onto the interpreter so
    # MLA's use of the by-product (and of the token-major output view) is checked on CPU too.
    from moe.attention import MLA
    from moe.config import preset
    from moe.layers import rope_cos_sin

    cfg = preset("tiny")
    torch.manual_seed(0)
    mla = MLA(cfg).train()
    mla.record_max_logits = True
    x_BTD = torch.randn(2, 21, cfg.hidden_size)
    cos, sin = rope_cos_sin(torch.arange(21), cfg.qk_rope_head_dim, cfg.rope_theta, torch.float32)

    def run():
        mla.reset_max_logits()
        mla.zero_grad()
        y = mla(x_BTD, cos, sin)
        y.square().sum().backward()
        return y.detach(), mla.max_logits_H.clone(), [p.grad.clone() for p in mla.parameters()]

    y_sdpa, max_sdpa, grads_sdpa = run()
    calls = []
    monkeypatch.setattr("kimi_kernels.causal_attention", lambda *a: calls.append(1) or fa.flash_attention(*a))
    y_flash, max_flash, grads_flash = run()
    assert calls == [1]
    torch.testing.assert_close(y_flash, y_sdpa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(max_flash, max_sdpa, rtol=1e-5, atol=1e-5)
    for g_flash, g_sdpa in zip(grads_flash, grads_sdpa):
        torch.testing.assert_close(g_flash, g_sdpa, rtol=1e-4, atol=1e-5)


def test_dispatch_off_cuda_is_sdpa_and_the_switch_is_checked(monkeypatch):
    import kimi_kernels

    q, k, v, _ = _inputs(1, 2, 9, 24, 16, torch.float32)
    out, max_H = kimi_kernels.causal_attention(q.cpu(), k.cpu(), v.cpu(), 0.2)
    assert max_H is None
    assert torch.equal(out, F.scaled_dot_product_attention(q.cpu(), k.cpu(), v.cpu(), is_causal=True, scale=0.2))
    monkeypatch.setenv("KIMI_ATTENTION", "flash2")
    with pytest.raises(ValueError, match="KIMI_ATTENTION='flash2'; valid: flash, sdpa"):
        kimi_kernels.causal_attention(q, k, v, 0.2)
