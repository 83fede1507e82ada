"""The decoder: embeddings, L blocks of (RMSNorm, MLA, RMSNorm, dense MLP or MoE), norm, head.

Single-device code: no process groups, no devices chosen here. Module names match Hugging Face's
DeepseekV3ForCausalLM without its "model." prefix, so weight exchange is a rename (moe/hf.py).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe.attention import MLA
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


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x_BTD, cos_TR, sin_TR):
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos_TR, sin_TR)
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

    def forward(self, input_ids_BT: torch.Tensor, targets_BT: torch.Tensor | None = None) -> ModelOutput:
        if targets_BT is not None:  # before the forward pass, so a bad batch costs nothing
            self._check_targets(targets_BT, input_ids_BT)
        x_BTD = self.hidden_states(input_ids_BT)
        (B, T), V = input_ids_BT.shape, self.cfg.vocab_size
        logits_BTV = self.lm_head(self.norm(x_BTD))
        if targets_BT is None:
            return ModelOutput(logits_BTV)
        lm_loss = F.cross_entropy(
            logits_BTV.float().view(B * T, V), targets_BT.reshape(B * T), ignore_index=IGNORE_INDEX
        )
        aux = [block.mlp.aux_loss for block in self.layers if isinstance(block.mlp, MoE)]
        aux_loss = torch.stack(aux).sum() if aux else lm_loss.new_zeros(())
        return ModelOutput(logits_BTV, lm_loss + aux_loss, lm_loss, aux_loss)

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


def _check_batch_shape(input_ids_BT: torch.Tensor) -> None:
    # An empty batch would otherwise fail deep inside (aminmax over no elements, a reshape of zero tokens).
    if input_ids_BT.ndim != 2 or input_ids_BT.numel() == 0:
        raise ValueError(f"input_ids has shape {tuple(input_ids_BT.shape)}; need [B, T] with B >= 1 and T >= 1")


def _outside(ids: torch.Tensor, V: int) -> int | None:
    """The smallest id if it is negative, else the largest if it is >= V, else None."""
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one host sync, not two
    return lo if lo < 0 else hi if hi >= V else None
