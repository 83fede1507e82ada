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
    flat_grad, temporaries = _step_peak(cfg, layers, n, lay, edp, zero, first or last)
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
        # With more than one micro-batch ZeRO-2 holds two while activations are alive: DeepSpeed keeps
        # the partition's gradients accumulated so far (its all_grad_tensors) and copies the running
        # micro-batch's into a fresh partition buffer (grads_in_partition), allocated when the first
        # bucket is reduced: early in backward if the rank's gradients overflow one bucket, else at
        # its end when the activations are gone. Measured: small, EP 2, two micro-batches, a 39.5 MB
        # allocation (the partition) 16% into the second backward; tiny (under one bucket): at 96%.
        "gradients": g * sharded(dense, n["experts"], 2) * (2 if zero == 2 and lay.microbatches > 1
                                                            and dense + n["experts"] > lay.bucket_elems else 1),
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
        # partition into an fp32 copy; these two are the group's whose step peaks highest (_step_peak).
        "fp32_grad_partition": flat_grad,
        "step_temporaries": temporaries,
        # What DeepSpeed's pipe buffers still hold when the step runs (measured with 3 stages,
        # tests/dist/plan_pipeline_check.py): on the last stage, per buffer (two), the logits, as much
        # again that only their graph references (no Python object does) and the [b, T, D] input; on
        # a middle stage each buffer's input; on the first, nothing measurable.
        "pipe_buffers": _pipe_buffers(cfg, lay, stage, tokens, a),
    }
    return {"persistent": persistent, "backward": backward, "step": step}


def _groups(cfg: ModelConfig, layers: list[int], n: dict, lay: Layout, edp: int) -> list[dict]:
    """This rank's ZeRO partition of each optimizer group, as DeepSpeed partitions them: elements,
    replicas (the ranks it is split over), Muon's or AdamW's, whether it is one tensor, and the
    shapes of its Muon weights as (count, rows, cols) matrices (_ns_working_set's).
    optim.build's groups: Muon for the matrices, a second Muon group for the routed experts' fused
    gate_up (row_blocks 2, optim/muon.py), AdamW for embeddings, head and vectors; AdamW alone: one
    group. Under EP, DeepSpeed splits every group into its expert part (over the dp/ep replicas of an
    expert) and the rest (over dp)."""
    moe_layers = sum(cfg.is_moe_layer(layer) for layer in layers)
    gate_up = cfg.num_experts // lay.ep * 2 * cfg.moe_intermediate_size * cfg.hidden_size * moe_layers
    adamw = n["vectors"] + n["embedding"]
    dense_shapes, down_shapes, gate_up_shapes = _muon_shapes(cfg, layers, lay.ep)
    # (dense elements, expert elements, Muon's, dense shapes, expert shapes, expert tensors)
    if lay.optimizer == "adamw":
        parts = [(n["matrices"] + adamw, n["experts"], False, [], [], 2 * moe_layers)]
    else:
        parts = [(n["matrices"], n["experts"] - gate_up, True, dense_shapes, down_shapes, moe_layers),
                 (0, gate_up, True, [], gate_up_shapes, moe_layers), (adamw, 0, False, [], [], 0)]
    if lay.ep > 1:
        parts = [(d, 0, m, ds, [], 0) for d, _, m, ds, _, _ in parts] + \
                [(0, e, m, [], es, t) for _, e, m, _, es, t in parts]
    # Dense parts hold several tensors (a norm or an attention block's projections at least).
    return [{"elements": d / lay.dp + e / edp, "replicas": lay.dp if d else edp, "muon": m,
             "one_tensor": not d and t == 1, "shapes": ds + es} for d, e, m, ds, es, t in parts]


def _muon_shapes(cfg: ModelConfig, layers: list[int], ep: int) -> tuple[list, list, list]:
    """(count, rows, cols) of the stage's Muon weights as the matrices Newton-Schulz iterates on:
    the dense ones (MLA's projections, dense MLP, shared experts, router), the routed experts'
    down_proj and their fused gate_up (row_blocks 2: each expert's gate and up apart)."""
    D, H, E = cfg.hidden_size, cfg.num_heads, cfg.num_experts // ep
    q = [(1, cfg.q_lora_rank, D), (1, H * cfg.qk_head_dim, cfg.q_lora_rank)] if cfg.q_lora_rank else \
        [(1, H * cfg.qk_head_dim, D)]
    dense = q + [(1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, D),
                 (1, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank), (1, D, H * cfg.v_head_dim)]
    down, gate_up = [], []
    if any(cfg.is_moe_layer(layer) for layer in layers):
        F = cfg.moe_intermediate_size
        dense += [(1, F * cfg.num_shared_experts, D), (1, cfg.num_experts, D)]
        down, gate_up = [(E, D, F)], [(2 * E, F, D)]
    if any(not cfg.is_moe_layer(layer) for layer in layers):
        dense += [(1, cfg.intermediate_size, D)]
    return dense, down, gate_up


# optim.muon.NS_CHUNK_ELEMENTS, which the planner cannot import (it loads no torch; a test pins the two).
NS_CHUNK_ELEMENTS = 2**26


def _ns_working_set(shapes: list[tuple[int, int, int]]) -> float:
    """Elements Newton-Schulz holds at once for the costliest of these weights (optim.muon_chunks:
    a chunk of at most NS_CHUNK_ELEMENTS of its matrices, at least one): the Nesterov blend, X and
    the next X, one chunk each, and the two Gram products, each min(M, N) / max(M, N) of it.
    Measured to the byte on [8, 128, 256] and [2, 256, 64] stacks, whole and in chunks (tests/test_plan.py)."""
    held = 0.0
    for count, rows, cols in shapes:
        chunk = min(count, max(1, NS_CHUNK_ELEMENTS // (rows * cols))) * rows * cols
        held = max(held, chunk * (3 + 2 * min(rows, cols) / max(rows, cols)))
    return held


def _step_peak(cfg: ModelConfig, layers: list[int], n: dict, lay: Layout, edp: int, zero: int,
               has_vocab: bool) -> tuple[float, float]:
    """(flattened gradient, temporaries) in bytes of the optimizer step at its peak. DeepSpeed steps
    one group at a time, each on its flattened fp32 gradient partition (a view, not a copy, for a
    group of one tensor: torch's flatten of one tensor), so the peak is the group whose two sum highest.
    - Muon: Newton-Schulz's working set in fp32 (_ns_working_set). With more than one replica,
      ZeroMuon also holds the group's gathered gradient range (about its partition) and, while
      gathering, the send buffer (as much again).
    - AdamW: its direction and two temporaries, 3 copies of what it steps: under ZeRO the group's
      flat partition, else the largest tensor.
    - One process with bf16 weights: the fp32 copy of the gradient being stepped.
    AdamW alone under ZeRO keeps the fit measured before it (2 partitions + 3 copies of the largest
    parameter, tests/dist/plan_memory_check.py)."""
    largest = _largest_parameter(cfg, layers, has_vocab, lay.ep)
    if not zero:
        if lay.optimizer == "adamw":
            return 0.0, 3 * 4 * largest
        ns = 4 * _ns_working_set([shape for part in _muon_shapes(cfg, layers, lay.ep) for shape in part])
        cast = 4 * largest if lay.precision == "bf16" else 0
        return 0.0, max(ns, 3 * 4 * max(cfg.vocab_size * cfg.hidden_size * has_vocab, cfg.hidden_size)) + cast
    best = (0.0, 0.0)
    for group in _groups(cfg, layers, n, lay, edp):
        e = group["elements"]
        flat = 0.0 if group["one_tensor"] else 4 * e
        if lay.optimizer == "adamw":
            temporaries = 2 * 4 * e + 3 * 4 * largest
        elif not group["muon"]:
            temporaries = 3 * 4 * e
        else:
            ns = 4 * _ns_working_set(group["shapes"])
            temporaries = max(8 * e, 4 * e + ns) if group["replicas"] > 1 else ns
        best = max(best, (flat, temporaries), key=sum)
    return best


def _pipe_buffers(cfg: ModelConfig, lay: Layout, stage: int, tokens: int, a: int) -> float:
    """Bytes of the pipeline's buffers alive through the optimizer step (see stage_memory)."""
    if lay.pp == 1 or stage == 0:
        return 0.0
    if stage == lay.pp - 1:
        return 2 * tokens * (2 * cfg.vocab_size + cfg.hidden_size) * a
    buffers = max(2, min(lay.pp - stage, lay.microbatches))  # DeepSpeed's TrainSchedule.num_pipe_buffers
    return buffers * tokens * cfg.hidden_size * a


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
