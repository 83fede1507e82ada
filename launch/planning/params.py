"""Parameter counts of a layout, from the ModelConfig alone (launch.plan's): counted the way moe/ builds
the model (tests/test_plan.py checks them against a real one), and split by who shards them and which
optimizer rule applies (optim.muon.split_params: embeddings, head and 1-D parameters get AdamW; every
other matrix Muon). Also which blocks each pipeline rank holds.
"""

from __future__ import annotations

from launch.parallel.stage_cut import balanced_block_bounds
from moe.config import ModelConfig


def layer_params(cfg: ModelConfig, layer: int) -> dict:
    """Parameter counts of block `layer`: matrices (Muon's), vectors (norms, AdamW's), experts (EP-split)."""
    D, H = cfg.hidden_size, cfg.num_heads
    q = D * H * cfg.qk_head_dim if cfg.q_lora_rank is None else \
        D * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim
    attn = q + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) \
        + H * cfg.v_head_dim * D
    vectors = 2 * D + cfg.kv_lora_rank + (cfg.q_lora_rank or 0)  # two block norms, MLA's latent norms
    if not cfg.is_moe_layer(layer):
        return {"matrices": attn + 3 * D * cfg.intermediate_size, "vectors": vectors, "experts": 0}
    shared = 3 * D * cfg.moe_intermediate_size * cfg.num_shared_experts
    router = cfg.num_experts * D
    return {"matrices": attn + shared + router, "vectors": vectors,
            "experts": cfg.num_experts * 3 * D * cfg.moe_intermediate_size}


def stage_layers(cfg: ModelConfig, pp: int, vpp: int, ep: int) -> list[list[int]]:
    """Blocks of each pipeline rank. Plain 1F1B (vpp = 1): the cut `launch.train --pp-size` makes,
    balancing parameter counts with the embedding on stage 0 and the norm + head on the last
    (launch/parallel/stage_cut.py, weighed after EP's slice as the trainer weighs them), so a stage
    next to a large vocabulary holds fewer blocks. Interleaved (vpp > 1, modelled only): model chunk c
    of pp*vpp (contiguous, as even as can be) goes to rank c % pp, so rank s holds chunks s, s + pp,
    ... (Megatron's interleaved placement)."""
    if vpp == 1 and pp > 1:
        V, D = cfg.vocab_size, cfg.hidden_size
        blocks = [(lambda n: n["matrices"] + n["vectors"] + n["experts"] // ep)(layer_params(cfg, layer))
                  for layer in range(cfg.num_layers)]
        bounds = balanced_block_bounds(V * D, blocks, D + V * D, pp)  # the head's count as the trainer's: untied
        return [list(range(bounds[s], bounds[s + 1])) for s in range(pp)]
    chunks = pp * vpp
    bounds = [c * cfg.num_layers // chunks for c in range(chunks + 1)]
    return [[layer for c in range(s, chunks, pp) for layer in range(bounds[c], bounds[c + 1])] for s in range(pp)]


def stage_params(cfg: ModelConfig, layers: list[int], first: bool, last: bool, ep: int) -> dict:
    """Counts one rank of a stage holds: dense matrices and vectors (replicated over dp), its E/ep of the
    routed experts (replicated over dp/ep), embedding (first stage) and head and final norm (last)."""
    out = {"matrices": 0, "vectors": 0, "experts": 0, "embedding": 0}
    for layer in layers:
        for key, n in layer_params(cfg, layer).items():
            out[key] += n
    out["experts"] //= ep
    V, D = cfg.vocab_size, cfg.hidden_size
    tied_on_last = cfg.tie_embeddings and first
    out["embedding"] = V * D * (first + (last and not tied_on_last))
    out["vectors"] += D * last
    return out


def buffer_bytes(cfg: ModelConfig, layers: list[int]) -> int:
    """fp32 buffers: each router's balance bias and load counts [E] twice, each MLA's max logits [H]."""
    moe_layers = sum(cfg.is_moe_layer(layer) for layer in layers)
    return 4 * (2 * cfg.num_experts * moe_layers + cfg.num_heads * len(layers))


def param_totals(cfg: ModelConfig) -> dict:
    everything = stage_params(cfg, list(range(cfg.num_layers)), True, True, 1)
    inactive = sum(layer_params(cfg, l)["experts"] for l in range(cfg.num_layers)) * \
        (cfg.num_experts - cfg.num_experts_per_tok) // cfg.num_experts
    total = sum(everything.values())
    return {"total": total, "active": total - inactive}
