"""The decoder: embeddings, L blocks of (RMSNorm, MLA, RMSNorm, dense MLP or MoE), norm, head.

Single-device code: no process groups, no devices chosen here. Module names match Hugging Face's
DeepseekV3ForCausalLM without its "model." prefix, so weight exchange is a rename (moe/hf.py).
`forward` is the training path; `forward_cached` runs the same blocks against MLA's compressed
cache (moe/cache.py), for sampling (moe/generate.py).
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe.attention import MLA
from moe.cache import LatentCache, LayerCache
from moe.config import ModelConfig
from moe.layers import MLP, RMSNorm, rope_cos_sin
from moe.moe import MoE, RoutedExperts
from moe.router import Router

# A target of this value adds nothing to the loss (F.cross_entropy's default ignore_index).
IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, V]
    loss: torch.Tensor | None = None  # lm_loss + aux_loss, what training minimises
    lm_loss: torch.Tensor | None = None  # mean next-token cross-entropy
    aux_loss: torch.Tensor | None = None  # sum of the MoE layers' sequence-wise balance losses
    routing: torch.Tensor | None = None  # [L_moe, B, T, K] int64 experts chosen per MoE layer, if asked


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x_BTD, cos_TR, sin_TR, cache: LayerCache | None = None):
        # cache by keyword: forward pre-hooks on the attention (QK-clip's) see (x, cos, sin) alone.
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos_TR, sin_TR, cache=cache)
        return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) for every matrix (as DeepSeek-V3's HF port), ones for norms, zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, Router)):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
            elif isinstance(module, RoutedExperts):
                nn.init.normal_(module.gate_up_proj, std=self.cfg.init_std)
                nn.init.normal_(module.down_proj, std=self.cfg.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for router in self.routers():
            router.e_score_correction_bias.zero_()

    def routers(self) -> list[Router]:
        return [m for m in self.modules() if isinstance(m, Router)]

    def attentions(self) -> list[MLA]:
        return [block.self_attn for block in self.layers]

    def hidden_states(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """The last block's output [B, T, D], before the final norm and the head."""
        _check_batch_shape(input_ids_BT)
        T, V = input_ids_BT.shape[1], self.cfg.vocab_size
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds ModelConfig.max_seq_len = {self.cfg.max_seq_len}")
        # Out-of-range ids would otherwise surface as an opaque index error (or a device assert).
        if input_ids_BT.device.type != "meta" and (bad := _outside(input_ids_BT, V)) is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {V}) of this model (vocab_size = {V})")
        x_BTD = self.embed_tokens(input_ids_BT)
        positions_T = torch.arange(T, device=input_ids_BT.device)
        cos_TR, sin_TR = rope_cos_sin(positions_T, self.cfg.qk_rope_head_dim, self.cfg.rope_theta, x_BTD.dtype)
        for block in self.layers:
            x_BTD = block(x_BTD, cos_TR, sin_TR)
        return x_BTD

    def forward(self, input_ids_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                return_routing: bool = False) -> ModelOutput:
        if targets_BT is not None:  # before the forward pass, so a bad batch costs nothing
            self._check_targets(targets_BT, input_ids_BT)
        with self._capture_routing(return_routing) as routing:
            x_BTD = self.hidden_states(input_ids_BT)
        (B, T), V = input_ids_BT.shape, self.cfg.vocab_size
        logits_BTV = self.lm_head(self.norm(x_BTD))
        if targets_BT is None:
            return ModelOutput(logits_BTV, routing=routing.ids(B, T))
        lm_loss = F.cross_entropy(
            logits_BTV.float().view(B * T, V), targets_BT.reshape(B * T), ignore_index=IGNORE_INDEX
        )
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
                x_BTD = block(x_BTD, cos, sin, layer_cache)
        cache.advance(num_new_B)
        return ModelOutput(self.lm_head(self.norm(x_BTD)), routing=routing.ids(B, T))

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


def _outside(ids: torch.Tensor, V: int) -> int | None:
    """The smallest id if it is negative, else the largest if it is >= V, else None."""
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one host sync, not two
    return lo if lo < 0 else hi if hi >= V else None
