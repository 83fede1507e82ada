"""Pipeline parallelism through DeepSpeed's pipeline engine, built from outside the model.

A `Transformer` (moe/model.py) is cut into `pp` stages of consecutive pieces:

    stage 0:      embed_tokens, blocks [0, b1)
    stage s:      blocks [b_s, b_{s+1})
    stage pp-1:   blocks [b_{pp-1}, L), norm, lm_head; DeepSpeed applies the loss after it

Each `PipelineStage` holds the Transformer's own modules under the Transformer's own names, so a
stage's `named_parameters()` are those of the full model ("layers.3.self_attn..."), and the model
code is unchanged. The stages go to `deepspeed.pipe.PipelineModule` one per pipeline layer, so
DeepSpeed's partitioner has nothing to decide; the cut is ours: balanced by parameter count
(launch/parallel/stage_cut.py over embed, each block, head: the cut launch.plan models too) or an
explicit blocks-per-stage list.
`PipelineEngine.train_batch` runs DeepSpeed's TrainSchedule (1F1B: each stage alternates one
forward and one backward once the pipe is full, so at most pp micro-batches are in flight).

What crosses a stage boundary is one tensor, the hidden state x [B, T, D]: RoPE tables are
recomputed on every stage from T, and the MoE balance loss never travels. Each MoE block's aux loss
is attached to the block's output by `_AuxLossGrad`: identity forward, and in backward the aux loss
receives its gradient 1/grad_accum (d loss / d aux, the loss being lm + sum of aux, divided by the
accumulation count as DeepSpeed's last stage does) and sends it back through the router into x.
That is the gradient the unpipelined model gets, stage by stage, with nothing sent but x's gradient.
The values of the aux losses are summed on each stage for the logs.

The router load counts stay in each stage's routers (buffers); after a step they are summed over
the stage's data-parallel group only (the ranks holding the same layers) before the bias update.
Expert parallelism sits inside a stage (launch/parallel/distributed.py's layout). Gradient clipping,
the global norm and the non-finite-step skip are DeepSpeed's ZeRO-1: the norm and the overflow flag
are all-reduced over the pipeline group too, so every stage clips by, and skips on, the same number.

Checkpoints: a stage's shards carry the full model's names (`PipelineStepper.shards`), so the
stages' checkpoints together are the single-device model's (launch/parallel/state_shards.py).

Muon runs as under ZeRO without pipelining (launch/parallel/zero_muon.py), over each stage's own
partitions. MuonClip too, with QK-clip done per stage after each applied step: a stage clips only
its own blocks' attentions, from the max logits its forwards recorded during the step's
micro-batches, maxed over the stage's data-parallel group (never over other stages, which hold other
layers), and scales the rows of ZeRO's fp32 masters (`zero_row_scaler`). That is K2's rule as
published, `qk_clip_remeasure=False`: the exact re-measure (optim/qk_clip.py) re-forwards the last
micro-batch through every layer in turn, which across stages would mean running the pipeline again,
so `check_pipeline` refuses `qk_clip_remeasure=True` rather than silently falling back.

Not supported yet, refused by `check_pipeline` (and TrainConfig): ZeRO-2/3 (DeepSpeed's pipeline
engine refuses them), tied embeddings (would need TiedLayerSpec), MuonClip's re-measure (above).
Packed batches (document ids would have to travel too) are refused by `PipelineStepper.train_step`.

A fresh model is built on the meta device on every rank (same seed, so the same `init_seed`), cut
into stages, and only this rank's stage is allocated and initialised (moe/model.py's
`materialize`): each tensor draws from the seed and its own name, so a stage holds exactly what
those layers hold in the whole model, and host memory grows with the stage, not with the model. A
model loaded from a checkpoint or Hugging Face (`init_from`) is still whole on every rank before the
cut.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

from launch.parallel import state_shards
from launch.parallel.distributed import all_reduce_router_counts
from launch.parallel.engine import StepResult, split_expert_param_groups
from launch.parallel.stage_cut import balanced_block_bounds
from launch.parallel.zero_muon import ZeroMuon, zero_row_scaler
from moe.config import ConfigError, ModelConfig
from moe.layers import rope_cos_sin
from moe.loss import logits_cross_entropy
from moe.model import Transformer, materialize
from moe.moe import MoE
from moe.router import Router
from optim import MuonClip, QKClip
from optim.muon import Muon


class _AuxLossGrad(torch.autograd.Function):
    """x -> x; backward gives `aux` the gradient `scale` (its weight in the loss being minimised)."""

    @staticmethod
    def forward(ctx, x, aux, scale: float):
        ctx.scale, ctx.aux_meta = scale, (aux.dtype, aux.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x):
        dtype, device = ctx.aux_meta
        return grad_x, torch.full((), ctx.scale, dtype=dtype, device=device), None


class PipelineStage(nn.Module):
    """Blocks [start, stop) of `model`, with the embedding in front on the first stage and the final
    norm and head behind on the last. forward: token ids [B, T] (first stage) or x [B, T, D] ->
    x [B, T, D], or logits [B, T, V] on the last stage."""

    def __init__(self, model: Transformer, start: int, stop: int, first: bool, last: bool, grad_accum: int):
        super().__init__()
        cfg: ModelConfig = model.cfg
        self.rope_dim, self.rope_theta = cfg.qk_rope_head_dim, cfg.rope_theta
        self.aux_scale = 1.0 / grad_accum
        self.embed_tokens = model.embed_tokens if first else None
        # Keys are the global block indices, so parameter names are the full model's.
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in range(start, stop)})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.aux_sum = torch.zeros(())  # detached aux losses of this stage's MoE blocks since the last read

    def forward(self, x):
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
        positions_T = torch.arange(x.shape[1], device=x.device)
        cos, sin = rope_cos_sin(positions_T, self.rope_dim, self.rope_theta, x.dtype)  # [T, R/2], as Transformer
        for block in self.layers.values():
            x = block(x, cos, sin)
            if isinstance(block.mlp, MoE) and block.mlp.aux_loss.requires_grad:
                aux = block.mlp.aux_loss
                self.aux_sum = self.aux_sum.to(aux.device) + aux.detach().float()
                x = _AuxLossGrad.apply(x, aux, self.aux_scale)
        if self.lm_head is not None:
            x = self.lm_head(self.norm(x))
        return x


def stage_bounds(model: Transformer, pp_size: int, blocks_per_stage: list[int] | None = None) -> list[int]:
    """Block boundaries [0, b1, ..., L] of the pp_size stages (stage s runs blocks [b_s, b_{s+1})).

    Without `blocks_per_stage` the cut balances parameters: the embedding (stage 0), each block and
    the norm + head (last stage) are weighed by their parameter counts on this rank (after expert
    parallelism took its slice), as stage_cut.balanced_block_bounds cuts them."""
    L = len(model.layers)
    if blocks_per_stage is not None:
        if len(blocks_per_stage) != pp_size or any(n < 0 for n in blocks_per_stage) or sum(blocks_per_stage) != L:
            raise ConfigError(f"blocks_per_stage = {list(blocks_per_stage)}: need {pp_size} counts >= 0 (one per stage) "
                              f"summing to num_layers = {L}")
        bounds = [0]
        for n in blocks_per_stage:
            bounds.append(bounds[-1] + n)
    else:
        if pp_size > L + 2:
            raise ConfigError(f"pp_size = {pp_size} exceeds num_layers + 2 = {L + 2} (embedding, blocks, head): "
                              "some stage would hold nothing")
        count = lambda *modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
        bounds = balanced_block_bounds(count(model.embed_tokens), [count(b) for b in model.layers],
                                       count(model.norm, model.lm_head), pp_size)
    for s in range(1, pp_size - 1):
        if bounds[s] == bounds[s + 1]:
            raise ConfigError(f"pipeline stage {s} of {pp_size} would hold no block (block boundaries {bounds}); "
                              "give every middle stage at least one block")
    return bounds


def check_pipeline(model_cfg: ModelConfig, *, pp_size: int, zero_stage: int, optimizer: torch.optim.Optimizer) -> None:
    """Refuse what pipeline parallelism does not do (yet) instead of doing it wrongly."""
    if pp_size == 1:
        return
    if zero_stage != 1:
        raise ConfigError(f"pp_size = {pp_size} needs zero_stage 1; got {zero_stage} (DeepSpeed's pipeline engine "
                          "does not partition gradients or weights: ZeRO-2/3 are incompatible with it)")
    if model_cfg.tie_embeddings:
        raise ConfigError(f"pp_size = {pp_size} with tie_embeddings = True is not supported: the embedding and the "
                          "head live on different stages")
    if not isinstance(optimizer, (torch.optim.AdamW, Muon)):
        raise ConfigError(f"pp_size = {pp_size} supports optimizers 'adamw', 'muon' and 'muonclip' for now; got "
                          f"{type(optimizer).__name__}")
    if isinstance(optimizer, MuonClip) and optimizer.qk_clip.remeasure:
        raise ConfigError(f"pp_size = {pp_size} with MuonClip needs qk_clip_remeasure = False: the exact re-measure "
                          "re-forwards a micro-batch through every layer, which across pipeline stages would mean "
                          "running the pipeline again; each stage clips its own layers from the max logits of "
                          "the step's forwards (K2's rule as published)")


def check_stage_groups(optimizer: torch.optim.Optimizer, pp_group) -> None:
    """Refuse stages whose optimizers have different numbers of param groups (collective over the
    pipeline group). DeepSpeed's ZeRO-1 all-reduces each group's gradient norm over the pipeline,
    group by group, so such stages would wait on each other forever: with Muon, a stage of dense
    blocks only lacks the experts' fused gate/up group of a stage with MoE blocks. (Padding the
    smaller stages with empty groups is not enough: the run still hangs, measured.)"""
    names = [group.get("name", f"group{i}") for i, group in enumerate(optimizer.param_groups)]
    stages: list = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(stages, names, group=pp_group)
    if len({len(n) for n in stages}) > 1:
        listed = "; ".join(f"stage {s}: {', '.join(n)}" for s, n in enumerate(stages))
        raise ConfigError(f"pp_size = {len(stages)}: the stages' optimizers have different param groups ({listed}); "
                          "DeepSpeed's ZeRO-1 reduces the gradient norm group by group over the pipeline, so every "
                          "stage needs as many groups: cut the blocks so each stage holds the same kinds of blocks "
                          "(dense / MoE), e.g. with first_k_dense = 0 or another blocks_per_stage")


class StagePipe(PipelineModule):
    """DeepSpeed's PipelineModule plus the model-side helpers a step needs, over this rank's stage."""

    def stage(self) -> PipelineStage:
        (stage,) = [m for m in self.children() if isinstance(m, PipelineStage)]
        return stage

    @property
    def lm_head(self) -> nn.Module | None:
        """The output head on the last stage (None elsewhere): optim.muon leaves it to AdamW by this name."""
        return self.stage().lm_head

    def routers(self) -> list[Router]:
        return [m for m in self.modules() if isinstance(m, Router)]

    def attentions(self) -> list[nn.Module]:
        return [block.self_attn for block in self.stage().layers.values()]

    @torch.no_grad()
    def update_router_biases(self) -> None:
        for router in self.routers():
            router.update_bias()


def build_pipeline_module(model: Transformer, pp_size: int, grad_accum: int,
                          blocks_per_stage: list[int] | None = None, device=None, load=None) -> StagePipe:
    """`model` cut into pp_size stages on DeepSpeed's PipeDataParallelTopology grid (pipe
    outermost, see launch/parallel/distributed.py). Every rank passes the same `model` (same seed),
    whole or on the meta device; each keeps only its own stage's modules registered, and allocates
    them on `device` if they are on meta, filled by `load` if given (materialize's: a source's
    reader, under the full model's names). `stage().named_parameters()` gives the full model's names."""
    world = dist.get_world_size()
    if world % pp_size:
        raise ConfigError(f"pp_size = {pp_size} must divide the number of processes ({world})")
    bounds = stage_bounds(model, pp_size, blocks_per_stage)
    stages = [PipelineStage(model, bounds[s], bounds[s + 1], s == 0, s == pp_size - 1, grad_accum)
              for s in range(pp_size)]
    topology = PipeDataParallelTopology(num_pp=pp_size, num_dp=world // pp_size)
    mine = stages[topology.get_coord(dist.get_rank()).pipe]
    materialize(mine, device or torch.device("cpu"), model.init_seed, model.cfg.init_std, load=load)
    # One pipeline layer per stage: DeepSpeed's uniform partition then gives stage s exactly stages[s].
    pipe = StagePipe(stages, topology=topology, loss_fn=logits_cross_entropy, partition_method="uniform")
    pipe.block_bounds, pipe.model_cfg = bounds, model.cfg
    return pipe


class PipelineStepper:
    """One optimizer step = `engine.train_batch` over grad_accum micro-batches (1F1B), then QK-clip
    of the stage's own layers (with MuonClip) and the router bias update on the stage's global load.
    `train_step(batches)` returns the step's record (the trainer's keys: lm_loss, aux_loss, grad_norm,
    skipped / router_max_over_mean, and with QK-clip max_logit, max_logit_by_layer, qk_clip_tau)."""

    def __init__(self, engine, grad_accum: int, qk_clip: QKClip | None = None):
        self.engine, self.model, self.grad_accum = engine, engine.module, grad_accum
        grid = engine.grid
        self.dp_group, self.pp_group = grid.get_data_parallel_group(), grid.get_pipe_parallel_group()
        self.dp_size = grid.get_data_parallel_world_size()
        self.model.pipelined_evaluate = self.evaluate  # what the trainer's evaluate() calls on a stage
        self.qk_clip = qk_clip
        if qk_clip is not None:
            # The ranks holding this stage's layers saw different batches: they agree on one clip. Other
            # stages' layers are not ours to clip, so the default (world) group would be wrong.
            qk_clip.group = self.dp_group
            qk_clip.row_scaler = zero_row_scaler  # ZeRO-1's partitions hold the fp32 masters

    def _micro_batches(self, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Every rank of a pipeline draws the same micro-batches, so the data iterators of all
        # stages stay in step (only the first and last stage read them).
        micro = [next(batches) for _ in range(self.grad_accum)]
        if any(len(m) != 2 for m in micro):
            raise ConfigError("pp_size > 1 does not support packed batches (document ids) yet")
        return [(inputs.to(self.engine.device), targets.to(self.engine.device)) for inputs, targets in micro]

    def train_step(self, batches) -> dict:
        stage = self.model.stage()
        stage.aux_sum = torch.zeros((), device=self.engine.device)
        lm = self.engine.train_batch(iter(self._micro_batches(batches)))  # mean over micro-batches and dp
        norm = self.engine.get_global_grad_norm()
        result = StepResult(float("nan") if norm is None else float(norm), bool(self.engine.was_step_applied()))
        # Each stage holds the aux losses of its own blocks: sum over stages, mean over dp and micro-batches.
        aux = stage.aux_sum.detach().float().reshape(1)
        dist.all_reduce(aux)
        record = {"lm_loss": float(lm), "aux_loss": aux.item() / (self.dp_size * self.grad_accum),
                  "grad_norm": result.grad_norm}
        if result.applied:
            if self.qk_clip is not None:
                record.update(self._clip())
            # Each stage holds its own layers' routers: gathered in stage order, so the log lists every MoE layer.
            local = [round(r.load_stats()["max_over_mean"], 4) for r in self.model.routers()]
            stages: list = [None] * dist.get_world_size(self.pp_group)
            dist.all_gather_object(stages, local, group=self.pp_group)
            record["router_max_over_mean"] = [value for stage_values in stages for value in stage_values]
            all_reduce_router_counts(self.model, group=self.dp_group)
            self.model.update_router_biases()
        else:
            record["skipped"] = True
            for router in self.model.routers():
                router.tokens_per_expert_E.zero_()
        for attn in self.model.attentions():
            attn.reset_max_logits()
        return record

    @torch.no_grad()
    def _clip(self) -> dict:
        """QK-clip of this stage's layers; returns the logged max logits of all layers, before clipping."""
        lo, hi = self.model.block_bounds[self.model.stage_id], self.model.block_bounds[self.model.stage_id + 1]
        by_layer_L = torch.full((self.model.model_cfg.num_layers,), float("-inf"), device=self.engine.device)
        if self.qk_clip.attentions:  # a first or last stage may hold no block, hence no attention
            by_layer_L[lo:hi] = self.qk_clip().max(dim=1).values
        # Each stage fills its own layers: the max over the pipeline assembles all of them for the log.
        dist.all_reduce(by_layer_L, op=dist.ReduceOp.MAX, group=self.pp_group)
        return {"max_logit": by_layer_L.max().item(), "max_logit_by_layer": by_layer_L.tolist(),
                "qk_clip_tau": self.qk_clip.tau}

    @torch.no_grad()
    def evaluate(self, val_batches) -> float:
        """Mean lm loss over val_batches; every rank passes the same batches (all pipelines then
        agree). Leaves the module in training mode."""
        micro = [(inputs.to(self.engine.device), targets.to(self.engine.device))
                 for inputs, targets, *_ in val_batches]
        loss = self.engine.eval_batch(iter(micro), num_micro_batches=len(micro))
        self.model.train()
        return float(loss)

    def shards(self) -> "state_shards.ShardSet":
        """This stage's weights and ZeRO-1 partition under the full model's names: a checkpoint of all
        stages together is one of the single-device model (launch/parallel/state_shards.py)."""
        return state_shards.zero_shards(self.model.stage(), self.engine.optimizer)

    def load_shards(self, reader) -> None:
        state_shards.load_zero(self.model.stage(), self.engine.optimizer, reader)


def build_pipeline_stepper(pipe: StagePipe, optimizer: torch.optim.Optimizer, ds_config: dict,
                           expert_parallel: bool) -> PipelineStepper:
    """`optimizer` as built by `optim.build` for `pipe` (after expert parallelism was applied to it)."""
    import deepspeed

    check_pipeline(pipe.model_cfg, pp_size=pipe.num_stages, zero_stage=ds_config["zero_optimization"]["stage"],
                   optimizer=optimizer)
    qk_clip = optimizer.qk_clip if isinstance(optimizer, MuonClip) else None  # run by the stepper, per stage
    if isinstance(optimizer, Muon):
        optimizer = ZeroMuon(optimizer)  # each stage's matrices orthogonalised whole over its ZeRO-1 partitions
    if expert_parallel:
        split_expert_param_groups(optimizer)
    check_stage_groups(optimizer, pipe._grid.get_pipe_parallel_group())  # PipelineModule's grid, made at construction
    engine, *_ = deepspeed.initialize(model=pipe, optimizer=optimizer, config=ds_config, dist_init_required=False)
    if isinstance(optimizer, ZeroMuon):
        optimizer.attach(engine.optimizer)
    return PipelineStepper(engine, ds_config["gradient_accumulation_steps"], qk_clip)
