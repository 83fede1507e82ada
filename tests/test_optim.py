"""Muon + AdamW optimizer: parity with torch.optim, parameter grouping, validation, exact resume."""

import io
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz as torch_newtonschulz

import optim
from moe.config import preset
from moe.model import Transformer
from moe.moe import RoutedExperts
from moe.router import Router
from optim.muon import NS_COEFFICIENTS, Muon, split_params, zeropower_via_newtonschulz5

SHAPES = [
    (48, 48),  # square
    (97, 33),  # tall, odd: the iteration runs on the transpose
    (33, 97),  # wide, odd
    (5, 40, 24),  # an expert stack, tall matrices
    (3, 16, 80),  # an expert stack, wide matrices
]


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_bf16_is_torch_muons_bit_for_bit(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ours = zeropower_via_newtonschulz5(G, 5, torch.bfloat16)
    theirs = torch.stack([torch_newtonschulz(g, NS_COEFFICIENTS, 5, 1e-7) for g in G.view(-1, *shape[-2:])])
    assert torch.equal(ours.view_as(theirs), theirs)


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_fp32_orthogonalises_each_expert(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    O = zeropower_via_newtonschulz5(G)
    assert O.dtype == torch.float32
    # The quintic's fixed points spread singular values over roughly [0.7, 1.2] instead of all 1.
    s = torch.linalg.svdvals(O)
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    # Each matrix of a stack is normalised and iterated on its own.
    if G.ndim == 3:
        for e in range(G.shape[0]):
            torch.testing.assert_close(O[e], zeropower_via_newtonschulz5(G[e]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [None, 1, 1500])  # all matrices at once; one at a time; 1-3 at a time
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("shape, row_blocks", [(shape, 1) for shape in SHAPES] + [
    ((3, 40, 24), 2),  # a fused gate/up expert stack: each expert's two [20, 24] halves on their own
    ((2, 16, 40), 2),  # the same with wide halves [8, 40]
    ((30, 7), 3),  # a 2-D weight of three row blocks
])
def test_muon_step_matches_torch_optim_muon(shape, row_blocks, nesterov, chunk, monkeypatch):
    """Same gradients for 3 steps: our (batched) Muon vs torch.optim.Muon on each matrix separately
    (each expert, and each row block of it), with Newton-Schulz batched whole or in chunks of matrices
    (optim.muon.NS_CHUNK_ELEMENTS; a chunk holds at least one matrix)."""
    if chunk is not None:
        monkeypatch.setattr(optim.muon, "NS_CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(2)
    W0 = torch.randn(shape, generator=gen) * 0.1
    matrix = (-1, shape[-2] // row_blocks, shape[-1])
    ours = torch.nn.Parameter(W0.clone())
    theirs = [torch.nn.Parameter(w.clone()) for w in W0.view(matrix)]
    opt = Muon([dict(params=[ours], use_muon=True, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov,
                     ns_steps=5, ns_dtype=torch.bfloat16, row_blocks=row_blocks)])
    ref = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov, ns_steps=5,
                           adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        g = torch.randn(shape, generator=gen)
        ours.grad = g.clone()
        for p, gp in zip(theirs, g.view(matrix)):
            p.grad = gp.clone()
        opt.step()
        ref.step()
    theirs_W = torch.stack([p.detach() for p in theirs]).view(shape)
    # NS is mostly torch's to the bit (test above), and the rest is fp32 rounding of lr * scale * O.
    # Our batched Frobenius norm and torch's whole-matrix one can round differently in bf16 (seen:
    # (30, 7) in 3 blocks, 2nd step without Nesterov), which moves elements of O by one bf16 ulp. A
    # wrong RMS scale or block split would be off by a good part of a whole step.
    ulp_of_step = 0.02 * 0.2 * math.sqrt(max(matrix[1:])) * 2 ** -7
    torch.testing.assert_close(ours.detach(), theirs_W, atol=3 * ulp_of_step, rtol=0)
    assert (ours.detach() - W0).abs().max() > 1e-3  # the steps did move the weights


def test_muon_step_holds_one_chunk_of_newton_schulz_not_the_whole_stack(monkeypatch):
    """The step's temporaries scale with NS_CHUNK_ELEMENTS, not with the expert stack: measured by
    the profiler's net allocation. Whole, Newton-Schulz holds about five copies of the stack."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_plan import peak_allocated_during

    def step_peak(chunk):
        monkeypatch.setattr(optim.muon, "NS_CHUNK_ELEMENTS", chunk)
        gen = torch.Generator().manual_seed(5)
        W = torch.nn.Parameter(torch.randn(64, 32, 64, generator=gen))
        opt = Muon([dict(params=[W], use_muon=True, lr=0.02, row_blocks=2)])
        W.grad = torch.randn(W.shape, generator=gen)
        opt.step()  # the momentum buffer is made here: measure the next step
        W.grad = torch.randn(W.shape, generator=gen)
        return peak_allocated_during(opt.step) / (W.numel() * 4)

    whole, chunked = step_peak(2**26), step_peak(16 * 64)  # chunked: one [16, 64] matrix of 128 at a time
    assert whole > 3, whole
    assert chunked < 0.2, chunked


def test_muon_fp32_newton_schulz_stays_close_to_torch_bf16():
    """CPU default (fp32 NS) vs torch.optim.Muon (bf16 NS): the same step up to bf16 noise."""
    gen = torch.Generator().manual_seed(3)
    W0 = torch.randn(64, 40, generator=gen) * 0.1
    ours, theirs = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    opt = Muon([dict(params=[ours], use_muon=True, lr=0.02)])
    ref = torch.optim.Muon([theirs], lr=0.02, adjust_lr_fn="match_rms_adamw")
    ours.grad = theirs.grad = torch.randn(64, 40, generator=gen)
    opt.step()
    ref.step()
    step_ours, step_theirs = ours.detach() - W0, theirs.detach() - W0
    rel = (step_ours - step_theirs).norm() / step_theirs.norm()
    assert rel < 0.02, rel


def test_adamw_groups_match_torch_adamw():
    gen = torch.Generator().manual_seed(4)
    W0 = torch.randn(7, 13, generator=gen)
    ours, theirs = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    opt = Muon([dict(params=[ours], use_muon=False, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)])
    ref = torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(4):
        ours.grad = theirs.grad = torch.randn(7, 13, generator=gen)
        opt.step()
        ref.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-7, rtol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_param_split_on_real_model(tie):
    model = Transformer(preset("tiny", tie_embeddings=tie))
    muon, adamw = split_params(model)
    muon_ids, adamw_ids = {id(p) for p in muon}, {id(p) for p in adamw}
    assert not muon_ids & adamw_ids
    assert muon_ids | adamw_ids == {id(p) for p in model.parameters()}
    assert id(model.embed_tokens.weight) in adamw_ids and id(model.lm_head.weight) in adamw_ids
    norms = [m.weight for m in model.modules() if type(m).__name__ == "RMSNorm"]
    assert norms and all(id(w) in adamw_ids for w in norms)
    expected_muon = []
    for attn in model.attentions():
        expected_muon += [attn.q_a_proj.weight, attn.q_b_proj.weight, attn.kv_a_proj_with_mqa.weight,
                          attn.kv_b_proj.weight, attn.o_proj.weight]
    for m in model.modules():
        if isinstance(m, RoutedExperts):
            expected_muon += [m.gate_up_proj, m.down_proj]
        if isinstance(m, Router):
            expected_muon.append(m.weight)
    mlp_weights = [p for n, p in model.named_parameters() if n.endswith(("gate_proj.weight", "up_proj.weight"))]
    assert len(mlp_weights) == 4  # dense MLP of layer 0 + shared expert of layer 1
    expected_muon += mlp_weights
    assert {id(p) for p in expected_muon} <= muon_ids
    assert len(muon) == 19 and len(adamw) == (10 if tie else 11)
    # The router's balance bias is a buffer: no optimizer ever sees it.
    bias_ids = {id(r.e_score_correction_bias) for r in model.routers()}
    assert not bias_ids & (muon_ids | adamw_ids)


def test_fused_gate_up_gets_a_group_of_two_row_blocks():
    model = Transformer(preset("tiny"))
    groups = {g["name"]: g for g in optim.build("muon", model).param_groups}
    assert list(groups) == ["muon", "muon_2_row_blocks", "adamw"]
    gate_up = [m.gate_up_proj for m in model.modules() if isinstance(m, RoutedExperts)]
    assert [id(p) for p in groups["muon_2_row_blocks"]["params"]] == [id(p) for p in gate_up]
    assert groups["muon_2_row_blocks"]["row_blocks"] == 2 and groups["muon"]["row_blocks"] == 1
    # The dense MLP and the shared expert keep gate_proj and up_proj apart already.
    assert all(p.ndim == 2 or p.shape[-2] == model.cfg.hidden_size for p in groups["muon"]["params"])


def test_group_validation_names_the_key():
    w = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="unknown key 'betas' in a Muon param group; valid keys: .*momentum"):
        Muon([dict(params=[w], use_muon=True, betas=(0.9, 0.95))])
    with pytest.raises(ValueError, match="unknown key 'momentum' in a AdamW param group"):
        Muon([dict(params=[w], use_muon=False, momentum=0.9)])
    with pytest.raises(ValueError, match="use_muon=True or False"):
        Muon([dict(params=[w], lr=1e-3)])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        Muon([dict(params=[torch.nn.Parameter(torch.zeros(4))], use_muon=True)])
    with pytest.raises(ValueError, match="momentum = 1.5"):
        Muon([dict(params=[w], use_muon=True, momentum=1.5)])
    with pytest.raises(ValueError, match=r"row_blocks = 3 does not divide the 4 rows of a parameter of shape \(4, 4\)"):
        Muon([dict(params=[w], use_muon=True, row_blocks=3)])


def _train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, model.cfg.vocab_size, (2, 17), generator=gen)
        model(ids[:, :-1], ids[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_biases()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_gives_the_same_next_step(dtype):
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).to(dtype)
    opt = optim.build("muonclip", model, lr=3e-2, qk_clip_tau=0.05)  # tiny's logits are ~0.03-0.08
    _train(model, opt, 3, seed=1)
    assert (opt.last_max_logits_LH > 0.05).any() and (opt.last_max_logits_LH < 0.05).any()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)

    _train(model, opt, 1, seed=2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123)  # a different init, overwritten by the checkpoint
    resumed = Transformer(preset("tiny")).to(dtype)
    opt2 = optim.build("muonclip", resumed, lr=3e-2, qk_clip_tau=0.05)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    if dtype == torch.bfloat16:  # the fp32 masters and moments come back in fp32, not rounded to bf16
        state = opt2.state[resumed.layers[0].self_attn.q_b_proj.weight]
        assert state["master"].dtype == state["momentum_buffer"].dtype == torch.float32
    _train(resumed, opt2, 1, seed=2)
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_low_precision_params_step_through_fp32_master():
    """An update far below bf16's resolution accumulates in the master instead of vanishing."""
    w = torch.nn.Parameter(torch.ones(8, 8, dtype=torch.bfloat16))
    opt = Muon([dict(params=[w], use_muon=True, lr=1e-5, weight_decay=0.0)])
    for _ in range(3):
        w.grad = torch.randn(8, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
        opt.step()
    master = opt.state[w]["master"]
    assert master.dtype == torch.float32 and torch.equal(w.detach(), master.bfloat16())
    assert (master - 1).abs().max() > 1e-5  # moved in fp32; 1 + 1e-5 rounds back to 1 in bf16
    assert torch.equal(w.detach(), torch.ones_like(w))


def test_lr_scheduler_drives_muon_and_adamw_groups():
    model = Transformer(preset("tiny"))
    opt = optim.build("muon", model, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0, 0.0]  # muon, muon_2_row_blocks, adamw
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, opt, 1, seed=0)
    sched.step()
    for name, p in model.named_parameters():  # lr 0: no update and no decay, in both kinds of group
        assert torch.equal(p, before[name]), name
