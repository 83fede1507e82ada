"""The decoder: embeddings, L blocks of (RMSNorm, MLA, RMSNorm, dense MLP or MoE), norm, head.

Single-device code: no process groups, no devices chosen here. Module names match Hugging Face's
DeepseekV3ForCausalLM without its "model." prefix, so weight exchange is a rename (moe/hf.py).
`forward` is the training path; `forward_cached` runs the same blocks against MLA's compressed
cache (moe/cache.py), for sampling (moe/generate.py).

Packing (SFT): `forward(..., document_ids_BT=...)` marks which document each token of a row belongs
to; attention is then block-diagonal causal and RoPE positions restart at 0 with every document, so
a packed document's logits are those it would get alone. Routing is per token and unaffected; the
routers' sequence-wise balance loss (moe/router.py) still treats the whole row as one sequence.

Routing replay (RL): `with model.replay_routing(routing_LBTK): model(ids_BT, ...)` sends each token
to the experts recorded for it (e.g. by moe/generate.py while sampling), -1 where none is recorded.
"""

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from moe.attention import MLA
from moe.cache import LatentCache, LayerCache
from moe.config import ModelConfig
from moe.layers import MLP, RMSNorm, rope_cos_sin
from moe.loss import IGNORE_INDEX, linear_cross_entropy, logits_cross_entropy
from moe.moe import MoE
from moe.params import model_tensors
from moe.router import Router


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _normal_(tensor: torch.Tensor, seed: int, name: str, std: float) -> None:
    generator = torch.Generator(device=tensor.device).manual_seed(_tensor_seed(seed, name))
    tensor.normal_(0.0, std, generator=generator)


@torch.no_grad()
def init_weights(module: nn.Module, seed: int, std: float, skip: tuple[torch.Tensor, ...] = ()) -> set[str]:
    """Initialise the parameters and buffers of `module`, a Transformer or a part of one whose
    tensor names are the Transformer's own (a pipeline stage's "layers.3...."), from `seed` and each
    tensor's name alone: a part gets what the whole model would hold. Each expert of a stacked
    [E, ...] tensor draws from its own name ("...gate_up_proj/7"); a module holding a slice of the
    experts says which global expert its first row is by `first_expert`. Tensors on the meta device
    are skipped (not yet materialised). N(0, std) for every matrix, ones for norms, zero router
    biases and load counts, -inf running max logits. Tensors in `skip` (a loader fills them) are left
    as they are. Returns the names of the tensors it set or skipped."""
    done: set[str] = set()
    # A tensor under two names (a tied head) draws once, by its first name; a skipped one never.
    seen: set[int] = {id(t) for t in skip}

    def mark(where: str, *names: str) -> None:
        done.update(f"{where}{n}" for n in names)

    def fresh(tensor: torch.Tensor) -> bool:
        if tensor.is_meta or id(tensor) in seen:
            return False
        seen.add(id(tensor))
        return True

    for prefix, m in module.named_modules():
        where = f"{prefix}." if prefix else ""
        if isinstance(m, (nn.Linear, nn.Embedding, Router)):
            if fresh(m.weight):
                _normal_(m.weight, seed, f"{where}weight", std)
            mark(where, "weight")
        elif hasattr(m, "gate_up_proj") and hasattr(m, "first_expert"):  # RoutedExperts or a slice of them
            for pname in ("gate_up_proj", "down_proj"):
                param = getattr(m, pname)
                if not param.is_meta:
                    if fresh(param):
                        for i in range(param.shape[0]):
                            _normal_(param[i], seed, f"{where}{pname}/{m.first_expert + i}", std)
                    mark(where, pname)
        elif isinstance(m, RMSNorm) and not m.weight.is_meta:
            if fresh(m.weight):
                m.weight.fill_(1.0)
            mark(where, "weight")
        if isinstance(m, Router) and not m.e_score_correction_bias.is_meta:
            if fresh(m.e_score_correction_bias):
                m.e_score_correction_bias.zero_()
            m.tokens_per_expert_E.zero_()  # not saved: no loader fills it
            mark(where, "e_score_correction_bias", "tokens_per_expert_E")
        if isinstance(m, MLA) and not m.max_logits_H.is_meta:
            m.reset_max_logits()
            mark(where, "max_logits_H")
    return done


def materialize(module: nn.Module, device, seed: int, std: float, load=None) -> nn.Module:
    """`module` (part of a Transformer built on the meta device) allocated on `device` and
    initialised by init_weights from the whole model's `seed`. With `load`, a callable that fills
    every saved tensor of the module or raises (launch.checkpoint.pretrained.PartSource.load_into),
    those tensors are read, not drawn first and then overwritten: only what no file holds (the
    routers' load counts, MLA's running max logits) is initialised. A module with no meta tensor is
    left as it is (and loaded, with `load`). A tensor init_weights does not know how to set is an
    error, not left as to_empty's uninitialised memory."""
    tensors = [*module.parameters(), *module.buffers()]
    if not any(t.is_meta for t in tensors):
        if load is not None:
            load(module)
        return module
    if not all(t.is_meta for t in tensors):  # to_empty would overwrite the allocated ones too
        raise ValueError("materialize: the module holds both meta and allocated tensors; "
                         "materialize a part that is wholly on meta")
    # to_empty gives each module's Parameter a new object, one per module: carry over what was set on
    # the old one (expert parallelism's `allreduce = False` and `group_name`, which DeepSpeed reads),
    # and tie again what was one Parameter under several names (tie_embeddings).
    named = list(module.named_parameters(remove_duplicate=False))
    marks = {name: dict(p.__dict__) for name, p in named if p.__dict__}
    first_name = {}
    for name, p in named:
        first_name.setdefault(id(p), name)
    ties = {name: first_name[id(p)] for name, p in named if first_name[id(p)] != name}
    module.to_empty(device=device)
    for name, p in module.named_parameters(remove_duplicate=False):
        p.__dict__.update(marks.get(name, {}))
    for name, source in ties.items():
        owner, _, attr = name.rpartition(".")
        setattr(module.get_submodule(owner), attr, module.get_parameter(source))
    saved = model_tensors(module) if load is not None else []
    done = init_weights(module, seed, std, skip=tuple(t for _, t in saved)) | {n for n, _ in saved}
    unset = [n for n, _ in (*module.named_parameters(), *module.named_buffers()) if n not in done]
    if unset:
        raise TypeError(f"materialize: init_weights (moe/model.py) does not initialise {unset[:5]}"
                        f"{' ...' if len(unset) > 5 else ''}; teach it their module's rule")
    if load is not None:
        load(module)
    return module


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V]; None from a chunked-loss forward (Transformer.loss_chunk_tokens)
    loss: torch.Tensor | None = None  # lm_loss + aux_loss, what training minimises
    lm_loss: torch.Tensor | None = None  # mean next-token cross-entropy
    aux_loss: torch.Tensor | None = None  # sum of the MoE layers' sequence-wise balance losses
    routing: torch.Tensor | None = None  # [L_moe, B, T, K] int64 experts chosen per MoE layer, if asked


@contextmanager
def eval_mode(model: nn.Module):
    """Every submodule in eval mode inside the with-statement (routers count no load, attention
    records no max logits), and each back in its own mode afterwards: model.train() would also
    switch on submodules that were off."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x_BTD, cos_TR, sin_TR, visible_B1TT=None, cache: LayerCache | None = None):
        # cache by keyword: forward pre-hooks on the attention (QK-clip's) see (x, cos, sin, mask),
        # exactly MLA.max_logits's arguments.
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos_TR, sin_TR, visible_B1TT, cache=cache)
        return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # Every tensor's initial values follow from this seed and the tensor's name (init_weights), so a
        # part of the model built apart (a pipeline stage, an expert-parallel slice) gets the values it
        # has in the whole model. Drawn from torch's global generator, first: torch.manual_seed(s) then
        # Transformer(cfg) is reproducible, as before. The submodules' own default inits (overwritten
        # below) run under fork_rng, so the global generator moves by this one draw whether the model is
        # built on a device or on meta (where they draw nothing).
        self.init_seed = int(torch.randint(0, 2**62, (), device="cpu"))
        with torch.random.fork_rng(devices=[]):
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Not architecture, so not in ModelConfig: how a forward with targets computes the loss. 0: from
        # the whole logits (returned); C > 0: C tokens at a time, the logits never whole and not returned
        # (moe/loss.py). The trainer sets it from --loss-chunk-tokens.
        self.loss_chunk_tokens = 0
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) for every matrix (as DeepSeek-V3's HF port), ones for norms, zero router
        biases; tensors on the meta device are left for whoever materialises them (init_weights)."""
        init_weights(self, self.init_seed, self.cfg.init_std)

    def routers(self) -> list[Router]:
        return [m for m in self.modules() if isinstance(m, Router)]

    def attentions(self) -> list[MLA]:
        return [block.self_attn for block in self.layers]

    def hidden_states(self, input_ids_BT: torch.Tensor, document_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
        """The last block's output [B, T, D], before the final norm and the head."""
        _check_batch_shape(input_ids_BT)
        if document_ids_BT is not None:
            _check_document_ids(document_ids_BT, input_ids_BT)
        T, V = input_ids_BT.shape[1], self.cfg.vocab_size
        # max_seq_len bounds RoPE positions: a packed row may be longer, its documents may not.
        if document_ids_BT is None and T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds ModelConfig.max_seq_len = {self.cfg.max_seq_len}")
        # Out-of-range ids would otherwise surface as an opaque index error (or a device assert).
        if input_ids_BT.device.type != "meta" and (bad := _outside(input_ids_BT, V)) is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {V}) of this model (vocab_size = {V})")
        x_BTD = self.embed_tokens(input_ids_BT)
        R, theta = self.cfg.qk_rope_head_dim, self.cfg.rope_theta
        if document_ids_BT is None:
            positions_T = torch.arange(T, device=input_ids_BT.device)
            cos, sin = rope_cos_sin(positions_T, R, theta, x_BTD.dtype)  # [T, R/2]
            visible_B1TT = None  # plain causal: MLA keeps SDPA's is_causal kernels
        else:
            positions_BT, visible_B1TT = _packing(document_ids_BT)
            if positions_BT.device.type != "meta" and (longest := int(positions_BT.max()) + 1) > self.cfg.max_seq_len:
                raise ValueError(f"a packed document of {longest} tokens exceeds ModelConfig.max_seq_len = "
                                 f"{self.cfg.max_seq_len}")
            cos, sin = (t.view(*positions_BT.shape, -1).unsqueeze(1)  # [B, 1, T, R/2]
                        for t in rope_cos_sin(positions_BT.reshape(-1), R, theta, x_BTD.dtype))
        for block in self.layers:
            x_BTD = block(x_BTD, cos, sin, visible_B1TT)
        return x_BTD

    def forward(self, input_ids_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                return_routing: bool = False, document_ids_BT: torch.Tensor | None = None) -> ModelOutput:
        """`document_ids_BT` (integer, [B, T], optional): packed rows, equal ids = one contiguous
        document; tokens attend only within their document and RoPE restarts at each document."""
        if targets_BT is not None:  # before the forward pass, so a bad batch costs nothing
            self._check_targets(targets_BT, input_ids_BT)
        with self._capture_routing(return_routing) as routing:
            x_BTD = self.hidden_states(input_ids_BT, document_ids_BT)
        B, T = input_ids_BT.shape
        h_BTD = self.norm(x_BTD)
        if targets_BT is None:
            return ModelOutput(self.lm_head(h_BTD), routing=routing.ids(B, T))
        if self.loss_chunk_tokens:
            logits_BTV = None
            lm_loss = linear_cross_entropy(h_BTD.reshape(B * T, -1), self.lm_head.weight, targets_BT.reshape(B * T),
                                           self.loss_chunk_tokens)
        else:
            logits_BTV = self.lm_head(h_BTD)
            lm_loss = logits_cross_entropy(logits_BTV, targets_BT)
        # Per row, not per packed document: the balance loss only steers routing, and a row is the
        # unit the router's statistics were specified over (DeepSeek-V3 §2.1.2 "sequence-wise").
        aux = [block.mlp.aux_loss for block in self.layers if isinstance(block.mlp, MoE)]
        aux_loss = torch.stack(aux).sum() if aux else lm_loss.new_zeros(())
        return ModelOutput(logits_BTV, lm_loss + aux_loss, lm_loss, aux_loss, routing.ids(B, T))

    @torch.no_grad()
    def forward_cached(self, input_ids_BT: torch.Tensor, cache: LatentCache, num_new_B=None,
                       absorbed: bool = True, return_routing: bool = False) -> ModelOutput:
        """Logits [B, T, V] of T tokens appended to each sequence of `cache`, which they extend.

        Sequence b's tokens take positions cache.lengths_B[b] onward; only its first num_new_B[b]
        (default all T) count, the rest are right padding whose logits mean nothing. So one call
        prefills prompts of different lengths, and T = 1 is a decoding step. `absorbed` picks the
        attention path (MLA.forward_cached); both agree with `forward` on the same tokens.
        Inference only (no autograd): gradients come from `forward` on the finished sequences.
        """
        _check_batch_shape(input_ids_BT)
        (B, T), V = input_ids_BT.shape, self.cfg.vocab_size
        if B != cache.batch_size:
            raise ValueError(f"input_ids has batch size {B} but the cache holds {cache.batch_size} sequences")
        if (bad := _outside(input_ids_BT, V)) is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {V}) of this model (vocab_size = {V})")
        num_new_B = _num_new(num_new_B, B, T, cache.lengths_B.device)
        positions_BT, layer_caches = cache.views(T, absorbed)
        x_BTD = self.embed_tokens(input_ids_BT)
        # The same angles as forward's for the same positions, per sequence: [B, 1, T, R/2].
        cos, sin = (t.view(B, 1, T, -1) for t in rope_cos_sin(
            positions_BT.reshape(-1), self.cfg.qk_rope_head_dim, self.cfg.rope_theta, x_BTD.dtype))
        with self._capture_routing(return_routing) as routing:
            for block, layer_cache in zip(self.layers, layer_caches):
                x_BTD = block(x_BTD, cos, sin, cache=layer_cache)
        cache.advance(num_new_B)
        return ModelOutput(self.lm_head(self.norm(x_BTD)), routing=routing.ids(B, T))

    @contextmanager
    def replay_routing(self, routing_LBTK: torch.Tensor | None):
        """Inside the with-statement, forwards of [B, T] tokens use the expert ids routing_LBTK
        [L_moe, B, T, K] (int64; a token whose ids are -1 is routed by its router). None: no replay."""
        routers = self.routers()
        if routing_LBTK is not None:
            L, K, E = len(routers), self.cfg.num_experts_per_tok, self.cfg.num_experts
            if routing_LBTK.ndim != 4 or routing_LBTK.shape[0] != L or routing_LBTK.shape[3] != K:
                raise ValueError(f"replayed routing has shape {tuple(routing_LBTK.shape)}; need [{L}, B, T, {K}] "
                                 f"({L} MoE layers, {K} experts per token)")
            if routing_LBTK.dtype != torch.int64:
                raise ValueError(f"replayed routing has dtype {routing_LBTK.dtype}; need torch.int64 expert ids")
            if routing_LBTK.numel() and not (-1 <= int(routing_LBTK.min()) and int(routing_LBTK.max()) < E):
                raise ValueError(f"replayed routing holds expert ids outside [-1, {E}) (-1: not recorded)")
        try:
            for layer, router in enumerate(routers):
                router.replay_ids_NK = None if routing_LBTK is None else routing_LBTK[layer].reshape(-1, routing_LBTK.shape[3])
            yield
        finally:
            for router in routers:
                router.replay_ids_NK = None

    @contextmanager
    def _capture_routing(self, enabled: bool):
        """Record each router's top-k choice inside the with-statement; nothing is hooked when not enabled."""
        record = _RoutingRecord(enabled, self.cfg.num_experts_per_tok, self.embed_tokens.weight.device)
        handles = [router.register_forward_hook(record.hook) for router in self.routers()] if enabled else []
        try:
            yield record
        finally:
            for handle in handles:
                handle.remove()

    def _check_targets(self, targets_BT: torch.Tensor, input_ids_BT: torch.Tensor) -> None:
        V = self.cfg.vocab_size
        _check_batch_shape(input_ids_BT)
        if targets_BT.shape != input_ids_BT.shape:
            raise ValueError(f"targets have shape {tuple(targets_BT.shape)} but input_ids "
                             f"{tuple(input_ids_BT.shape)}; need the same [B, T]")
        if targets_BT.dtype != torch.int64:
            raise ValueError(f"targets have dtype {targets_BT.dtype}; need torch.int64 token ids")
        if targets_BT.device.type == "meta":
            return
        # Ignored positions count as 0, so that -100 does not hide another negative id from the min.
        if (bad := _outside(targets_BT.masked_fill(targets_BT == IGNORE_INDEX, 0), V)) is not None:
            raise ValueError(
                f"target id {bad} is outside the vocabulary [0, {V}) of this model (vocab_size = {V}); "
                f"{IGNORE_INDEX} marks a position without a target"
            )

    @torch.no_grad()
    def update_router_biases(self) -> None:
        """After each optimizer step: move every router's bias toward balance (aux-loss-free)."""
        for router in self.routers():
            router.update_bias()


class _RoutingRecord:
    """The routers' top-k expert ids [N, K] in layer order (routers run in layer order)."""

    def __init__(self, enabled: bool, K: int, device: torch.device):
        self.enabled, self.K, self.device, self.ids_NK = enabled, K, device, []

    def hook(self, router, args, routing) -> None:
        self.ids_NK.append(routing.topk_ids_NK)

    def ids(self, B: int, T: int) -> torch.Tensor | None:
        if not self.enabled:
            return None
        if not self.ids_NK:  # a model without MoE layers
            return torch.empty(0, B, T, self.K, dtype=torch.int64, device=self.device)
        return torch.stack(self.ids_NK).view(-1, B, T, self.K)


def _num_new(num_new_B, B: int, T: int, device) -> torch.Tensor:
    """num_new_B as an int64 tensor [B] with entries in [0, T] (None: all T)."""
    if num_new_B is None:
        return torch.full((B,), T, dtype=torch.int64, device=device)
    num_new_B = torch.as_tensor(num_new_B, device=device)
    if num_new_B.shape != (B,) or num_new_B.dtype.is_floating_point or num_new_B.dtype == torch.bool:
        raise ValueError(f"num_new_B must be {B} integer counts, one per sequence; got {num_new_B.tolist()!r}")
    lo, hi = torch.stack(torch.aminmax(num_new_B)).tolist()
    if lo < 0 or hi > T:
        raise ValueError(f"num_new_B = {num_new_B.tolist()} must lie in [0, T = {T}] (tokens given per sequence)")
    return num_new_B.to(torch.int64)


def _check_batch_shape(input_ids_BT: torch.Tensor) -> None:
    # An empty batch would otherwise fail deep inside (aminmax over no elements, a reshape of zero tokens).
    if input_ids_BT.ndim != 2 or input_ids_BT.numel() == 0:
        raise ValueError(f"input_ids has shape {tuple(input_ids_BT.shape)}; need [B, T] with B >= 1 and T >= 1")


def _check_document_ids(document_ids_BT: torch.Tensor, input_ids_BT: torch.Tensor) -> None:
    if document_ids_BT.shape != input_ids_BT.shape:
        raise ValueError(f"document_ids have shape {tuple(document_ids_BT.shape)} but input_ids "
                         f"{tuple(input_ids_BT.shape)}; need the same [B, T]")
    dtype = document_ids_BT.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise ValueError(f"document_ids have dtype {dtype}; need an integer dtype (e.g. torch.int64), "
                         f"one document id per token")
    if document_ids_BT.device.type == "meta":
        return
    # Each id must form one run: otherwise the id-equality mask and the per-run positions disagree.
    runs_B = _document_starts(document_ids_BT).sum(dim=1)
    distinct_B = 1 + (document_ids_BT.sort(dim=1).values.diff(dim=1) != 0).sum(dim=1)
    if (bad_B := (runs_B != distinct_B).nonzero()).numel():
        b = bad_B[0, 0].item()
        raise ValueError(f"document_ids row {b} = {document_ids_BT[b].tolist()} reuses an id after another "
                         f"document; each document must be one contiguous run of its id")


def _document_starts(document_ids_BT: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: True where a document begins (every row's first token, and wherever the id changes)."""
    first_B1 = torch.ones_like(document_ids_BT[:, :1], dtype=torch.bool)
    return torch.cat([first_B1, document_ids_BT[:, 1:] != document_ids_BT[:, :-1]], dim=1)


def _packing(document_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE positions [B, T] counted from each document's start, and the attention mask [B, 1, T, T]
    (True: query t may see key s, i.e. s <= t in the same document). The mask is B*T*T bools,
    built once per forward and shared by every layer."""
    B, T = document_ids_BT.shape
    t_T = torch.arange(T, device=document_ids_BT.device)
    start_BT = torch.where(_document_starts(document_ids_BT), t_T, 0).cummax(dim=1).values
    same_doc_BTT = document_ids_BT[:, :, None] == document_ids_BT[:, None, :]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=document_ids_BT.device).tril()
    return t_T - start_BT, (same_doc_BTT & causal_TT).unsqueeze(1)


def _outside(ids: torch.Tensor, V: int) -> int | None:
    """The smallest id if it is negative, else the largest if it is >= V, else None.

    Under torch.compile the check is left out: its host read would split the graph at every call.
    A compiled model then meets an out-of-range id in the embedding's own index check instead."""
    if torch.compiler.is_compiling():
        return None
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one host sync, not two
    return lo if lo < 0 else hi if hi >= V else None
