"""Multi-head latent attention (MLA), DeepSeek-V2 §2.1, as used by DeepSeek-V3 and Kimi K2.

Shape legend: B batch, T sequence, D hidden, H heads, N no-RoPE head dim (qk_nope_head_dim),
R RoPE head dim (qk_rope_head_dim), Vh value head dim, Lq / Lkv the query / key-value LoRA ranks.

Keys and values are reconstructed from a small latent (Lkv) plus one RoPE key of R dims shared by
all heads ("decoupled RoPE"). Parameter names follow the Hugging Face DeepseekV3 port so checkpoints
map one-to-one. Per-head row layout, which QK-clip relies on:
    q_b_proj (or q_proj): head h owns rows [h*(N+R), h*(N+R)+N) for q_nope, then R rows for q_rope;
    kv_b_proj:            head h owns rows [h*(N+Vh), h*(N+Vh)+N) for k_nope, then Vh rows for v.
"""

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import ModelConfig
from moe.layers import RMSNorm, apply_rope

# Queries per block when measuring max logits: bounds the extra memory to B*H*256*T scores.
_MAX_LOGIT_BLOCK = 256
# The two latent norms use a fixed eps whatever rms_norm_eps says: DeepSeek-V3's reference code and
# HF's DeepseekV3Attention build them with RMSNorm's default, and checkpoints were trained that way.
_LATENT_NORM_EPS = 1e-6


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        qk_dim = cfg.qk_head_dim
        self.scale = qk_dim ** -0.5
        H, D = cfg.num_heads, cfg.hidden_size
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, _LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=False)
        # QK-clip (Kimi K2 §2.1) needs each head's largest pre-softmax logit of the step. Recording is
        # off unless an optimizer asks for it; the running max survives until reset_max_logits().
        self.record_max_logits = False
        self.register_buffer("max_logits_H", torch.full((H,), float("-inf")), persistent=False)

    def query_proj(self) -> nn.Linear:
        """The projection whose output rows are the per-head queries."""
        return self.q_proj if self.q_lora_rank is None else self.q_b_proj

    def reset_max_logits(self) -> None:
        self.max_logits_H.fill_(float("-inf"))

    def forward(self, x_BTD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BHTQ, k_BHTQ, v_BHTV = self.qkv(x_BTD, cos_TR, sin_TR)
        if self.record_max_logits and self.training:  # evaluation forwards must not feed the clip
            if self.max_logits_H.dtype != torch.float32:  # model.to(bf16) cast the buffer; keep the record exact
                self.max_logits_H = self.max_logits_H.float()
            torch.maximum(self.max_logits_H, self.head_max_logits(q_BHTQ, k_BHTQ), out=self.max_logits_H)
        out_BHTV = F.scaled_dot_product_attention(q_BHTQ, k_BHTQ, v_BHTV, is_causal=True, scale=self.scale)
        return self.o_proj(out_BHTV.transpose(1, 2).reshape(B, T, self.num_heads * self.v_dim))

    def qkv(self, x_BTD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor):
        """Per-head queries and keys [B, H, T, N+R] (no-RoPE part first) and values [B, H, T, Vh]."""
        B, T, _ = x_BTD.shape
        H, N, R = self.num_heads, self.nope_dim, self.rope_dim
        if self.q_lora_rank is None:
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_BHTQ = q.view(B, T, H, N + R).transpose(1, 2)
        q_nope, q_rope = q_BHTQ.split([N, R], dim=-1)

        kv_a = self.kv_a_proj_with_mqa(x_BTD)
        latent_BTL, k_rope_BTR = kv_a.split([self.kv_lora_rank, R], dim=-1)
        kv_BHTX = self.kv_b_proj(self.kv_a_layernorm(latent_BTL)).view(B, T, H, N + self.v_dim).transpose(1, 2)
        k_nope, v_BHTV = kv_BHTX.split([N, self.v_dim], dim=-1)

        q_rope = apply_rope(q_rope, cos_TR, sin_TR)
        k_rope_B1TR = apply_rope(k_rope_BTR.unsqueeze(1), cos_TR, sin_TR)
        q_BHTQ = torch.cat([q_nope, q_rope], dim=-1)
        k_BHTQ = torch.cat([k_nope, k_rope_B1TR.expand(B, H, T, R)], dim=-1)
        return q_BHTQ, k_BHTQ, v_BHTV

    @torch.no_grad()
    def head_max_logits(self, q_BHTQ: torch.Tensor, k_BHTQ: torch.Tensor) -> torch.Tensor:
        """[H] fp32: each head's largest scale * q.k over the causal pairs of the batch.

        SDPA does not expose its logits, so this is one extra Q K^T product without softmax, PV or
        backward, blockwise over queries: about 1/6 of the attention's own fwd+bwd matmul work.
        """
        T = q_BHTQ.shape[2]
        best_H = torch.full((self.num_heads,), float("-inf"), device=q_BHTQ.device)
        for start in range(0, T, _MAX_LOGIT_BLOCK):
            end = min(start + _MAX_LOGIT_BLOCK, T)
            # Keys past `end` are masked for every query in the block, so only [0, end) is read.
            s_BHqk = torch.matmul(q_BHTQ[:, :, start:end], k_BHTQ[:, :, :end].transpose(-1, -2)).float()
            causal_qk = torch.ones(end - start, end, dtype=torch.bool, device=s_BHqk.device).tril(start)
            s_BHqk.masked_fill_(~causal_qk, float("-inf"))
            best_H = torch.maximum(best_H, s_BHqk.amax(dim=(0, 2, 3)) * self.scale)
        return best_H

    @torch.no_grad()
    def max_logits(self, x_BTD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
        """[H] fp32: the largest logit of each head on this input with the current weights (QK-clip's
        re-measure after an update); records nothing."""
        q_BHTQ, k_BHTQ, _ = self.qkv(x_BTD, cos_TR, sin_TR)
        return self.head_max_logits(q_BHTQ, k_BHTQ)
