"""Batched sampling from a Transformer on token ids (the engine knows nothing of text, as nanochat's).

Shape legend: B sequences, T tokens per call, V vocabulary, L_moe MoE layers, K experts per token.

Prompts of different lengths are prefilled in one right-padded call and then decoded one token per
sequence per step through the compressed cache (moe/cache.py); every sequence keeps its own
positions, so a prompt gives the same tokens in a batch as alone. A sequence ends at its first stop
token (kept in its output) or after max_new_tokens.

Draws come from one generator per call (`seed`), or, with `sequence_seeds`, from a stream per
sequence and position: the token at position p of sequence b is drawn with uniforms seeded by
(sequence_seeds[b], p) alone. A sequence's tokens then do not depend on the batch it is in or on
where a call stopped: continuing a cut-off sequence (its prompt + the tokens it had) with the same
seed gives the tokens of one uninterrupted call (RL's partial rollouts, posttrain/rl/rollout.py).
"""

from dataclasses import dataclass

import torch

from moe.cache import LatentCache
from moe.model import Transformer, eval_mode


@dataclass
class Generation:
    tokens: list[list[int]]  # new ids per sequence, the stop token included when one ended it
    logprobs: list[list[float]]  # log p of each token under the distribution it was drawn from (0.0 when greedy)
    model_logprobs: list[list[float]]  # log p under the model itself: temperature 1, no top-k / top-p
    finish_reasons: list[str]  # "stop" or "length"
    # Per sequence [L_moe, P + n - 1, K]: the experts of every position that predicted a token, i.e.
    # of the inputs prompt + tokens[:-1] of a teacher-forced forward (routing replay); None unless asked.
    routing: list[torch.Tensor] | None = None


def position_uniforms(seeds_B: list[int], positions_B: list[int], V: int, device) -> torch.Tensor:
    """[B, V] uniforms in [0, 1), row b from a CPU generator seeded by (seeds_B[b], positions_B[b]) alone
    (CPU, so a seed gives the same draws on any device)."""
    rows = []
    for seed, position in zip(seeds_B, positions_B):
        g = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + position) % 2**63)
        rows.append(torch.rand(V, generator=g))
    return torch.stack(rows).to(device)


def sample(logits_BV: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None, uniforms_BV: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B] and their log-probabilities [B] under the distribution actually sampled.

    With `uniforms_BV` the draw is argmax(log p + G), G = -log(-log U) Gumbel noise (the Gumbel-max
    trick: an exact draw from p), so it is a function of those uniforms alone; else torch.multinomial.

    temperature 0 is greedy (a point mass: log-probability 0). Otherwise logits / temperature, then
    top-k, then top-p (the smallest set of most likely tokens holding at least p of the mass,
    Holtzman et al. 2020 §3.1), renormalised; the order transformers' samplers use.
    """
    logits_BV = logits_BV.float()
    if temperature == 0:
        return logits_BV.argmax(dim=-1), logits_BV.new_zeros(logits_BV.shape[0])
    logits_BV = logits_BV / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        p_BV = sorted_BV.softmax(dim=-1)
        # Drop a token when the more likely ones already hold top_p: the first always stays.
        drop_BV = (p_BV.cumsum(dim=-1) - p_BV) >= top_p
        logits_BV = logits_BV.masked_fill(drop_BV.scatter(1, order_BV, drop_BV), float("-inf"))
    logp_BV = logits_BV.log_softmax(dim=-1)
    if uniforms_BV is not None:
        token_B = (logp_BV - (-uniforms_BV.log()).log()).argmax(dim=-1)
    else:
        token_B = torch.multinomial(logp_BV.exp(), 1, generator=generator).squeeze(1)
    return token_B, logp_BV.gather(1, token_B[:, None]).squeeze(1)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, stop_tokens=(), seed: int | None = None,
             absorbed: bool = True, return_routing: bool = False, sequence_seeds: list[int] | None = None) -> Generation:
    """Continue every prompt by up to max_new_tokens tokens; see Generation for what comes back.

    The model runs in eval mode (routers count no load, attention records no max logits) and gets
    its modes back afterwards. `seed` fixes the draws of one call; None draws a fresh seed.
    `sequence_seeds` (one int per prompt) replaces it with per-sequence, per-position draws (above).
    `absorbed` chooses the attention path (moe/attention.py); both give the same tokens.
    """
    cfg = model.cfg
    _check_request(prompts, max_new_tokens, temperature, top_k, top_p, cfg)
    if sequence_seeds is not None and (len(sequence_seeds) != len(prompts) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sequence_seeds)):
        raise ValueError(f"generate: sequence_seeds must be {len(prompts)} non-negative ints, one per prompt")
    weight = model.embed_tokens.weight
    device, B = weight.device, len(prompts)
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # a fresh, nondeterministic seed; a Generator's default one is a constant
    else:
        generator.manual_seed(seed)
    stops = torch.tensor(sorted(set(stop_tokens)), dtype=torch.int64, device=device)

    ids_BT = torch.zeros(B, longest, dtype=torch.int64)  # right-padded; the padding is never read
    for b, prompt in enumerate(prompts):
        ids_BT[b, : len(prompt)] = torch.tensor(prompt, dtype=torch.int64)
    lengths_B = torch.tensor(lengths, device=device)
    # The last token is only sampled, never fed back, so it needs no cache slot.
    cache = LatentCache(cfg, B, longest + max_new_tokens - 1, device, weight.dtype)

    with eval_mode(model):
        out = model.forward_cached(ids_BT.to(device), cache, lengths_B, absorbed, return_routing)
        logits_BV = out.logits[torch.arange(B, device=device), lengths_B - 1]
        routing = [out.routing] if return_routing else []
        steps = []  # per step: (token_B, logprob_B, model_logprob_B)
        done_B = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            uniforms_BV = None
            if sequence_seeds is not None and temperature > 0:
                uniforms_BV = position_uniforms(sequence_seeds, [n + step for n in lengths], logits_BV.shape[-1], device)
            token_B, logp_B = sample(logits_BV, temperature, top_k, top_p, generator, uniforms_BV)
            steps.append((token_B, logp_B, logits_BV.float().log_softmax(-1).gather(1, token_B[:, None]).squeeze(1)))
            done_B |= torch.isin(token_B, stops)
            if step == max_new_tokens - 1 or bool(done_B.all()):
                break
            out = model.forward_cached(token_B[:, None], cache, None, absorbed, return_routing)
            logits_BV = out.logits[:, -1]
            routing += [out.routing] if return_routing else []
    return _collect(steps, routing, lengths, set(stop_tokens))


def _collect(steps, routing, lengths: list[int], stops: set[int]) -> Generation:
    """Cut each sequence after its first stop token; one device-to-host copy per quantity."""
    tokens_BN, logp_BN, model_logp_BN = (torch.stack(x, dim=1).cpu().tolist() for x in zip(*steps))
    result = Generation([], [], [], [], [] if routing else None)
    # Decoding steps feed back every sequence's token; sequence b's routing is its prompt's, then
    # that of the steps that fed its own tokens but the last.
    routing_LBTK = torch.cat(routing, dim=2).cpu() if routing else None
    longest = max(lengths)
    for b, tokens in enumerate(tokens_BN):
        n = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
        result.tokens.append(tokens[:n])
        result.logprobs.append(logp_BN[b][:n])
        result.model_logprobs.append(model_logp_BN[b][:n])
        result.finish_reasons.append("stop" if tokens[n - 1] in stops else "length")
        if routing_LBTK is not None:
            prompt_part = routing_LBTK[:, b, : lengths[b]]
            result.routing.append(torch.cat([prompt_part, routing_LBTK[:, b, longest : longest + n - 1]], dim=1))
    return result


def _check_request(prompts, max_new_tokens, temperature, top_k, top_p, cfg) -> None:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("generate: prompts must be a non-empty list of token-id lists")
    for b, prompt in enumerate(prompts):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError(f"generate: prompts[{b}] must be a non-empty list of ints (token ids)")
        if bad := [t for t in prompt if not 0 <= t < cfg.vocab_size]:
            raise ValueError(f"generate: prompts[{b}] holds token id {bad[0]}, outside the vocabulary [0, {cfg.vocab_size})")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens = {max_new_tokens!r} must be an int >= 1")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"generate: the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"ModelConfig.max_seq_len = {cfg.max_seq_len}"
        )
    if not temperature >= 0:
        raise ValueError(f"generate: temperature = {temperature} must be >= 0 (0: greedy)")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"generate: top_k = {top_k!r} must be an int >= 1 or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p = {top_p} must be in (0, 1] or None")
