"""Each Triton kernel on its own against plain PyTorch maths on the same routing.

Shape legend: T tokens, K experts per token, E experts, D hidden, F expert FFN width, A = T*K,
i = expert-sorted row, a = token-major assignment row.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F_
import triton
from triton.runtime.errors import OutOfResources

from kimi_kernels.testing import (DEVICE, assert_close_to, check_kernels_interpreted, dtype_params, make_problem,
                             use_interpreter_without_cuda)

use_interpreter_without_cuda()
from kimi_kernels.experts.grouped_gemm import gate_up_swiglu, scatter_gemm, swiglu_backward  # noqa: E402
from kimi_kernels.experts.routing import build_routing  # noqa: E402
from kimi_kernels.tiles import INTERP_BK, INTERP_BN, block_m, gemm_configs, tma_compatible, wgrad_configs  # noqa: E402
from kimi_kernels.experts.wgrad import expert_wgrad  # noqa: E402

CASES = [
    # (T, K, E, D, F, routing)
    (19, 3, 5, 24, 20, "random"),  # odd sizes, A = 57
    (21, 2, 9, 48, 36, "empty_experts"),  # empty experts; D = 48: two K steps, the second masked
    (40, 1, 6, 40, 24, "one_expert"),  # K = 1, every row on one expert
    (13, 2, 3, 24, 72, "random"),  # F = 72: several N tiles, each epilogue half partly or wholly masked
]
DTYPES = dtype_params()


def _dtype_configs(gpu_candidates, interp_variants):
    """(dtype, config) pairs. Under the interpreter: fp32 and fp16 with each variant of its small
    tile (bf16 is reported as skipped). On a GPU: fp32 and fp16 through the autotuner, and bf16, what
    training runs, with every autotune candidate, since the autotuner keeps only the fastest
    candidate's output and would leave the others unchecked."""
    bf16 = DTYPES[-1]
    if DEVICE != "cuda":
        pairs = [pytest.param(d, c, id=f"{d}-{c}") for d in DTYPES[:-1] for c in interp_variants]
        return pairs + [pytest.param(*bf16.values, None, marks=bf16.marks, id="bf16")]
    pairs = [pytest.param(d, None, id=f"{d}-autotuned") for d in DTYPES[:-1]]
    return pairs + [pytest.param(torch.bfloat16, c, id=f"bf16-{c}") for c in gpu_candidates]


def _candidate(config, launch, tma_operands):
    """The candidate a test runs. One that would read through TMA an operand no descriptor can cover
    (`tma_operands`: (tensor, strides) pairs, None for the tensor's own) must be refused by
    `launch(config)` with an error naming TMA; the test then runs the same tile on pointer loads,
    which is what the autotuner's pruning leaves of it."""
    tma = [k for k in ("W_TMA", "SORTED_TMA") if config is not None and config.kwargs.get(k)]
    if not tma or all(tma_compatible(t, st) for t, st in tma_operands):
        return config
    with pytest.raises(ValueError, match="TMA"):
        launch(config)
    return triton.Config(dict(config.kwargs, **dict.fromkeys(tma, False)), num_warps=config.num_warps,
                         num_stages=config.num_stages)


@contextlib.contextmanager
def _fits(config, dtype):
    """Skips a tile that does not fit in this GPU's shared memory (the 4-stage 256-wide ones take
    192 KiB, more than an A100 has), as the autotuner skips it."""
    try:
        yield
    except OutOfResources:
        pytest.skip(f"{config} does not fit in this GPU's shared memory for {dtype}; the autotuner skips it too")


@pytest.fixture(scope="module", autouse=True)
def _interpreted():
    check_kernels_interpreted()


def _setup(T, K, E, D, F, routing, dtype):
    x, ids, w, gate_up, down = (t.detach() for t in make_problem(T, K, E, D, F, dtype, routing))
    r = build_routing(ids, E, block_m(T * K, E))
    order, token = r.order_A.long(), r.token_A.long()
    expert_A = ids.reshape(-1)[order]  # expert of each sorted row
    return x, w, gate_up, down, r, order, token, expert_A


# The interpreter's tiles, with each value of the kernels' tuning switches.
GEMM_TILES = [triton.Config(dict(BN=INTERP_BN, BK=INTERP_BK, GROUP_M=4, W_TMA=tma)) for tma in (False, True)]
WGRAD_TILES = [triton.Config(dict(BM=INTERP_BN, BN=INTERP_BN, BK=INTERP_BK, TOKENS_AHEAD=ahead, SORTED_TMA=tma))
               for ahead in (True, False) for tma in (False, True)]


@pytest.mark.parametrize("dtype,config", _dtype_configs(gemm_configs(dual=True), GEMM_TILES))
@pytest.mark.parametrize("T,K,E,D,F,routing", CASES)
def test_gate_up_swiglu(T, K, E, D, F, routing, dtype, config):
    x, w, gate_up, down, r, order, token, expert_A = _setup(T, K, E, D, F, routing, dtype)
    config = _candidate(config, lambda c: gate_up_swiglu(x, gate_up, r, store_h=True, config=c), [(gate_up, None)])
    with _fits(config, dtype):
        act_AF, h_AF2 = gate_up_swiglu(x, gate_up, r, store_h=True, config=config)
    h_ref = torch.einsum("ad,afd->af", x[token].double(), gate_up[expert_A].double())
    g, u = h_ref.chunk(2, dim=-1)
    assert_close_to(h_AF2, h_ref, dtype, "h")
    assert_close_to(act_AF, F_.silu(g) * u, dtype, "act")


@pytest.mark.parametrize("dtype,config", _dtype_configs(gemm_configs(dual=False), GEMM_TILES))
@pytest.mark.parametrize("T,K,E,D,F,routing", CASES)
def test_scatter_gemm_down_and_dx_layouts(T, K, E, D, F, routing, dtype, config):
    x, w, gate_up, down, r, order, token, expert_A = _setup(T, K, E, D, F, routing, dtype)
    gen = torch.Generator().manual_seed(3)
    act = torch.randn(T * K, F, generator=gen).to(DEVICE, dtype)
    s = gate_up.stride()
    dx_strides = (s[0], s[2], s[1])

    def down_proj(c):
        return scatter_gemm(act, down, down.stride(), torch.empty(T * K, D, device=DEVICE, dtype=dtype), r,
                            gate_w_A=w.reshape(-1), config=c)

    def dx(c):
        return scatter_gemm(dh, gate_up, dx_strides, torch.empty(T * K, D, device=DEVICE, dtype=dtype), r, config=c)

    # Down projection: W_e = down_e [D, F] read as stored, rows scaled by their gate weight.
    config_down = _candidate(config, down_proj, [(down, None)])
    with _fits(config_down, dtype):
        out = down_proj(config_down)
    ref = torch.empty(T * K, D, dtype=torch.float64, device=DEVICE)
    ref[order] = torch.einsum("af,adf->ad", act.double(), down[expert_A].double()) * w.reshape(-1)[order, None].double()
    assert_close_to(out, ref, dtype, "down")
    # dX: W_e = gate_up_e^T read through swapped strides, no weights.
    dh = torch.randn(T * K, 2 * F, generator=gen).to(DEVICE, dtype)
    out = dx(_candidate(config, dx, [(gate_up, dx_strides)]))
    ref[order] = torch.einsum("af,afd->ad", dh.double(), gate_up[expert_A].double())
    assert_close_to(out, ref, dtype, "dx rows")


@pytest.mark.parametrize("dtype,config", _dtype_configs(gemm_configs(dual=False), GEMM_TILES))
@pytest.mark.parametrize("T,K,E,D,F,routing", CASES)
def test_swiglu_backward(T, K, E, D, F, routing, dtype, config):
    x, w, gate_up, down, r, order, token, expert_A = _setup(T, K, E, D, F, routing, dtype)
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(T * K, 2 * F, generator=gen).to(DEVICE, dtype)
    dy = torch.randn(T, D, generator=gen).to(DEVICE, dtype)
    s = down.stride()
    config = _candidate(config, lambda c: swiglu_backward(dy, down, h, w.reshape(-1), r, config=c),
                        [(down, (s[0], s[2], s[1]))])
    with _fits(config, dtype):
        dh, dw_sorted, act_w = swiglu_backward(dy, down, h, w.reshape(-1), r, config=config)
    # Autograd through the per-row maths: out_i = w_a * down_e silu(g_i) * u_i, paired with dy_t.
    h64 = h.double().requires_grad_()
    w64 = w.reshape(-1)[order].double().requires_grad_()
    g, u = h64.chunk(2, dim=-1)
    act = F_.silu(g) * u
    out = torch.einsum("af,adf->ad", act, down[expert_A].double()) * w64[:, None]
    dh_ref, dw_ref = torch.autograd.grad(out, (h64, w64), dy[token].double())
    assert_close_to(dh, dh_ref, dtype, "dh")
    assert_close_to(dw_sorted, dw_ref, dtype, "dw")
    assert_close_to(act_w, act.detach() * w64.detach()[:, None], dtype, "w * act")


@pytest.mark.parametrize("dtype,config", _dtype_configs(wgrad_configs(), WGRAD_TILES))
@pytest.mark.parametrize("T,K,E,D,F,routing", CASES)
def test_expert_wgrad(T, K, E, D, F, routing, dtype, config):
    x, w, gate_up, down, r, order, token, expert_A = _setup(T, K, E, D, F, routing, dtype)
    gen = torch.Generator().manual_seed(5)
    dy = torch.randn(T, D, generator=gen).to(DEVICE, dtype)
    act = torch.randn(T * K, F, generator=gen).to(DEVICE, dtype)
    onehot_AE = F_.one_hot(expert_A, E).double()
    dh = act.repeat(1, 2)
    # dW_down_e = sum_i dy_t^T (w_a act_i): L gathered, R sorted.
    def wgrad_down(c):
        return expert_wgrad(dy, act, r, l_gather=True, r_gather=False, config=c)

    def wgrad_gate_up(c):
        return expert_wgrad(dh, x, r, l_gather=False, r_gather=True, config=c)

    config_down = _candidate(config, wgrad_down, [(act, None)])
    with _fits(config_down, dtype):
        ours = wgrad_down(config_down)
    assert_close_to(ours, torch.einsum("ae,am,an->emn", onehot_AE, dy[token].double(), act.double()), dtype, "dW_down")
    # dW_gate_up_e = sum_i dh_i^T x_t: L sorted, R gathered.
    ours = wgrad_gate_up(_candidate(config, wgrad_gate_up, [(dh, None)]))
    assert_close_to(ours, torch.einsum("ae,am,an->emn", onehot_AE, dh.double(), x[token].double()), dtype, "dW_gate_up")
