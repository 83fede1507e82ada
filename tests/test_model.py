"""The model: the dropless expert path against a dense loop, one training step, the meta-device
kimi-k2 build, token-id validation, and MLA's max-logit recording against explicit logits.

Shape legend: T tokens, D hidden, F expert FFN width, E experts, K experts per token, H heads.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import kimi_kernels
from kimi_kernels.experts.reference import expert_ffn_reference
from moe.attention import MLA
from moe.config import preset
from moe.layers import MLP, rope_cos_sin
from moe.model import Transformer
from moe.moe import MoE


def dense_expert_loop(x_TD, topk_ids_TK, topk_weights_TK, gate_up_EFD, down_EDF):
    """Every token through every expert, then combined with a [T, E] mask of gate weights."""
    E = gate_up_EFD.shape[0]
    gate_TE = torch.zeros(x_TD.shape[0], E, dtype=x_TD.dtype).scatter_add(1, topk_ids_TK, topk_weights_TK)
    y_TD = torch.zeros_like(x_TD)
    for e in range(E):
        F_ = down_EDF.shape[2]
        gate_TF = x_TD @ gate_up_EFD[e, :F_].T
        up_TF = x_TD @ gate_up_EFD[e, F_:].T
        y_TD = y_TD + gate_TE[:, e : e + 1] * ((F.silu(gate_TF) * up_TF) @ down_EDF[e].T)
    return y_TD


def _ids(case: str, T: int, E: int, K: int, gen) -> torch.Tensor:
    if case == "one_hot_expert":
        return torch.full((T, K), E - 2)
    if case == "empty_expert":  # expert 1 gets no token: its slice is empty, its gradient zero
        allowed = torch.tensor([e for e in range(E) if e != 1])
        return torch.stack([allowed[torch.randperm(E - 1, generator=gen)[:K]] for _ in range(T)])
    return torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])  # distinct per token


# (T, D, F, E, K): what each shape stresses.
EXPERT_CASES = [
    ("random", 37, 24, 20, 5, 2),  # odd T/D/F, E not a power of two
    ("random", 1, 16, 8, 4, 2),  # a single token
    ("random", 9, 16, 12, 4, 4),  # k = E: every token visits every expert
    ("empty_expert", 23, 16, 12, 6, 3),
    ("one_hot_expert", 17, 16, 12, 6, 1),  # all tokens on one expert, every other expert empty
]


@pytest.mark.parametrize("impl", [kimi_kernels.expert_ffn, expert_ffn_reference], ids=["expert_ffn", "reference"])
@pytest.mark.parametrize("case,T,D,F_,E,K", EXPERT_CASES)
def test_expert_path_matches_dense_loop_forward_and_backward(impl, case, T, D, F_, E, K):
    gen = torch.Generator().manual_seed(T * 100 + E)
    x = torch.randn(T, D, generator=gen)
    gate_up = torch.randn(E, 2 * F_, D, generator=gen) / math.sqrt(D)
    down = torch.randn(E, D, F_, generator=gen) / math.sqrt(F_)
    weights = torch.rand(T, K, generator=gen) + 0.1
    ids = _ids(case, T, E, K, gen)
    dy = torch.randn(T, D, generator=gen)

    grads = []
    for fn in (impl, dense_expert_loop):
        leaves = [t.clone().requires_grad_(True) for t in (x, weights, gate_up, down)]
        y = fn(leaves[0], ids, leaves[1], leaves[2], leaves[3])
        y.backward(dy)
        grads.append([y.detach()] + [t.grad for t in leaves])
    for name, ours, ref in zip(["y", "dx", "dweights", "dgate_up", "ddown"], *grads):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5, msg=name)
    assert grads[0][0].abs().max() > 0.1
    unused = torch.ones(E, dtype=torch.bool)
    unused[ids.unique()] = False
    assert torch.equal(grads[0][3][unused], torch.zeros_like(grads[0][3][unused]))
    if case in ("empty_expert", "one_hot_expert"):
        assert unused.sum() >= 1


def test_one_adamw_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (4, 33), generator=gen)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    before = model(inputs, targets)
    # A fresh model predicts nearly uniformly over 512 tokens: loss ~ ln 512 = 6.238 (measured 6.266;
    # other seeds give 6.23-6.28).
    assert before.lm_loss.item() == pytest.approx(math.log(512), abs=0.05)
    assert 0 < before.aux_loss.item() < 1e-3  # alpha = 1e-4 times a balance loss of order 1
    before.loss.backward()
    opt.step()
    model.update_router_biases()
    after = model(inputs, targets)
    # Measured 6.2663 -> 5.8864 (torch 2.13, CPU); the margin allows other summation orders.
    assert after.loss.item() == pytest.approx(5.886, abs=0.05)
    assert before.loss.item() - after.loss.item() > 0.3


def test_kimi_k2_builds_on_meta():
    with torch.device("meta"):
        model = Transformer(preset("kimi-k2"))
    assert all(p.device.type == "meta" for p in model.parameters())
    assert len(model.layers) == 61
    assert isinstance(model.layers[0].mlp, MLP) and isinstance(model.layers[1].mlp, MoE)
    assert model.layers[60].mlp.experts.gate_up_proj.shape == (384, 2 * 2048, 7168)
    assert model.layers[60].mlp.experts.down_proj.shape == (384, 7168, 2048)
    assert model.layers[0].self_attn.q_b_proj.weight.shape == (64 * 192, 1536)


@pytest.mark.parametrize("bad", [512, 10_000, -1])
def test_token_ids_outside_the_vocabulary_are_rejected(bad):
    model = Transformer(preset("tiny"))
    ids = torch.zeros(2, 5, dtype=torch.long)
    ids[1, 3] = bad
    with pytest.raises(ValueError, match=rf"token id {bad} .*vocab_size = 512"):
        model(ids)


def _rope_complex(x_BHTR: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as DeepSeek-V3's reference code writes it: adjacent pairs as complex numbers times
    e^(i t theta^(-2j/R)). The output stays interleaved, unlike moe.layers.apply_rope; q.k is the same."""
    R = x_BHTR.shape[-1]
    T = x_BHTR.shape[-2]
    freqs = 1.0 / theta ** (torch.arange(0, R, 2, dtype=torch.float64) / R)
    rot_TJ = torch.polar(torch.ones(T, R // 2, dtype=torch.float64), torch.outer(torch.arange(T, dtype=torch.float64), freqs))
    xc = torch.view_as_complex(x_BHTR.double().reshape(*x_BHTR.shape[:-1], R // 2, 2))
    return torch.view_as_real(xc * rot_TJ).flatten(-2)


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_mla_max_logits_equal_explicit_causal_logits(q_lora_rank):
    cfg = preset("tiny", q_lora_rank=q_lora_rank)
    torch.manual_seed(0)
    mla = MLA(cfg)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.2)
    mla.record_max_logits = True
    H, N, R, L = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank

    def explicit_max_logits(x_BTD):
        """max over batch and causal pairs (s <= t) of (q_t . k_s) / sqrt(N + R), per head, in fp64."""
        B, T, _ = x_BTD.shape
        x = x_BTD.double()
        m = {k: v.detach().double() for k, v in mla.state_dict().items()}

        def rms(v, w):
            return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * w

        q = x @ m["q_proj.weight"].T if q_lora_rank is None else \
            rms(x @ m["q_a_proj.weight"].T, m["q_a_layernorm.weight"]) @ m["q_b_proj.weight"].T
        q_BHTQ = q.view(B, T, H, N + R).transpose(1, 2)
        kv_a = x @ m["kv_a_proj_with_mqa.weight"].T
        k_nope = (rms(kv_a[..., :L], m["kv_a_layernorm.weight"]) @ m["kv_b_proj.weight"].T).view(B, T, H, -1)[..., :N]
        k_rope_B1TR = _rope_complex(kv_a[..., L:].unsqueeze(1), cfg.rope_theta)
        scores_BHTT = q_BHTQ[..., :N] @ k_nope.transpose(1, 2).transpose(-1, -2) \
            + _rope_complex(q_BHTQ[..., N:], cfg.rope_theta) @ k_rope_B1TR.transpose(-1, -2)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        return scores_BHTT.masked_fill(~causal, float("-inf")).amax(dim=(0, 2, 3)) / math.sqrt(N + R)

    # T = 300 spans two of the recorder's 256-query blocks; a second call must fold into the max.
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 300, cfg.hidden_size, generator=gen), 1.5 * torch.randn(1, 40, cfg.hidden_size, generator=gen)]
    expected = torch.full((H,), float("-inf"), dtype=torch.float64)
    firsts = []
    for x in xs:
        cos, sin = rope_cos_sin(torch.arange(x.shape[1]), R, cfg.rope_theta, x.dtype)
        with torch.no_grad():
            mla(x, cos, sin)
        expected = torch.maximum(expected, explicit_max_logits(x))
        torch.testing.assert_close(mla.max_logits_H.double(), expected, atol=1e-4, rtol=1e-5)
        firsts.append(expected.clone())
    assert (firsts[1] > firsts[0]).any()  # the second batch raised some head's max
    assert expected.min() > 1.0  # logits large enough that a wrong scale or mask shows
    mla.reset_max_logits()
    assert torch.isinf(mla.max_logits_H).all()
