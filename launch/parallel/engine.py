"""How one optimizer step's gradients are produced and applied: plain PyTorch in one process, or a
DeepSpeed engine (ZeRO 0-3, expert parallelism) under a launcher. The trainer's loop is the same for
both; it talks to a `Stepper`:

    for each micro-batch: loss = stepper.forward(inputs, targets[, document_ids]).loss; stepper.backward(loss)
    result = stepper.step()   # clip, optimizer step (or skip on a non-finite gradient), zero grads

`backward` divides by the accumulation count in both (DeepSpeed does it inside `engine.backward`), so
a step's gradient is the mean over micro_batch x grad_accum x dp_size sequences either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from launch.checkpoint.shards import ShardSet
from launch.parallel import state_shards
from launch.parallel.distributed import all_reduce_router_counts
from launch.parallel.zero_muon import ZeroMuon, zero_row_scaler
from moe.moe import MoE
from optim import MuonClip, QKClip
from optim.muon import Muon


@dataclass
class StepResult:
    grad_norm: float  # global norm before clipping; inf or nan when the step was skipped for it
    applied: bool  # False: non-finite gradient, weights and optimizer state left as they were


class LocalStepper:
    """One process, no DeepSpeed: backward, clip_grad_norm_, optimizer.step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_accum: int, grad_clip: float):
        self.model, self.optimizer = model, optimizer
        self.grad_accum, self.grad_clip = grad_accum, grad_clip

    def forward(self, inputs, targets, document_ids=None):
        return self.model(inputs, targets, document_ids_BT=document_ids)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    @property
    def last_max_logits_LH(self) -> torch.Tensor | None:
        """The max logits [L, H] the optimizer's last QK-clip acted on (None without QK-clip)."""
        return getattr(self.optimizer, "last_max_logits_LH", None)

    def step(self) -> StepResult:
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()
        applied = math.isfinite(norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm, applied)

    def shards(self) -> ShardSet:
        """Weights and optimizer state, whole, keyed by their single-device names (a checkpoint's tensors)."""
        return state_shards.local_shards(self.model, self.optimizer)

    def load_shards(self, reader) -> None:
        """Weights and optimizer state from a sharded checkpoint of any layout (`launch.checkpoint.store.open_shards`)."""
        state_shards.load_local(self.model, self.optimizer, reader)


class DeepSpeedStepper:
    """A DeepSpeed engine. ZeRO-1/2/3 partition the optimizer state (and gradients, and weights);
    with expert parallelism the engine reduces expert gradients over the expert-data-parallel group
    only. A non-finite global gradient norm makes the ZeRO optimizer skip the step and clear the
    gradients; `was_step_applied` reports it."""

    def __init__(self, engine, qk_clip: QKClip | None = None):
        self.engine = engine
        self.model = engine.module
        self.qk_clip = qk_clip  # set when the optimizer is MuonClip: QK-clip after each step

    @property
    def last_max_logits_LH(self) -> torch.Tensor | None:
        """The max logits [L, H] the last clip acted on (None before the first, or without QK-clip)."""
        return None if self.qk_clip is None else self.qk_clip.last_max_logits_LH

    def forward(self, inputs, targets, document_ids=None):
        return self.engine(inputs, targets, document_ids_BT=document_ids)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only counts the micro-step; the update happens at the boundary

    def step(self) -> StepResult:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        applied = bool(self.engine.was_step_applied())
        if applied and self.qk_clip is not None:
            self.qk_clip()
        return StepResult(norm, applied)

    def shards(self) -> ShardSet:
        """This rank's weights and optimizer state as pieces of the single-device tensors: its ZeRO
        partition's fp32 masters and moments, its experts' under EP (`launch/parallel/state_shards.py`).
        Under ZeRO-3 every parameter is gathered in turn (collective)."""
        if self.engine.zero_optimization_stage() == 3:
            return state_shards.zero3_shards(self.model, self.engine.optimizer)
        return state_shards.zero_shards(self.model, self.engine.optimizer)

    def load_shards(self, reader) -> None:
        """This rank's share, from a sharded checkpoint of any layout."""
        if self.engine.zero_optimization_stage() == 3:
            state_shards.load_zero3(self.model, self.engine.optimizer, reader)
        else:
            state_shards.load_zero(self.model, self.engine.optimizer, reader)


def finish_step(model: nn.Module, result: StepResult) -> None:
    """After the optimizer step: router bias balancing on the global load, or a clean slate if skipped."""
    if result.applied:
        all_reduce_router_counts(model)
        model.update_router_biases()
    else:
        for router in model.routers():
            router.tokens_per_expert_E.zero_()
    for attn in model.attentions():
        attn.reset_max_logits()


def split_expert_param_groups(optimizer: torch.optim.Optimizer) -> None:
    """Give expert parameters (`allreduce = False`) param groups of their own marked `moe`, as
    DeepSpeed's ZeRO-1/2 require to reduce them over the expert-data-parallel group only. Each new
    group copies the hyper-parameters of the group its parameters came from."""
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        dense = [p for p in group["params"] if getattr(p, "allreduce", True)]
        experts: dict[str, list] = {}
        for p in group["params"]:
            if not getattr(p, "allreduce", True):
                experts.setdefault(p.group_name, []).append(p)
        if dense:
            groups.append({**group, "params": dense, "name": group.get("name", f"group{i}")})
        for name, params in experts.items():
            groups.append({**group, "params": params, "name": name, "moe": True})
    optimizer.param_groups[:] = groups


def build_deepspeed_stepper(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict, expert_parallel: bool):
    """`optimizer` as built by `optim.build` for `model` (after expert parallelism was applied)."""
    import deepspeed

    stage = ds_config["zero_optimization"]["stage"]
    qk_clip = None
    if isinstance(optimizer, MuonClip):
        qk_clip = optimizer.qk_clip
        qk_clip.row_scaler = zero_row_scaler  # ZeRO's partitions hold the fp32 masters
    if isinstance(optimizer, Muon):
        if stage == 3:
            raise ValueError(
                "muon/muonclip with zero_stage 3 is not supported: ZeRO-3 shards every matrix across ranks "
                "and steps the optimizer on flat shards, where Newton-Schulz would orthogonalise fragments. "
                "Use zero_stage 1 or 2 (optimizer state and gradients sharded, matrices orthogonalised whole)"
            )
        optimizer = ZeroMuon(optimizer)
    if expert_parallel:
        if ds_config["zero_optimization"]["stage"] == 3:
            raise ValueError("ep_size > 1 needs zero_stage 0, 1 or 2: DeepSpeed's ZeRO-3 does not partition "
                             "expert-parallel weights of client MoE layers")
        split_expert_param_groups(optimizer)
    if ds_config["zero_optimization"]["stage"] == 3:
        # ZeRO-3 re-gathers a module's weights for backward through hooks on the tensors its forward
        # returns; the router returns a `Routing` dataclass, which those hooks cannot see. Treating
        # each MoE block as one leaf gathers router, experts and shared expert together instead.
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [MoE])
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    if isinstance(optimizer, ZeroMuon):
        optimizer.attach(engine.optimizer)
    return DeepSpeedStepper(engine, qk_clip)
