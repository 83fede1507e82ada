"""Incremental decoding through MLA's compressed cache, and generation on token ids.

References: the model's own full (non-cached) forward, and transformers' DeepseekV3ForCausalLM
greedy generate on the exported weights. fp32 on the CPU, where paths differ only in summation order.

Shape legend: B sequences, T tokens, V vocabulary, L_moe MoE layers, K experts per token.
"""

import math

import pytest
import torch
from transformers import DeepseekV3ForCausalLM

from moe.cache import LatentCache, cache_bytes_per_token, per_head_cache_bytes_per_token
from moe.config import PRESETS, preset
from moe.generate import generate, sample
from moe.hf import export_hf
from moe.model import Transformer

ATOL = 1e-5

# On top of the tiny preset (1 dense + 1 MoE layer, q-LoRA, one shared expert).
VARIANTS = {
    "tiny": {},
    "no_q_lora": dict(q_lora_rank=None),  # queries through q_proj
    "all_moe_no_shared": dict(num_shared_experts=0, first_k_dense=0, num_layers=3),  # 3 MoE layers to capture
}

PROMPTS = [[5, 17, 300, 2, 9, 44, 101], [3, 1, 4, 1, 5, 9, 2], [511, 0, 77, 77, 8, 250, 13]]


def _model(variant: str = "tiny", seed: int = 0) -> Transformer:
    # init_std 0.1 (not 0.02): logits of a few units, so greedy tokens vary and a wrong path shows.
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", init_std=0.1, **VARIANTS[variant])).eval()
    for router in model.routers():  # biases that change the choice, so a misapplied one shows
        router.e_score_correction_bias.normal_(0.0, 0.1)
    return model


def _ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def _cached_logits(model, ids_BT, chunks: list[int], absorbed: bool) -> torch.Tensor:
    """Logits [B, T, V] from feeding ids_BT through a cache in chunks of the given sizes."""
    cache = LatentCache(model.cfg, ids_BT.shape[0], ids_BT.shape[1])
    out, start = [], 0
    for n in chunks:
        out.append(model.forward_cached(ids_BT[:, start : start + n], cache, absorbed=absorbed).logits)
        start += n
    assert start == ids_BT.shape[1] and cache.lengths_B.tolist() == [start] * ids_BT.shape[0]
    return torch.cat(out, dim=1)


# Chunk sizes fed to the cache: a prefill, then decoding one token at a time.
SCHEDULES = {
    "prefill_1": [1] * 19,  # decoding from the first token
    "prefill_6": [6] + [1] * 13,
    "prefill_13_then_chunk_4": [13, 4, 1, 1],  # a second multi-token call over a non-empty cache
    "prefill_all": [19],
}


@pytest.mark.parametrize("absorbed", [True, False], ids=["absorbed", "per_head"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_cached_decoding_equals_the_full_forward_at_every_position(variant, schedule, absorbed):
    model = _model(variant)
    ids = _ids(3, 19)
    full = model(ids).logits
    assert full.abs().max() > 1.0  # logits large enough that a wrong path shows above ATOL
    assert (_cached_logits(model, ids, SCHEDULES[schedule], absorbed) - full).abs().max().item() < ATOL


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_absorbed_and_per_head_paths_agree_and_absorbed_never_up_projects(variant):
    model = _model(variant)
    ids = _ids(2, 17, seed=3)
    calls = []
    hooks = [a.kv_b_proj.register_forward_hook(lambda *_: calls.append(1)) for a in model.attentions()]
    absorbed = _cached_logits(model, ids, [9] + [1] * 8, absorbed=True)
    assert calls == []  # W_UK and W_UV are used as matrices, kv_b_proj is never run on the cache
    per_head = _cached_logits(model, ids, [9] + [1] * 8, absorbed=False)
    assert len(calls) == 9 * model.cfg.num_layers
    for h in hooks:
        h.remove()
    assert (absorbed - per_head).abs().max().item() < ATOL


@torch.no_grad()
def test_right_padded_prefill_gives_each_sequence_its_own_positions():
    model = _model()
    lengths = [4, 11, 1]
    ids = _ids(3, 11, seed=5)
    cache = LatentCache(model.cfg, 3, 13)
    padded = model.forward_cached(ids, cache, num_new_B=lengths).logits
    assert cache.lengths_B.tolist() == lengths
    step = model.forward_cached(_ids(3, 1, seed=6), cache).logits
    for b, n in enumerate(lengths):
        alone = model(torch.cat([ids[b : b + 1, :n], _ids(3, 1, seed=6)[b : b + 1]], dim=1)).logits
        assert (padded[b, :n] - alone[0, :n]).abs().max().item() < ATOL
        assert (step[b, 0] - alone[0, n]).abs().max().item() < ATOL


@pytest.mark.parametrize("absorbed", [True, False], ids=["absorbed", "per_head"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_is_token_identical_to_transformers(tmp_path, variant, absorbed):
    model = _model(variant)
    export_hf(model, tmp_path / "ckpt")
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    n = 40
    # eos_token_id=None and min_new_tokens: HF must not stop early on its default eos (id 1). An
    # explicit mask, or HF would mask every id equal to pad_token_id (the 0 in PROMPTS[2]).
    ids = torch.tensor(PROMPTS)
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         min_new_tokens=n, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:].tolist()
    ours = generate(model, PROMPTS, n, absorbed=absorbed)
    assert len({t for seq in theirs for t in seq}) >= 20  # not one repeated token: the test can fail
    assert ours.tokens == theirs
    assert ours.finish_reasons == ["length"] * 3
    assert all(lp == [0.0] * n for lp in ours.logprobs)  # greedy draws from a point mass


def test_batched_prompts_of_different_lengths_equal_each_prompt_alone():
    model = _model("all_moe_no_shared")
    prompts = [[7, 8, 9], list(range(100, 113)), [42], [300, 301, 302, 303, 304, 305, 306]]
    batched = generate(model, prompts, 24, return_routing=True)
    for b, prompt in enumerate(prompts):
        alone = generate(model, [prompt], 24, return_routing=True)
        assert batched.tokens[b] == alone.tokens[0]
        assert max(abs(x - y) for x, y in zip(batched.model_logprobs[b], alone.model_logprobs[0])) < ATOL
        assert torch.equal(batched.routing[b], alone.routing[0])


def test_stop_tokens_end_their_sequence_and_max_new_tokens_bounds_the_rest():
    model = _model()
    free = generate(model, PROMPTS, 30)
    assert [len(t) for t in free.tokens] == [30, 30, 30] and free.finish_reasons == ["length"] * 3
    # The first token the second sequence produces after step 2 and not before becomes a stop token.
    seq = free.tokens[1]
    at = next(p for p in range(3, 30) if seq[p] not in seq[:p])
    stop = seq[at]
    stopped = generate(model, PROMPTS, 30, stop_tokens=[stop, 10_000])
    for b, tokens in enumerate(free.tokens):
        end = tokens.index(stop) + 1 if stop in tokens else 30
        assert stopped.tokens[b] == tokens[:end]  # the stop token is kept, nothing after it
        assert stopped.finish_reasons[b] == ("stop" if stop in tokens else "length")
        assert len(stopped.logprobs[b]) == len(stopped.model_logprobs[b]) == end
    assert stopped.tokens[1] == free.tokens[1][:at + 1]
    assert [len(t) for t in generate(model, PROMPTS, 1).tokens] == [1, 1, 1]


SAMPLERS = {
    "temperature": dict(temperature=1.3),
    "top_k": dict(temperature=0.8, top_k=5),
    "top_p": dict(temperature=1.0, top_p=0.6),
    "top_k_and_top_p": dict(temperature=1.5, top_k=20, top_p=0.9),
}


def _reference_probs(logits_V: torch.Tensor, temperature, top_k=None, top_p=None) -> list[float]:
    """The sampling distribution, token by token: most likely first, keep top_k, then until top_p."""
    p = (logits_V.double() / temperature).softmax(-1).tolist()
    order = sorted(range(len(p)), key=lambda i: -p[i])[: top_k or len(p)]
    mass = sum(p[i] for i in order)
    kept, held = [], 0.0
    for i in order:
        kept.append(i)
        held += p[i] / mass
        if top_p is not None and held >= top_p:
            break
    total = sum(p[i] for i in kept)
    return [p[i] / total if i in kept else 0.0 for i in range(len(p))]


def _reference_logprob(logits_V: torch.Tensor, token: int, **kwargs) -> float:
    q = _reference_probs(logits_V, **kwargs)[token]
    assert q > 0, f"token {token} was sampled outside the kept set"
    return math.log(q)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_seeded_sampling_is_reproducible_and_logprobs_match_the_full_forward(sampler):
    model = _model()
    kwargs = SAMPLERS[sampler]
    first = generate(model, PROMPTS, 32, seed=11, **kwargs)
    again = generate(model, PROMPTS, 32, seed=11, **kwargs)
    other = generate(model, PROMPTS, 32, seed=12, **kwargs)
    assert first == again
    assert first.tokens != other.tokens
    with torch.no_grad():
        for b, prompt in enumerate(PROMPTS):
            new = first.tokens[b]
            logits_TV = model(torch.tensor([prompt + new])).logits[0, len(prompt) - 1 : -1]
            raw = logits_TV.log_softmax(-1).gather(1, torch.tensor(new)[:, None]).squeeze(1)
            assert max(abs(x - y) for x, y in zip(first.model_logprobs[b], raw.tolist())) < ATOL
            reference = [_reference_logprob(logits_TV[i], t, **kwargs) for i, t in enumerate(new)]
            assert max(abs(x - y) for x, y in zip(first.logprobs[b], reference)) < ATOL


def test_top_k_1_is_greedy():
    model = _model()
    greedy = generate(model, PROMPTS, 20)
    top1 = generate(model, PROMPTS, 20, temperature=0.7, top_k=1, seed=3)
    assert top1.tokens == greedy.tokens
    assert all(lp == [0.0] * 20 for lp in top1.logprobs)


# Each keeps a different set of the 6 tokens: all, the top 3, the smallest set holding 0.7.
@pytest.mark.parametrize("kwargs", [dict(temperature=0.5), dict(temperature=1.0, top_k=3), dict(temperature=1.0, top_p=0.7)])
def test_sample_draws_tokens_with_the_probabilities_it_reports(kwargs):
    # One row of 6 logits repeated 40,000 times: frequencies within 0.01 (4+ standard errors).
    logits_V = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0, 0.0])
    n = 40_000
    options = {"top_k": None, "top_p": None, **kwargs}
    token_B, logp_B = sample(logits_V.expand(n, -1), generator=torch.Generator().manual_seed(0), **options)
    expected = torch.tensor(_reference_probs(logits_V, **kwargs), dtype=torch.float64)
    counts = torch.bincount(token_B, minlength=6).double() / n
    assert (counts - expected).abs().max() < 0.01, (counts.tolist(), expected.tolist())
    assert ((expected == 0) <= (counts == 0)).all()  # truncated tokens are never drawn
    assert torch.allclose(logp_B.double(), expected[token_B].log(), atol=1e-6)


def _router_choices_by_hand(model, ids_BT) -> torch.Tensor:
    """[L_moe, B, T, K]: each MoE layer's router run by hand on that layer's input, block by block."""
    from moe.layers import rope_cos_sin
    from moe.moe import MoE

    B, T = ids_BT.shape
    cos, sin = rope_cos_sin(torch.arange(T), model.cfg.qk_rope_head_dim, model.cfg.rope_theta, torch.float32)
    x_BTD, chosen = model.embed_tokens(ids_BT), []
    for block in model.layers:
        h_BTD = x_BTD + block.self_attn(block.input_layernorm(x_BTD), cos, sin)
        if isinstance(block.mlp, MoE):
            chosen.append(block.mlp.gate(block.post_attention_layernorm(h_BTD)).topk_ids_NK.view(B, T, -1))
        x_BTD = block(x_BTD, cos, sin)
    return torch.stack(chosen)


@pytest.mark.parametrize("variant", ["tiny", "all_moe_no_shared"])
@torch.no_grad()
def test_routing_capture_matches_the_routers_choice(variant):
    model = _model(variant)
    ids = _ids(2, 15, seed=8)
    routing = model(ids, return_routing=True).routing
    L_moe = model.cfg.num_layers - model.cfg.first_k_dense
    assert routing.shape == (L_moe, 2, 15, model.cfg.num_experts_per_tok) and routing.dtype == torch.int64
    assert torch.equal(routing, _router_choices_by_hand(model, ids))
    assert all(not r._forward_hooks for r in model.routers())  # the capture leaves no hook behind
    # Generation: the experts of prompt + tokens[:-1], the inputs of a teacher-forced forward.
    gen = generate(model, PROMPTS[:2], 12, temperature=1.0, seed=0, return_routing=True)
    for b, prompt in enumerate(PROMPTS[:2]):
        seq = torch.tensor([prompt + gen.tokens[b][:-1]])
        assert torch.equal(gen.routing[b], model(seq, return_routing=True).routing[:, 0])


def test_routing_of_a_dense_model_is_empty_and_forward_is_unchanged_without_it():
    model = Transformer(preset("tiny", first_k_dense=2)).eval()  # no MoE layer
    ids = _ids(2, 5)
    out = model(ids, return_routing=True)
    assert out.routing.shape == (0, 2, 5, 2)
    plain = model(ids, ids)
    assert plain.routing is None and torch.equal(plain.logits, out.logits)
    assert generate(model, [[1, 2]], 3, return_routing=True).routing[0].shape == (0, 4, 2)


def test_generate_leaves_the_model_in_its_mode_and_counts_no_load():
    model = _model()
    model.train()
    model.attentions()[0].record_max_logits = True
    generate(model, PROMPTS, 5, temperature=1.0, seed=0)
    assert all(m.training for m in model.modules())
    assert all(r.tokens_per_expert_E.sum() == 0 for r in model.routers())  # sampling is no training load
    assert model.attentions()[0].max_logits_H.isinf().all()


def test_cache_bytes_per_token():
    k2 = preset("kimi-k2")
    # 512 + 64 numbers per layer (DeepSeek-V2 Table 1: (d_c + d_h^R) l) vs 64 heads x (192 + 128).
    assert cache_bytes_per_token(k2, torch.bfloat16) == 61 * 576 * 2
    assert per_head_cache_bytes_per_token(k2, torch.bfloat16) == 61 * 64 * (192 + 128) * 2
    for name in PRESETS:
        cfg = preset(name)
        assert cache_bytes_per_token(cfg, torch.float32) < per_head_cache_bytes_per_token(cfg, torch.float32)
    tiny = preset("tiny")  # the function describes the buffer the cache really allocates
    assert LatentCache(tiny, 1, 1, dtype=torch.bfloat16).kv_LBSC.nbytes == cache_bytes_per_token(tiny, torch.bfloat16)


def test_bad_calls_are_refused_with_the_numbers():
    model = _model()
    cache = LatentCache(model.cfg, 2, 6)
    model.forward_cached(_ids(2, 4), cache)
    with pytest.raises(ValueError, match=r"appending 3 token\(s\) to a sequence of length 4 needs 7 positions; .*max_len = 6"):
        model.forward_cached(_ids(2, 3), cache)
    with pytest.raises(ValueError, match="batch size 3 but the cache holds 2"):
        model.forward_cached(_ids(3, 1), cache)
    with pytest.raises(ValueError, match=r"num_new_B = \[1, 5\] must lie in \[0, T = 2\]"):
        model.forward_cached(_ids(2, 2), cache, num_new_B=[1, 5])
    with pytest.raises(ValueError, match="token id 512 is outside the vocabulary"):
        model.forward_cached(torch.full((2, 1), 512), cache)
    with pytest.raises(ValueError, match="max_len = 5000 must be in"):
        LatentCache(model.cfg, 1, 5000)
    with pytest.raises(ValueError, match=r"longest prompt \(4000 tokens\) \+ max_new_tokens \(100\) exceeds .*4096"):
        generate(model, [[1] * 4000], 100)
    with pytest.raises(ValueError, match=r"prompts\[1\] holds token id 600"):
        generate(model, [[1], [2, 600]], 4)
    with pytest.raises(ValueError, match=r"prompts\[0\] must be a non-empty list"):
        generate(model, [[]], 4)
    with pytest.raises(ValueError, match="top_p = 0 must be in"):
        generate(model, [[1]], 4, temperature=1.0, top_p=0)


@pytest.mark.parametrize("kwargs", [dict(temperature=1.0), dict(temperature=0.8, top_k=5), dict(temperature=1.0, top_p=0.9)])
def test_sequence_seeds_make_a_cut_off_sequence_continue_as_one_uninterrupted_call(kwargs):
    model = _model()
    seeds = [101, 202, 303]
    whole = generate(model, PROMPTS, 24, sequence_seeds=seeds, **kwargs)
    assert whole == generate(model, PROMPTS, 24, sequence_seeds=seeds, **kwargs)
    assert whole.tokens != generate(model, PROMPTS, 24, sequence_seeds=[1, 2, 3], **kwargs).tokens
    # Cut after 9 tokens, then continue each from its prompt + what it had: the same 24 tokens.
    first = generate(model, PROMPTS, 9, sequence_seeds=seeds, **kwargs)
    rest = generate(model, [p + t for p, t in zip(PROMPTS, first.tokens)], 15, sequence_seeds=seeds, **kwargs)
    assert [a + b for a, b in zip(first.tokens, rest.tokens)] == whole.tokens
    for b in range(len(PROMPTS)):
        joined = first.model_logprobs[b] + rest.model_logprobs[b]
        assert max(abs(x - y) for x, y in zip(joined, whole.model_logprobs[b])) < ATOL
    # A sequence's tokens do not depend on its batch: alone, or second in another batch.
    alone = generate(model, PROMPTS[1:2], 24, sequence_seeds=seeds[1:2], **kwargs)
    assert alone.tokens[0] == whole.tokens[1]


def test_gumbel_max_draws_tokens_with_the_probabilities_it_reports():
    logits_V = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0, 0.0])
    n = 40_000
    uniforms = torch.rand(n, 6, generator=torch.Generator().manual_seed(5))
    token_B, logp_B = sample(logits_V.expand(n, -1), 1.0, None, None, None, uniforms)
    expected = logits_V.double().softmax(-1)
    counts = torch.bincount(token_B, minlength=6).double() / n
    assert (counts - expected).abs().max() < 0.01, (counts.tolist(), expected.tolist())
    assert torch.allclose(logp_B.double(), expected[token_B].log(), atol=1e-6)
