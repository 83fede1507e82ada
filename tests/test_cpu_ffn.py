"""The CPU expert FFN (`kimi_kernels.experts.cpu_ffn`) forward and backward against two oracles: a per-token loop
written here, which shares no code with ours, and `kimi_kernels.experts.reference`.

Shape legend: T tokens, K experts per token, E experts, D hidden, F expert FFN width.
Both oracles run in fp64 on the same values; ours runs in the dtype under test.
"""

import pytest
import torch
import torch.nn.functional as F

import kimi_kernels
from kimi_kernels.experts import cpu_ffn
from kimi_kernels.experts.cpu_ffn import expert_ffn_cpu, grouped_mm_fits
from kimi_kernels.experts.reference import expert_ffn_reference
from kimi_kernels.testing import assert_close_to, make_problem


def per_token_loop(x_TD, ids_TK, w_TK, gate_up_EFD, down_EDF):
    """y_t = sum_k w_tk * down_e (silu(gate_e x_t) * up_e x_t), one token and one expert at a time."""
    T, K = ids_TK.shape
    F_ = down_EDF.shape[2]
    rows = []
    for t in range(T):
        y_D = torch.zeros_like(x_TD[t])
        for k in range(K):
            e = int(ids_TK[t, k])
            h = gate_up_EFD[e] @ x_TD[t]
            y_D = y_D + w_TK[t, k] * (down_EDF[e] @ (F.silu(h[:F_]) * h[F_:]))
        rows.append(y_D)
    return torch.stack(rows) if rows else x_TD[:0] * 1  # T = 0: still a graph to run backward through


# (T, K, E, D, F, routing, grouped): `grouped` says which path the shape takes in fp32 and bf16,
# torch._grouped_mm (D and F multiples of 8) or the loop (rows not a multiple of 16 bytes).
CASES = [
    (37, 2, 6, 32, 24, "random", True),  # odd T (A = 74), E not a power of two
    (21, 2, 9, 24, 16, "empty_experts", True),  # empty experts between busy ones: repeated offsets
    (40, 2, 8, 16, 8, "one_expert", True),  # all rows on two experts, six empty groups
    (33, 1, 4, 16, 16, "one_expert", True),  # K = 1, one hot expert: a single non-empty group
    (1, 4, 4, 16, 8, "random", True),  # T = 1, K = E: one token visits every expert
    (12, 1, 1, 16, 8, "random", True),  # E = 1: one group holding every row
    (9, 3, 3, 24, 8, "random", True),  # K = E with several tokens: every expert gets every token
    (0, 2, 4, 16, 8, "random", True),  # no rows (an expert-parallel rank that received nothing)
    (16, 8, 384, 16, 16, "skewed", True),  # E = 384, K = 8: most experts empty, long offsets vector
    (19, 3, 5, 19, 13, "random", False),  # odd D and F: the loop, with tails in both GEMMs
    (9, 4, 4, 21, 10, "random", False),  # loop with K = E
    (15, 2, 7, 18, 9, "empty_experts", False),  # loop skipping empty experts between busy ones
    (1, 1, 1, 12, 6, "random", False),  # loop with T = 1, E = 1
]
# Tolerances of kimi_kernels.testing (relative to max|ref|, against fp64): fp32 1e-5, bf16 4e-2.
DTYPES = [torch.float32, torch.bfloat16]
NAMES = ("y", "dx", "dtopk_weights", "dgate_up", "ddown")


def _run(fn, x, ids, w, gate_up, down, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, gate_up, down)]
    y = fn(leaves[0], ids, *leaves[1:])
    y.backward(dy)
    # With T = 0 the reference's graph never reaches some inputs: their gradient is zero.
    return [y.detach()] + [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]


def _problem(T, K, E, D, F_, routing, dtype):
    x, ids, w, gate_up, down = make_problem(T, K, E, D, F_, dtype, routing, device="cpu", requires_grad=False)
    dy = torch.randn(T, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return x, ids, w, gate_up, down, dy


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,K,E,D,F_,routing,grouped", CASES)
def test_forward_backward_match_both_oracles(T, K, E, D, F_, routing, grouped, dtype):
    assert grouped_mm_fits(dtype, D, F_) == grouped  # the case tests the path its comment names
    x, ids, w, gate_up, down, dy = _problem(T, K, E, D, F_, routing, dtype)
    ours = _run(expert_ffn_cpu, x, ids, w, gate_up, down, dy.to(dtype))
    f64 = [t.double() for t in (x, ids, w, gate_up, down)]
    f64[1] = ids
    loop = _run(per_token_loop, *f64, dy)
    ref = _run(expert_ffn_reference, *f64, dy)
    for name, o, lp, r in zip(NAMES, ours, loop, ref):
        assert o.dtype == dtype and o.shape == lp.shape, name
        assert_close_to(o, lp, dtype, f"{name} vs per-token loop")
        assert_close_to(o, r, dtype, f"{name} vs reference")
    if T:
        assert ours[0].abs().max() > 0.1  # outputs of a size where a wrong expert would show
    unused_E = torch.ones(E, dtype=torch.bool)
    unused_E[ids.unique()] = False
    for name, grad in (("dgate_up", ours[3]), ("ddown", ours[4])):
        assert torch.equal(grad[unused_E], torch.zeros_like(grad[unused_E])), f"{name} of an expert with no tokens"


@pytest.mark.parametrize("T,K,E,D,F_,routing,grouped", [c for c in CASES if not c[-1]])
def test_loop_path_fp64_matches_per_token_loop_exactly(T, K, E, D, F_, routing, grouped):
    """fp64 always takes the loop (torch._grouped_mm has no fp64): summation order is all that differs."""
    x, ids, w, gate_up, down, dy = _problem(T, K, E, D, F_, routing, torch.float64)
    for name, o, lp in zip(NAMES, _run(expert_ffn_cpu, x, ids, w, gate_up, down, dy),
                           _run(per_token_loop, x, ids, w, gate_up, down, dy)):
        assert_close_to(o, lp, torch.float64, name)


@pytest.mark.parametrize("routing", ["random", "empty_experts"])
def test_gradcheck_fp64(routing):
    """Autograd's gradients of our forward against its finite differences (dx, dw, dW)."""
    x, ids, w, gate_up, down = make_problem(11, 2, 5, 20, 18, torch.float64, routing, device="cpu")
    assert torch.autograd.gradcheck(lambda *t: expert_ffn_cpu(t[0], ids, *t[1:]), (x, w, gate_up, down),
                                    fast_mode=True, atol=1e-8, rtol=1e-6)


def _graph_nodes(y: torch.Tensor) -> int:
    seen, stack = set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return len(seen)


def test_autograd_graph_does_not_grow_with_experts():
    """The cost must follow the tokens: on the grouped path the backward graph of E = 512 is the
    graph of E = 8 (the reference adds a CopySlices per busy expert, each cloning [A, D])."""
    sizes = {}
    for E in (8, 512):
        x, ids, w, gate_up, down = make_problem(64, 4, E, 16, 8, torch.float32, "random", device="cpu")
        sizes[E] = (_graph_nodes(expert_ffn_cpu(x, ids, w, gate_up, down)),
                    _graph_nodes(expert_ffn_reference(x, ids, w, gate_up, down)))
    assert sizes[8][0] == sizes[512][0], sizes
    assert sizes[512][1] > sizes[8][1] + 100, sizes  # the property really distinguishes the two


@pytest.mark.parametrize("dtype,D,F_,graphs", [
    (torch.bfloat16, 16, 8, 1),
    (torch.float32, 16, 8, 1),  # torch's own meta function for _grouped_mm would raise here (bf16 only)
    (torch.float32, 19, 13, 2),  # the loop: its host read of the counts is one graph break
], ids=["bf16", "fp32", "fp32_loop"])
def test_compiles_as_one_graph(dtype, D, F_, graphs):
    """No .item()/.tolist()/bincount on the grouped path: dynamo captures it whole, and the
    captured function gives eager's numbers, forward and backward."""
    x, ids, w, gate_up, down = make_problem(24, 2, 8, D, F_, dtype, "skewed", device="cpu")
    explained = torch._dynamo.explain(expert_ffn_cpu)(x, ids, w, gate_up, down)
    assert explained.graph_count == graphs, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(expert_ffn_cpu, backend="aot_eager", fullgraph=graphs == 1)
    dy = torch.randn(24, D, generator=torch.Generator().manual_seed(3), dtype=dtype)
    for name, o, r in zip(NAMES, _run(compiled, x, ids, w, gate_up, down, dy),
                          _run(expert_ffn_cpu, x, ids, w, gate_up, down, dy)):
        torch.testing.assert_close(o, r, msg=name)


def test_grouped_linear_takes_an_expanded_gradient():
    """y.sum().backward() hands the op a zero-stride gradient, which torch._grouped_mm rejects;
    the op's backward makes it contiguous. Checked against per-expert matmuls."""
    x_AI = torch.randn(10, 16, requires_grad=True)
    w_EOI = torch.randn(4, 8, 16, requires_grad=True)
    offsets_E = torch.tensor([3, 3, 7, 10], dtype=torch.int32)  # expert 1 empty
    cpu_ffn.grouped_linear(x_AI, w_EOI, offsets_E).sum().backward()
    x2, w2 = x_AI.detach().requires_grad_(), w_EOI.detach().clone().requires_grad_()
    torch.cat([x2[0:3] @ w2[0].T, x2[3:7] @ w2[2].T, x2[7:10] @ w2[3].T]).sum().backward()
    torch.testing.assert_close(x_AI.grad, x2.grad)
    torch.testing.assert_close(w_EOI.grad, w2.grad)
    assert torch.equal(w_EOI.grad[1], torch.zeros(8, 16))


def test_dispatch_sends_cpu_tensors_here_unless_reference_is_forced(monkeypatch):
    calls = []
    monkeypatch.setattr(kimi_kernels, "expert_ffn_cpu", lambda *a: calls.append("cpu") or a[0])
    monkeypatch.setattr(kimi_kernels, "expert_ffn_reference", lambda *a: calls.append("reference") or a[0])
    args = make_problem(4, 2, 4, 16, 8, torch.float32, device="cpu")
    monkeypatch.delenv("KIMI_EXPERT_FFN", raising=False)
    kimi_kernels.expert_ffn(*args)
    monkeypatch.setenv("KIMI_EXPERT_FFN", "reference")
    kimi_kernels.expert_ffn(*args)
    assert calls == ["cpu", "reference"]


def test_bad_operands_are_reported():
    x, ids, w, gate_up, down = make_problem(4, 2, 4, 16, 8, torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"down \(4, 8, 16\) \(want \[E, D, F\]\)"):
        expert_ffn_cpu(x, ids, w, gate_up, down.transpose(1, 2))
    with pytest.raises(ValueError, match=r"topk_ids \(3, 2\)"):
        expert_ffn_cpu(x, ids[:3], w[:3], gate_up, down)
    with pytest.raises(TypeError, match="one dtype"):
        expert_ffn_cpu(x, ids, w, gate_up.bfloat16(), down)


def test_grouped_mm_fits_follows_the_16_byte_rule():
    """The predicate that picks the path, checked against torch._grouped_mm itself: where it says
    no, the kernel raises (in forward or in backward); where it says yes, it runs both."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for D, F_ in ((16, 8), (12, 8), (16, 6), (19, 8)):
            x_AD = torch.randn(6, D, dtype=dtype, requires_grad=True)
            w_EFD = torch.randn(2, F_, D, dtype=dtype, requires_grad=True)
            offsets = torch.tensor([2, 6], dtype=torch.int32)
            try:
                y = torch._grouped_mm(x_AD, w_EFD.transpose(-2, -1), offs=offsets)
                y.backward(torch.randn_like(y))
                ran = True
            except RuntimeError as err:
                assert "16 bytes" in str(err)
                ran = False
            assert ran == grouped_mm_fits(dtype, D, F_), (dtype, D, F_)


def test_int32_expert_ids_give_the_int64_result():
    x, ids, w, gate_up, down = make_problem(13, 2, 6, 16, 8, torch.float32, "random", device="cpu")
    torch.testing.assert_close(expert_ffn_cpu(x, ids.int(), w, gate_up, down), expert_ffn_cpu(x, ids, w, gate_up, down),
                               rtol=0, atol=0)
