"""Activation recomputation, applied from outside the model: `apply_recompute(model, mode)`.

Modes (Kimi K2 tech report §2.4, "selective recomputation"; Megatron-Core's recompute modules):
  none       autograd keeps what every op saves.
  selective  cheap stages with large outputs are run again in the backward instead of kept: every
             RMSNorm, SwiGLU's silu(gate) * up in the dense MLPs and shared experts, and MLA's
             key/value up-projection kv_b_proj (the per-head k_nope and v).
  full       each transformer block keeps only its inputs and runs its whole forward again in the backward.

Call after expert parallelism is applied (launch.parallel.expert_parallel) and before DeepSpeed
initialises; a later call replaces an earlier mode ("none" removes it). No module is wrapped in a new
module, only its `forward` attribute is set, so parameter and buffer names stay those of moe/.

Selective. A stage's output is saved by the module that consumes it (a norm's output by the
projections after it), so checkpointing the stage alone would not free it. As in Megatron's
CheckpointWithoutOutput, the output's storage is released once its consumer's forward has returned
and refilled (the stage run again under no_grad, same autocast) when the gradient reaches the
consumer's output, that is before any backward op of the consumer reads it. The stage's own saved
tensors (a norm's normalised x, SwiGLU's silu(gate)) are dropped by non-reentrant
torch.utils.checkpoint around the stage; a norm therefore runs three times (forward, refill, its own
backward's recompute): elementwise passes only. kv_b_proj is refilled, not checkpointed: its one
saved input is the latent it is refilled from. That frees attention's v only where attention keeps v
as the view of kv_b_proj's output it was given: on CPU the math path (q/k and v head dims differ)
keeps its own copy, so there the refill is one small matmul for nothing; on CUDA it is unmeasured.
Not reached: the routed experts' SwiGLU is inside kimi_kernels.expert_ffn (the Triton path keeps only
[gate | up] and recomputes the activation in its backward; the CPU paths keep what autograd saves), and of MLA's
query side nothing is kept from q_b_proj: attention keeps the per-head q and k that MLA.qkv
concatenates with torch.cat, past any module boundary.

Full. A block's forward has side effects: routers add expert loads to tokens_per_expert_E (the
aux-loss-free bias update reads them), MoE stores its balance loss in `aux_loss`, MLA raises
max_logits_H for QK-clip, Transformer._capture_routing hooks the routers. The recompute must repeat
none of them and must route exactly as the forward did (else the saved shapes differ, or the gradient
flows through other experts): each block's expert ids are recorded in the forward and forced in its
recompute through Router.replay_ids_NK, and the load counts, replay ids, aux_loss and
record_max_logits are put back around it, and the router's forward hooks (routing capture, anyone's
statistics) are held off: a recompute is no new routing to observe. The recorded ids, N*K int64 per
MoE layer, are the only thing full mode keeps beside the blocks' inputs.
Under expert parallelism the recompute runs ExpertParallelExperts' all_to_alls again, in the
backward. That is safe because every rank recomputes the same blocks in the same order with the same
(replayed) split sizes; checkpoint's early stop is switched off so that no rank can stop recomputing
between two collectives that another rank goes on to issue.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from launch.parallel.recompute_modes import MODES
from moe.attention import MLA
from moe.layers import MLP
from moe.model import Block, Transformer
from moe.moe import MoE
from moe.router import Router


def apply_recompute(model: nn.Module, mode: str) -> None:
    """Set `model`'s activation recomputation to `mode` ("none", "selective" or "full"), in place."""
    if mode not in MODES:
        raise ValueError(f"recompute = {mode!r} is not a recomputation mode; valid: {', '.join(map(repr, MODES))}")
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), (_Selective, _FullBlock)):
            del module.forward
    if mode == "selective":
        _apply_selective(model)
    elif mode == "full":
        for block in model.modules():
            if isinstance(block, Block):
                block.forward = _FullBlock(block)


# ---------------------------------------------------------------------------------------------- selective

def _apply_selective(model: nn.Module) -> None:
    wrappers: dict[nn.Module, _Selective] = {}

    def wrap(module: nn.Module) -> _Selective:
        if module not in wrappers:
            wrappers[module] = module.forward = _Selective(module)
        return wrappers[module]

    def recompute(stage: nn.Module, consumer: nn.Module, checkpointed: bool = True) -> None:
        wrap(stage).consumer, wrap(stage).checkpointed = wrap(consumer), checkpointed

    for module in model.modules():
        if isinstance(module, Transformer):
            recompute(module.norm, module.lm_head)
        elif isinstance(module, Block):
            recompute(module.input_layernorm, module.self_attn)
            recompute(module.post_attention_layernorm, module.mlp)
        elif isinstance(module, MLA):
            if module.q_lora_rank is not None:
                recompute(module.q_a_layernorm, module.q_b_proj)
            recompute(module.kv_a_layernorm, module.kv_b_proj)
            # v is a view of kv_b_proj's output saved by attention itself: refill before MLA's backward.
            recompute(module.kv_b_proj, module, checkpointed=False)
        elif isinstance(module, MLP):
            recompute(module.act, module.down_proj)


class _Selective:
    """A module's forward in selective mode: as a stage, its output is handed to its consumer to be
    released; as a consumer, it releases the outputs of its stages when its own forward returns."""

    def __init__(self, module: nn.Module):
        self.run = type(module).forward.__get__(module)
        self.consumer: _Selective | None = None
        self.checkpointed = False
        self.pending: list[_Released] = []  # outputs of this consumer's stages, not yet released

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.run(*args, **kwargs)
        # A stage's output is released here only if this call reads it, or the stage ran inside this
        # call (kv_b_proj inside MLA): an output some other code went on to use must stay.
        mine = [r for r in self.pending if any(a is r.out for a in args)]
        self.pending = []
        try:
            if self.checkpointed:
                out = checkpoint(self.run, *args, use_reentrant=False, **kwargs)
            else:
                out = self.run(*args, **kwargs)
        finally:
            released, self.pending = mine + self.pending, []
        if released and out.requires_grad:
            for record in released:
                record.release()
            out.register_hook(_refill_hook(released))
        if self.consumer is not None and out.requires_grad:
            self.consumer.pending.append(_Released(self.run, args, kwargs, out))
        return out


def _refill_hook(records: list[_Released]):
    def refill(grad):
        for record in records:
            record.refill()
    return refill


class _Released:
    """One stage output whose storage is given back after the forward and rebuilt for the backward."""

    def __init__(self, run, args, kwargs, out: torch.Tensor):
        self.run, self.args, self.kwargs, self.out = run, args, kwargs, out
        device = out.device.type
        self.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        # Inputs that are themselves released outputs (kv_b_proj reads kv_a_layernorm's) come back first.
        refs = [a.__dict__.get("_released") for a in args if isinstance(a, torch.Tensor)]
        self.inputs = [record for ref in refs if ref is not None and (record := ref()) is not None]
        out._released = weakref.ref(self)  # weak: the record holds the tensor, no cycle
        self.nbytes = None

    def release(self) -> None:
        out = self.out
        storage = out.untyped_storage()
        # Only a tensor that owns its whole storage: anything else would free bytes someone else reads.
        if out.is_contiguous() and out.storage_offset() == 0 and storage.nbytes() == out.numel() * out.element_size():
            self.nbytes = storage.nbytes()
            storage.resize_(0)

    def refill(self) -> None:
        if self.out is None:  # refilled already (by a later stage that read it)
            return
        for record in self.inputs:
            record.refill()
        if self.nbytes is not None:
            device, dtype, enabled = self.autocast
            with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                fresh = self.run(*self.args, **self.kwargs)
            if fresh.shape != self.out.shape or fresh.dtype != self.out.dtype:
                raise RuntimeError(f"recomputed activation is {tuple(fresh.shape)} {fresh.dtype} but the forward's was "
                                   f"{tuple(self.out.shape)} {self.out.dtype}: the stage does not repeat itself")
            if fresh.storage_offset() or fresh.untyped_storage().nbytes() != self.nbytes or not fresh.is_contiguous():
                fresh = fresh.clone(memory_format=torch.contiguous_format)
            storage = self.out.untyped_storage()
            storage.resize_(self.nbytes)
            # Storage-level copy: a tensor-level copy_ would bump the version counter of a saved tensor.
            storage.copy_(fresh.untyped_storage())
        self.run = self.args = self.kwargs = self.out = None


# ---------------------------------------------------------------------------------------------- full

class _FullBlock:
    """A Block's forward under non-reentrant checkpoint, its recompute free of side effects."""

    def __init__(self, block: Block):
        self.run = type(block).forward.__get__(block)
        self.routers = [m for m in block.modules() if isinstance(m, Router)]
        self.moes = [m for m in block.modules() if isinstance(m, MoE)]
        self.attentions = [m for m in block.modules() if isinstance(m, MLA)]

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():  # decoding, evaluation: nothing to recompute
            return self.run(*args, **kwargs)
        region = _Region(self)
        with set_checkpoint_early_stop(False):
            return checkpoint(self.run, *args, use_reentrant=False, context_fn=region.contexts, **kwargs)


class _Region:
    """One checkpointed call of one block: the forward records the routers' expert ids, the recompute
    replays them and leaves every recorded quantity as the forward left it."""

    def __init__(self, block: _FullBlock):
        self.block = block
        self.ids_NK: dict[Router, torch.Tensor] = {}

    def contexts(self):
        return _Recording(self), _Replaying(self)


class _Recording:
    def __init__(self, region: _Region):
        self.region, self.handles = region, []

    def __enter__(self):
        def keep(router, args, routing):
            self.region.ids_NK[router] = routing.topk_ids_NK
        self.handles = [router.register_forward_hook(keep) for router in self.region.block.routers]

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


class _Replaying:
    def __init__(self, region: _Region):
        self.region, self.saved = region, None

    def __enter__(self):
        block, ids_NK = self.region.block, self.region.ids_NK
        self.saved = ([(r, r.replay_ids_NK, r.tokens_per_expert_E.clone(), r._forward_hooks) for r in block.routers],
                      [(m, m.aux_loss) for m in block.moes],
                      [(a, a.record_max_logits) for a in block.attentions])
        for router in block.routers:
            router.replay_ids_NK = ids_NK[router]
            # Forward hooks on a router observe routing (Transformer._capture_routing's, anyone's load
            # statistics); a recompute is no new routing for them to see.
            router._forward_hooks = type(router._forward_hooks)()
        for attention in block.attentions:
            attention.record_max_logits = False

    def __exit__(self, *exc):
        routers, moes, attentions = self.saved
        with torch.no_grad():
            for router, replay_ids_NK, counts_E, hooks in routers:
                router.replay_ids_NK, router._forward_hooks = replay_ids_NK, hooks
                router.tokens_per_expert_E.copy_(counts_E)
        for moe, aux_loss in moes:
            moe.aux_loss = aux_loss
        for attention, record in attentions:
            attention.record_max_logits = record


# ---------------------------------------------------------------------------------------------- measuring

class SavedTensorMeter:
    """Bytes that autograd keeps for the backward of what runs inside `with meter:`.

    Counts every distinct storage packed by a saved-tensor hook, parameters excluded, at the size it
    has when `nbytes()` is read (a released activation counts 0). Inside a checkpointed region
    checkpoint's own hooks take over: what it keeps (the region's inputs) is counted, what it will
    recompute is not. Read `nbytes()` after the forward, while its outputs are alive, before backward.
    """

    def __init__(self, model: nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, torch.UntypedStorage] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            # Keyed by the storage object itself, not its address: a released storage's address
            # goes back to the allocator and may come out again for another activation.
            self.storages.setdefault(storage._cdata, storage)
        return t

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    def nbytes(self) -> int:
        return sum(storage.nbytes() for storage in self.storages.values())
