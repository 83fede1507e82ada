"""QK-clip: heads over tau end at tau, the rest and every other layer are untouched, masters change;
with the re-measure (the default), no head is over tau when the step's batch is run again.

The logits are recomputed by hand from the weights (q and k rebuilt row by row, RoPE applied to
the interleaved pairs directly) on the attention inputs captured during a forward.
"""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import optim
from moe.config import preset
from moe.model import Transformer
from optim.qk_clip import clip_factors, mla_row_scales, qk_clip_, scale_param_rows_

TAU = 100.0


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def rotate_pairs(x_BTR, positions_T, theta):
    """RoPE on interleaved pairs (x0, x1), (x2, x3), ...: each pair turned by position * theta^(-2i/R)."""
    R = x_BTR.shape[-1]
    angle_TI = positions_T[:, None].double() * theta ** (-torch.arange(0, R, 2).double() / R)
    cos, sin = angle_TI.cos().float(), angle_TI.sin().float()
    even, odd = x_BTR[..., 0::2], x_BTR[..., 1::2]
    return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)


def head_logits(attn, x_BTD, theta):
    """[H] list of fp32 logits [B, T, T] (causal, -inf above the diagonal), one head's rows at a time."""
    B, T, _ = x_BTD.shape
    H, N, R, Vh = attn.num_heads, attn.nope_dim, attn.rope_dim, attn.v_dim
    x = x_BTD.float()
    if attn.q_lora_rank is None:
        q_in = x
    else:
        q_in = rms(x @ attn.q_a_proj.weight.float().T, attn.q_a_layernorm.weight, attn.q_a_layernorm.eps)
    kv_a = x @ attn.kv_a_proj_with_mqa.weight.float().T
    latent = rms(kv_a[..., :attn.kv_lora_rank], attn.kv_a_layernorm.weight, attn.kv_a_layernorm.eps)
    positions = torch.arange(T)
    k_rope = rotate_pairs(kv_a[..., attn.kv_lora_rank:], positions, theta)  # shared by every head
    Wq, Wkv = attn.query_proj().weight.float(), attn.kv_b_proj.weight.float()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    out = []
    for h in range(H):
        q_nope = q_in @ Wq[h * (N + R): h * (N + R) + N].T
        q_rope = rotate_pairs(q_in @ Wq[h * (N + R) + N: (h + 1) * (N + R)].T, positions, theta)
        k_nope = latent @ Wkv[h * (N + Vh): h * (N + Vh) + N].T
        s = (q_nope @ k_nope.mT + q_rope @ k_rope.mT) / math.sqrt(N + R)
        out.append(s.masked_fill(~causal, float("-inf")))
    return out


def capture_attention_inputs(model):
    """Forward hooks that keep each MLA's input of the last forward: {layer: x_BTD}."""
    seen = {}
    for i, attn in enumerate(model.attentions()):
        attn.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
    return seen


def inflate_head(attn, h, q_factor, k_factor):
    """Make head h's logits large: scale its query rows (nope and rope) and its k_nope rows."""
    N, R, Vh = attn.nope_dim, attn.rope_dim, attn.v_dim
    with torch.no_grad():
        attn.query_proj().weight[h * (N + R):(h + 1) * (N + R)] *= q_factor
        attn.kv_b_proj.weight[h * (N + Vh): h * (N + Vh) + N] *= k_factor


def tiny_model(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    return Transformer(preset("tiny", **overrides)).to(dtype)


def step_once(model, opt, seed=0):
    ids = torch.randint(0, model.cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(seed))
    model(ids[:, :-1], ids[:, 1:]).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_clip_factors_and_row_scales():
    gamma = clip_factors(torch.tensor([50.0, 100.0, 400.0, float("-inf")]), TAU)
    assert gamma.tolist() == [1.0, 1.0, 0.25, 1.0]
    q_P, kv_P = mla_row_scales(torch.tensor([1.0, 0.25]), nope_dim=2, rope_dim=3, v_dim=1)
    assert q_P.tolist() == [1, 1, 1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.25]
    assert kv_P.tolist() == [1, 1, 1, 0.5, 0.5, 1]


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_clip_brings_heads_over_tau_to_tau_and_leaves_the_rest_bit_identical(q_lora_rank):
    model = tiny_model(q_lora_rank=q_lora_rank)
    theta = model.cfg.rope_theta
    attn0, attn1 = model.attentions()
    inflate_head(attn0, 1, 300.0, 30.0)
    inflate_head(attn1, 2, 200.0, 40.0)
    inflate_head(attn1, 3, 150.0, 50.0)
    # lr 0: the clip is the only change. K2's rule (no re-measure): the logits of the step's forward.
    opt = optim.build("muonclip", model, lr=0.0, qk_clip_tau=TAU, qk_clip_remeasure=False)
    inputs = capture_attention_inputs(model)
    step_once(model, opt)

    for layer, attn in enumerate(model.attentions()):
        # Pre-clip logits from the (unchanged) pre-step weights are the ones the model recorded.
        recorded_H = opt.last_max_logits_LH[layer]
        after = head_logits(attn, inputs[layer], theta)
        for h, s in enumerate(after):
            S = recorded_H[h].item()
            if S > TAU:
                # Every logit of the head shrank by tau / S, so the largest is now tau.
                assert s.max().item() <= TAU * (1 + 1e-5) and s.max().item() >= TAU * (1 - 1e-4), (layer, h, S)
            else:
                assert S < 1.0  # untouched heads of the tiny init are nowhere near tau
    assert (opt.last_max_logits_LH > TAU).sum() == 3, opt.last_max_logits_LH


def test_unclipped_heads_bit_identical_and_recorded_max_is_exact():
    model = tiny_model()
    theta = model.cfg.rope_theta
    attn0 = model.attentions()[0]
    inflate_head(attn0, 1, 300.0, 30.0)
    inputs = capture_attention_inputs(model)
    # K2's rule: a re-measure would run layer 1 on layer 0's clipped output (tested below).
    opt = optim.build("muonclip", model, lr=0.0, qk_clip_tau=TAU, qk_clip_remeasure=False)
    ids = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    model(ids[:, :-1], ids[:, 1:]).loss.backward()
    before = [head_logits(a, inputs[i], theta) for i, a in enumerate(model.attentions())]
    opt.step()
    after = [head_logits(a, inputs[i], theta) for i, a in enumerate(model.attentions())]
    for layer in range(2):
        for h in range(4):
            torch.testing.assert_close(opt.last_max_logits_LH[layer, h], before[layer][h].max(), rtol=1e-5, atol=0)
            if (layer, h) == (0, 1):
                assert before[0][1].max() > TAU
                torch.testing.assert_close(after[0][1], before[0][1] * (TAU / before[0][1].max()), rtol=1e-5, atol=1e-4)
            else:
                assert torch.equal(after[layer][h], before[layer][h]), (layer, h)


def test_a_clip_in_one_layer_touches_nothing_else():
    model = tiny_model()
    attn1 = model.attentions()[1]
    h, N, R, Vh, H = 2, attn1.nope_dim, attn1.rope_dim, attn1.v_dim, attn1.num_heads
    inflate_head(attn1, h, 300.0, 30.0)
    opt = optim.build("muonclip", model, lr=0.0, qk_clip_tau=TAU)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step_once(model, opt)
    assert opt.last_max_logits_LH[1, h] > TAU and (opt.last_max_logits_LH[0] < TAU).all()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"layers.1.self_attn.q_b_proj.weight", "layers.1.self_attn.kv_b_proj.weight"}
    q_rows_changed = (model.state_dict()["layers.1.self_attn.q_b_proj.weight"] != before["layers.1.self_attn.q_b_proj.weight"]).any(1)
    kv_rows_changed = (model.state_dict()["layers.1.self_attn.kv_b_proj.weight"] != before["layers.1.self_attn.kv_b_proj.weight"]).any(1)
    assert q_rows_changed.nonzero().flatten().tolist() == list(range(h * (N + R), (h + 1) * (N + R)))
    # k_nope rows only: v rows and the shared RoPE key (kv_a_proj_with_mqa) keep their values.
    assert kv_rows_changed.nonzero().flatten().tolist() == list(range(h * (N + Vh), h * (N + Vh) + N))
    assert q_rows_changed.numel() == H * (N + R)


def test_clip_acts_on_the_updated_weights():
    """lr > 0: MuonClip's step = Muon's step, then rows of head h scaled by sqrt(gamma) / gamma."""
    clipped, plain = tiny_model(), tiny_model()
    for m in (clipped, plain):
        inflate_head(m.attentions()[0], 0, 300.0, 30.0)
    opt_clip = optim.build("muonclip", clipped, lr=1e-2, qk_clip_tau=TAU, qk_clip_remeasure=False)
    opt_plain = optim.build("muon", plain, lr=1e-2)
    step_once(clipped, opt_clip)
    step_once(plain, opt_plain)
    S = opt_clip.last_max_logits_LH[0, 0].item()
    assert S > TAU
    g = TAU / S
    attn_c, attn_p = clipped.attentions()[0], plain.attentions()[0]
    N, R = attn_c.nope_dim, attn_c.rope_dim
    Wq = attn_p.q_b_proj.weight.detach().clone()
    Wq[:N] *= math.sqrt(g)
    Wq[N:N + R] *= g
    Wkv = attn_p.kv_b_proj.weight.detach().clone()
    Wkv[:N] *= math.sqrt(g)
    torch.testing.assert_close(attn_c.q_b_proj.weight.detach(), Wq, rtol=1e-6, atol=0)
    torch.testing.assert_close(attn_c.kv_b_proj.weight.detach(), Wkv, rtol=1e-6, atol=0)
    assert (attn_c.q_b_proj.weight[:N] != attn_p.q_b_proj.weight[:N]).all()


@pytest.mark.parametrize("master_scaled", [True, False])
def test_bf16_model_clips_its_fp32_master(master_scaled):
    """The next step re-rounds bf16 weights from the fp32 masters: a clip applied to the bf16 copy
    only (master_scaled=False, the wrong row scaler) is undone by it; the master clip survives."""
    model = tiny_model(torch.bfloat16)
    theta = model.cfg.rope_theta
    attn = model.attentions()[0]
    inflate_head(attn, 1, 300.0, 30.0)
    # K2's rule: the second step's clip then sees only its forward's logits, so a lost clip shows.
    opt = optim.build("muonclip", model, lr=0.0, qk_clip_tau=TAU, qk_clip_remeasure=False)
    if not master_scaled:
        opt.qk_clip.row_scaler = scale_param_rows_
    inputs = capture_attention_inputs(model)
    Wq0 = attn.q_b_proj.weight.detach().float()
    step_once(model, opt)
    S = opt.last_max_logits_LH[0, 1].item()
    assert S > TAU
    master = opt.state[attn.q_b_proj.weight]["master"]
    assert master.dtype == torch.float32
    N, R = attn.nope_dim, attn.rope_dim
    rows = slice(N + R, N + R + N)  # head 1's q_nope rows
    if master_scaled:
        torch.testing.assert_close(master[rows], Wq0[rows] * math.sqrt(TAU / S), rtol=1e-6, atol=0)
        assert torch.equal(attn.q_b_proj.weight.detach(), master.bfloat16())
    else:
        assert torch.equal(master[rows], Wq0[rows])
    step_once(model, opt, seed=1)  # lr 0: the weights are re-rounded from the masters, nothing else
    logits_max = max(s.max().item() for s in head_logits(attn, inputs[0], theta)[1:2])
    if master_scaled:
        assert logits_max <= TAU * 1.02  # bf16 weights and bf16-computed records: ~1% rounding
    else:
        assert logits_max > 1.5 * TAU  # the clip was lost


def max_after_each_clip(remeasure, lr, dtype=torch.float32, q_lora_rank=32, steps=6):
    """MuonClip steps on a model with one inflated head per layer; after each step the step's batch is
    run again and every head's logits recomputed by hand. Returns [steps] of the largest of them."""
    model = tiny_model(dtype, q_lora_rank=q_lora_rank)
    theta = model.cfg.rope_theta
    inflate_head(model.attentions()[0], 1, 300.0, 30.0)
    inflate_head(model.attentions()[1], 2, 300.0, 30.0)
    opt = optim.build("muonclip", model, lr=lr, qk_clip_tau=TAU, qk_clip_remeasure=remeasure)
    inputs = capture_attention_inputs(model)
    after = []
    for step in range(steps):
        ids = torch.randint(0, model.cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(step))
        model(ids[:, :-1], ids[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            model(ids[:, :-1])  # refills `inputs` with what each MLA now receives for this batch
        model.train()
        after.append(max(s.max().item() for i, a in enumerate(model.attentions()) for s in head_logits(a, inputs[i], theta)))
    return after


@pytest.mark.parametrize("lr, dtype, q_lora_rank, rtol", [
    (1e-2, torch.float32, 32, 1e-5),
    (1e-1, torch.float32, None, 1e-5),  # q_proj instead of q_a/q_b
    (3e-2, torch.bfloat16, 32, 2e-2),  # bf16 weights, fp32 masters; bf16 q and k: ~1% rounding
])
def test_remeasured_clip_leaves_every_head_at_or_below_tau_on_the_same_batch(lr, dtype, q_lora_rank, rtol):
    """The update moves the logits after the step's forward measured them (here: both inflated heads
    amplify any change of the shared low-rank query input), and layer 0's clip changes layer 1's
    input. K2's rule then leaves heads above tau; the re-measured clip does not."""
    exact = max_after_each_clip(True, lr, dtype, q_lora_rank)
    assert max(exact) <= TAU * (1 + rtol), exact
    assert max(exact) >= TAU * (1 - rtol), exact  # the clipped heads land on tau, not below it
    k2_rule = max_after_each_clip(False, lr, dtype, q_lora_rank)
    assert max(k2_rule) > 1.2 * TAU, k2_rule


def _rank_remeasures(rank, world_size, init_file, out_dir):
    """lr 0: the clip is the only change. Each rank re-measures its own batch; the clip must still
    be the same everywhere (max over ranks, layer by layer) and keep each rank's batch under tau."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    model = tiny_model()
    theta = model.cfg.rope_theta
    inflate_head(model.attentions()[0], 1, 300.0, 30.0)
    inflate_head(model.attentions()[1], 2, 300.0, 30.0)
    opt = optim.build("muonclip", model, lr=0.0, qk_clip_tau=TAU)
    inputs = capture_attention_inputs(model)
    step_once(model, opt, seed=rank)
    after = [[s.max().item() for s in head_logits(a, inputs[i], theta)] for i, a in enumerate(model.attentions())]
    weights = {k: v for k, v in model.state_dict().items() if "q_b_proj" in k or "kv_b_proj" in k}
    torch.save({"after": after, "weights": weights, "max_LH": opt.last_max_logits_LH},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_remeasured_clip_is_the_same_on_every_data_parallel_rank():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_remeasures, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2)
        r0, r1 = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    assert torch.equal(r0["max_LH"], r1["max_LH"])
    assert (r0["max_LH"] > TAU).sum() == 2
    for name, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][name]), name
    for res in (r0, r1):
        assert max(max(layer) for layer in res["after"]) <= TAU * (1 + 1e-5)


def _rank_clips(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    model = tiny_model()
    # Each rank saw different batches: rank 0 a large logit in head 0, rank 1 in head 3 (layer 1).
    for attn in model.attentions():
        attn.reset_max_logits()
        attn.max_logits_H.fill_(1.0)
    model.attentions()[1].max_logits_H[0] = 400.0 if rank == 0 else 1.0
    model.attentions()[1].max_logits_H[3] = 200.0 if rank == 1 else 1.0
    calls = []
    max_LH = qk_clip_(model.attentions(), TAU, lambda p, s: calls.append(s.clone()))
    torch.save({"max_LH": max_LH, "calls": calls}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_max_logits_are_maxed_over_data_parallel_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_clips, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for res in results:
        assert res["max_LH"][1].tolist() == [400.0, 1.0, 1.0, 200.0]
        q_P, kv_P = res["calls"]  # one layer clipped: its query and kv_b weights
        expected_q, expected_kv = mla_row_scales(torch.tensor([0.25, 1.0, 1.0, 0.5]), 16, 8, 16)
        assert torch.equal(q_P, expected_q) and torch.equal(kv_P, expected_kv)
