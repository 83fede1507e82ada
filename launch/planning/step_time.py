"""Hardware presets and the step-time estimate of launch.plan: traffic per step, bubble, seconds, MFU.

Figures are stated, not measured here: peak bf16 FLOP/s from launch.metrics.mfu, HBM and NVLink from
the vendors' datasheets, fabric bandwidth per GPU from the NICs per node. How much of them a run
achieves is the caller's assumption (Layout.compute_efficiency, Layout.comm_efficiency).
"""

from __future__ import annotations

from dataclasses import dataclass

from launch.metrics.mfu import BF16_PEAK, flops_per_token
from moe.config import ModelConfig


@dataclass(frozen=True)
class GPU:
    peak_flops: float  # dense bf16 tensor-core FLOP/s (launch.metrics.mfu.BF16_PEAK)
    hbm_bytes: float
    hbm_bw: float  # bytes/s
    nvlink_bw: float  # bytes/s one direction, per GPU, inside a node
    gpus_per_node: int = 8


# Vendors' datasheets (SXM parts): H100 80 GB HBM3 3.35 TB/s, NVLink 900 GB/s both directions;
# H800 the same but NVLink 400 GB/s; H200 141 GB HBM3e 4.8 TB/s; A100 80 GB 2.04 TB/s, NVLink
# 600 GB/s; L40S 48 GB GDDR6 864 GB/s, no NVLink (PCIe 4.0 x16, 32 GB/s each way).
GPUS = {
    "h100": GPU(BF16_PEAK["H100"], 80e9, 3.35e12, 450e9),
    "h800": GPU(BF16_PEAK["H800"], 80e9, 3.35e12, 200e9),
    "h200": GPU(BF16_PEAK["H200"], 141e9, 4.8e12, 450e9),
    "a100": GPU(BF16_PEAK["A100"], 80e9, 2.039e12, 300e9),
    "l40s": GPU(BF16_PEAK["L40S"], 48e9, 0.864e12, 32e9),
}
# Inter-node bytes/s one direction per GPU, for 8-GPU nodes: "8x400g" is one 400 Gb/s NIC per GPU
# (DGX H100's ConnectX-7 rail; Kimi K2's H800 nodes have 8 x 400 Gb/s RoCE, tech report §2.4.1).
FABRICS = {"8x400g": 400e9 / 8, "8x200g": 200e9 / 8, "4x400g": 400e9 / 8 / 2, "1x100g": 100e9 / 8 / 8}


def step_estimate(cfg: ModelConfig, lay, gpu: GPU, active_params: int, n: dict, g: int, a: int,
                  optimizer_bytes: float) -> dict:
    """Traffic one GPU sends per optimizer step, the pipeline bubble, and a step time from the stated
    hardware figures. Assumptions: compute runs at compute_efficiency of peak; collectives at
    comm_efficiency of the link; stages are balanced (the average stage's share of the model); the
    data-parallel reduction is exposed (DeepSpeed's overlap_comm is off by default), the all-to-all
    exposed but for a2a_overlap, pipeline p2p exposed; bubble idles the whole pipeline.

    Links: EP groups are consecutive ranks, so an all-to-all stays on NVLink when ep <= GPUs per node
    and otherwise splits between NVLink and the fabric; data-parallel peers stride over EP groups
    and pipeline neighbours over nodes, so both use the fabric unless the whole job is one node. The optimizer step is bound by HBM bandwidth: it reads
    and writes `optimizer_bytes` (launch.plan passes twice the rank's persistent and step terms).

    n: launch.plan.stage_params of the whole model on one EP rank; g, a: gradient and activation
    bytes per element."""
    tokens_per_rank = lay.global_batch_tokens / lay.dp  # tokens each data-parallel rank of a stage sees
    D, K = cfg.hidden_size, cfg.num_experts_per_tok
    node = gpu.gpus_per_node
    fabric = FABRICS[lay.fabric] if lay.gpus > node else gpu.nvlink_bw
    # Model FLOPs (launch.metrics.mfu: 6 per active parameter plus causal attention) and the recompute's extra.
    model_flops = flops_per_token(cfg, active_params, lay.seq_len) * lay.global_batch_tokens / lay.gpus
    forward_share = 1 / 3
    if lay.recompute == "full":
        extra = forward_share * model_flops
    elif lay.recompute == "selective":  # re-run q_b and kv_b (the MLA up-projections) forward
        up = (cfg.q_lora_rank or 0) * cfg.num_heads * cfg.qk_head_dim + \
            cfg.kv_lora_rank * cfg.num_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        extra = 2 * up * cfg.num_layers * lay.global_batch_tokens / lay.gpus
    else:
        extra = 0.0
    t_compute = (model_flops + extra) / (gpu.peak_flops * lay.compute_efficiency)

    moe_layers_per_stage = sum(cfg.is_moe_layer(l) for l in range(cfg.num_layers)) / lay.pp
    # Dispatch and combine forward, both again backward (and the forward pair again under full recompute);
    # a row whose expert lives on this rank (1/ep of them) stays put.
    passes = 6 if lay.recompute == "full" else 4
    a2a = passes * tokens_per_rank * K * D * a * (lay.ep - 1) / lay.ep * moe_layers_per_stage
    # Of the rows that leave a GPU, those for GPUs of its own node take NVLink, the rest the fabric; the
    # two run at once, so the slower share sets the time.
    intra = min(lay.ep, node) - 1
    t_a2a = 0.0 if lay.ep == 1 else max(a2a * intra / (lay.ep - 1) / gpu.nvlink_bw,
                                        a2a * (lay.ep - 1 - intra) / (lay.ep - 1) / FABRICS[lay.fabric]) / lay.comm_efficiency
    # An activation forward and a gradient backward across each of the v chunk boundaries per micro-batch.
    p2p = 2 * lay.vpp * tokens_per_rank * D * a if lay.pp > 1 else 0.0
    # Ring reduce-scatter of gradients and all-gather of weights (= an all-reduce's volume), per replica group.
    dense_per_stage = (n["matrices"] + n["vectors"] + n["embedding"]) / lay.pp
    expert_per_stage = n["experts"] / lay.pp
    edp = lay.dp // lay.ep
    dp_bytes = 2 * g * (dense_per_stage * (lay.dp - 1) / lay.dp + expert_per_stage * (edp - 1) / edp) \
        if lay.gpus > 1 else 0.0
    eff = lay.comm_efficiency
    t_p2p, t_dp = p2p / (fabric * eff), dp_bytes / (fabric * eff)
    bubble = (lay.pp - 1) / (lay.vpp * lay.microbatches + lay.pp - 1)
    busy = t_compute + t_a2a * (1 - lay.a2a_overlap) + t_p2p
    t_optimizer = optimizer_bytes / gpu.hbm_bw
    t_step = busy / (1 - bubble) + t_dp + t_optimizer
    return {
        "model_flops_per_gpu": model_flops, "recompute_flops_per_gpu": extra,
        "all_to_all_bytes": a2a, "pipeline_p2p_bytes": p2p, "dp_reduce_bytes": dp_bytes,
        "bubble": bubble,
        "seconds": {"compute": t_compute, "all_to_all": t_a2a, "pipeline_p2p": t_p2p, "dp_reduce": t_dp,
                    "optimizer": t_optimizer, "bubble": busy / (1 - bubble) - busy, "step": t_step},
        "tokens_per_second": lay.global_batch_tokens / t_step,
        "mfu": model_flops / (t_step * gpu.peak_flops),
    }
