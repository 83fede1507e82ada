"""Memory per GPU of a layout (launch.plan's): named terms in bytes on one GPU of a pipeline stage,
grouped by when they are alive, and the stage's peak. See launch/plan.py for the layout and the
precisions; the saved activations come from launch/planning/activations.py.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from launch.planning.activations import in_flight, layer_bytes, micro_batch_activations
from launch.planning.params import buffer_bytes, layer_params, stage_params
from moe.config import ModelConfig

if TYPE_CHECKING:
    from launch.plan import Layout


def dtype_bytes(lay: Layout) -> tuple[int, int, int]:
    """(weight, gradient, activation) bytes per element."""
    w = 2 if lay.precision == "bf16" else 4
    g = {"auto": w, "fp32": 4, "bf16": 2}[lay.grad_dtype]
    return w, g, 4 if lay.precision == "fp32" else 2


def stage_memory(cfg: ModelConfig, lay: Layout, stage: int, layers: list[int]) -> dict:
    """Named memory terms, bytes on one GPU of `stage`, by when they are alive: persistent ones always,
    backward ones while micro-batches run, step ones inside the optimizer step (the activations are
    gone by then). Sharding divides by the replicas of a weight: dp for dense ones, dp/ep for experts.
    One process (gpus = 1) runs without DeepSpeed: no ZeRO."""
    w, g, a = dtype_bytes(lay)
    first, last = stage == 0, stage == lay.pp - 1
    n = stage_params(cfg, layers, first, last, lay.ep)
    dense = n["matrices"] + n["vectors"] + n["embedding"]
    adamw_n = n["vectors"] + n["embedding"] + (n["matrices"] + n["experts"] if lay.optimizer == "adamw" else 0)
    muon_n = dense + n["experts"] - adamw_n
    distributed = lay.gpus > 1
    zero = lay.zero if distributed else 0
    edp = lay.dp // lay.ep

    def sharded(dense_part: float, expert_part: float, from_stage: int) -> float:
        if zero < from_stage:
            return dense_part + expert_part
        return dense_part / lay.dp + expert_part / edp

    mb = micro_batch_activations(cfg, layers, first, last, a, lay, bf16_weights=w == 2)
    tokens = lay.seq_len * lay.micro_batch
    owned = sharded(dense, n["experts"], 1)  # elements of this rank's ZeRO partition (all, without ZeRO)
    group_max = max(_group_partitions(cfg, layers, n, lay, edp)) if zero else 0.0
    persistent = {
        # The working weights the forward reads (ZeRO-3: this rank's shard; gathering one block at a
        # time is in "comm_buffers").
        "weights": w * sharded(dense, n["experts"], 3),
        # fp32 master copies: of bf16 weights (optim.Muon's state, DeepSpeed's partitions), and under
        # DeepSpeed's ZeRO in any precision (its fp32 partition is a copy even of fp32 weights).
        "fp32_masters": 4 * owned if w == 2 or zero else 0.0,
        # Muon: one fp32 momentum per matrix element; AdamW: two moments (optim/muon.py, torch.optim.AdamW).
        "optimizer_state": 4 * _optimizer_elements(muon_n, adamw_n, n, lay, zero, edp),
        "buffers": float(buffer_bytes(cfg, layers)),
    }
    backward = {
        # Gradients in their accumulation dtype while micro-batches run; ZeRO-2 reduces each bucket
        # into the owner's partition as it fills, ZeRO-0/1 keep them whole until the last micro-batch.
        "gradients": g * sharded(dense, n["experts"], 2),
        # Saved for backward, per micro-batch times the micro-batches in flight at the stage's peak.
        "activations": mb * in_flight(lay.pp, lay.vpp, lay.microbatches, stage),
        # full recompute rebuilds one block's saved tensors at a time during backward.
        "recompute_working_set": tokens * max((layer_bytes(cfg, layer, a, dataclasses.replace(lay, recompute="none"))
                                               for layer in layers), default=0) if lay.recompute == "full" else 0.0,
        # The head's [b, T, V] output held by the caller and its fp32 gradient (last stage only).
        # Under a pipeline, twice: DeepSpeed's 1F1B keeps at least two pipe buffers on every stage
        # (TrainSchedule.num_pipe_buffers), so the last stage still holds the previous micro-batch's
        # when it makes the next one's. Measured on CPU fp32 (tests/dist/plan_pipeline_check.py): the
        # last stage's peak exceeded the single count by this term plus 0.3%, at vocabularies 512 and 4096.
        "logits": tokens * cfg.vocab_size * (a + 4) * (2 if lay.pp > 1 else 1) if last else 0.0,
        "comm_buffers": _comm_buffers(cfg, lay, layers, n, w, g, a),
    }
    step = {
        # Under ZeRO only the rank's reduced partition survives into the step (measured: DeepSpeed
        # frees each .grad once reduced).
        "step_gradients": g * owned,
        # DeepSpeed steps one optimizer group at a time, first flattening that group's gradient
        # partition into an fp32 copy: the largest group's counts.
        "fp32_grad_partition": 4 * group_max if zero else 0.0,
        "step_temporaries": _step_temporaries(cfg, layers, lay, zero, group_max, first or last),
    }
    return {"persistent": persistent, "backward": backward, "step": step}


def _group_partitions(cfg: ModelConfig, layers: list[int], n: dict, lay: Layout, edp: int) -> list[float]:
    """Elements of this rank's ZeRO partition of each optimizer group, as DeepSpeed partitions them.
    optim.build's groups: Muon for the matrices, a second Muon group for the routed experts' fused
    gate_up (row_blocks 2, optim/muon.py), AdamW for embeddings, head and vectors; AdamW alone: one
    group. Under EP, DeepSpeed splits every group into its expert part (over the dp/ep replicas of an
    expert) and the rest (over dp)."""
    moe_layers = sum(cfg.is_moe_layer(layer) for layer in layers)
    gate_up = cfg.num_experts // lay.ep * 2 * cfg.moe_intermediate_size * cfg.hidden_size * moe_layers
    adamw = n["vectors"] + n["embedding"]
    if lay.optimizer == "adamw":
        groups = [(n["matrices"] + adamw, n["experts"])]
    else:
        groups = [(n["matrices"], n["experts"] - gate_up), (0, gate_up), (adamw, 0)]
    if lay.ep > 1:
        groups = [(d, 0) for d, _ in groups] + [(0, e) for _, e in groups]
    return [d / lay.dp + e / edp for d, e in groups]


def _step_temporaries(cfg: ModelConfig, layers: list[int], lay: Layout, zero: int, group_max: float,
                      has_vocab: bool) -> float:
    """Bytes the optimizer step allocates and frees. Under ZeRO, ZeroMuon's gathered gradient range and
    its update buffer, one group's partition each (AdamW: update and denominator); then, for the largest
    parameter, Newton-Schulz's temporaries: measured 4 copies of it and 2 of half its size (small, ZeRO-1
    and ZeRO-2 with EP, tests/dist/plan_memory_check.py). Without ZeRO, the update direction and
    Newton-Schulz's (or Adam's) temporaries, ~3 copies of the largest parameter (one process, measured)."""
    if not zero:
        return 3 * 4 * _largest_parameter(cfg, layers, has_vocab, lay.ep)
    if lay.optimizer == "adamw":
        return 2 * 4 * group_max + 3 * 4 * _largest_parameter(cfg, layers, has_vocab, lay.ep)
    return 2 * 4 * group_max + 5 * 4 * _largest_parameter(cfg, layers, False, lay.ep)


def _largest_parameter(cfg: ModelConfig, layers: list[int], has_vocab: bool, ep: int) -> int:
    """Elements of the largest single parameter tensor on a stage (the optimizer's temporaries scale with it)."""
    D, H = cfg.hidden_size, cfg.num_heads
    moe = any(cfg.is_moe_layer(layer) for layer in layers)
    dense = any(not cfg.is_moe_layer(layer) for layer in layers)
    return max(cfg.vocab_size * D * has_vocab, 2 * cfg.moe_intermediate_size * D * cfg.num_experts // ep * moe,
               D * cfg.intermediate_size * dense, cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim),
               H * cfg.v_head_dim * D, (cfg.q_lora_rank or D) * H * cfg.qk_head_dim)


def _optimizer_elements(muon_n: int, adamw_n: int, n: dict, lay: Layout, zero: int, edp: int) -> float:
    """State elements: Muon's momentum (1 per element), AdamW's exp_avg and exp_avg_sq (2), sharded from ZeRO-1."""
    if zero == 0:
        return muon_n + 2 * adamw_n
    expert_per = 2 if lay.optimizer == "adamw" else 1  # experts are matrices: Muon unless AdamW everywhere
    expert = expert_per * n["experts"]
    return (muon_n + 2 * adamw_n - expert) / lay.dp + expert / edp


def _comm_buffers(cfg: ModelConfig, lay: Layout, layers: list[int], n: dict, w: int, g: int, a: int) -> float:
    """Transient buffers of the collectives, largest case each, all counted as live at once:
    DeepSpeed's gradient reduce bucket (bucket_elems in the gradient dtype, allocated whole however
    small the model: measured on CPU, tests/dist/plan_memory_check.py); the expert all-to-all's send and
    receive rows of one layer's backward [b*T*K, D]; pipeline p2p send and receive of one activation and
    one gradient [b, T, D]; ZeRO-3 gathers one block's weights at a time."""
    tokens = lay.seq_len * lay.micro_batch
    D, K = cfg.hidden_size, cfg.num_experts_per_tok
    total = 0.0
    if lay.gpus > 1 and lay.zero:
        total += lay.bucket_elems * g
    if lay.ep > 1 and any(cfg.is_moe_layer(layer) for layer in layers):
        total += 2 * tokens * K * D * a
    if lay.pp > 1:
        total += 4 * tokens * D * a
    if lay.zero == 3 and lay.gpus > 1:
        total += w * max((sum(layer_params(cfg, layer).values()) for layer in layers), default=0)
    return total


def peak_bytes(phases: dict) -> float:
    """The stage's peak: the persistent terms plus the larger of the backward and the step phase.
    Gradients count whole beside the activations: with more than one micro-batch per step they are
    alive while the next micro-batch's activations are (with one, this overstates the peak a little)."""
    return sum(phases["persistent"].values()) + max(sum(phases["backward"].values()), sum(phases["step"].values()))
