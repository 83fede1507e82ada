"""Multi-head latent attention (MLA), DeepSeek-V2 §2.1, as used by DeepSeek-V3 and Kimi K2.

Shape legend: B batch, T sequence, D hidden, H heads, N no-RoPE head dim (qk_nope_head_dim),
R RoPE head dim (qk_rope_head_dim), Vh value head dim, Lq / Lkv the query / key-value LoRA ranks;
when decoding with a cache (moe/cache.py), S cached positions and C = Lkv + R numbers per position.

Packed sequences (several documents in one row) pass `visible_B1TT`, a bool mask that is True where
query t may attend to key s (s <= t and both in one document); without it attention is plain causal.

Keys and values are reconstructed from a small latent (Lkv) plus one RoPE key of R dims shared by
all heads ("decoupled RoPE"). Parameter names follow the Hugging Face DeepseekV3 port so checkpoints
map one-to-one. Per-head row layout, which QK-clip relies on:
    q_b_proj (or q_proj): head h owns rows [h*(N+R), h*(N+R)+N) for q_nope, then R rows for q_rope;
    kv_b_proj:            head h owns rows [h*(N+Vh), h*(N+Vh)+N) for k_nope, then Vh rows for v.
"""

import torch
import torch.nn.functional as F
from torch import nn

import kimi_kernels
from moe.cache import LayerCache
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

    def forward(self, x_BTD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor,
                visible_B1TT: torch.Tensor | None = None, cache: LayerCache | None = None) -> torch.Tensor:
        """cos/sin are [T, R/2], or [B, 1, T, R/2] for per-sequence positions (packed documents);
        `visible_B1TT` (bool, True = may attend, causal included) replaces the causal mask."""
        if cache is not None:
            return self.forward_cached(x_BTD, cos_TR, sin_TR, cache)
        B, T, _ = x_BTD.shape
        q_BHTQ, k_BHTQ, v_BHTV = self.qkv(x_BTD, cos_TR, sin_TR)
        max_H = None  # filled by the kernel where it reports the max logit as a by-product
        if visible_B1TT is None:  # unpacked batches keep fused causal kernels (kimi_kernels.causal_attention)
            out_BHTV, max_H = kimi_kernels.causal_attention(q_BHTQ, k_BHTQ, v_BHTV, self.scale)
        else:
            out_BHTV = F.scaled_dot_product_attention(q_BHTQ, k_BHTQ, v_BHTV, attn_mask=visible_B1TT,
                                                      scale=self.scale)
        if self.record_max_logits and self.training:  # evaluation forwards must not feed the clip
            if self.max_logits_H.dtype != torch.float32:  # model.to(bf16) cast the buffer; keep the record exact
                self.max_logits_H = self.max_logits_H.float()
            if max_H is None:
                max_H = self.head_max_logits(q_BHTQ, k_BHTQ, visible_B1TT)
            torch.maximum(self.max_logits_H, max_H, out=self.max_logits_H)
        return self.o_proj(out_BHTV.transpose(1, 2).reshape(B, T, self.num_heads * self.v_dim))

    def project(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q_nope [B, H, T, N], q_rope [B, H, T, R], the normed KV latent c_KV [B, T, Lkv] and the
        shared key k_rope [B, 1, T, R]; RoPE applied to both rope parts. cos/sin are [T, R/2], or
        [B, 1, T, R/2] when every sequence has its own positions."""
        B, T, _ = x_BTD.shape
        H, N, R = self.num_heads, self.nope_dim, self.rope_dim
        if self.q_lora_rank is None:
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_nope_BHTN, q_rope_BHTR = q.view(B, T, H, N + R).transpose(1, 2).split([N, R], dim=-1)
        latent_BTL, k_rope_BTR = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, R], dim=-1)
        q_rope_BHTR = apply_rope(q_rope_BHTR, cos, sin)
        k_rope_B1TR = apply_rope(k_rope_BTR.unsqueeze(1), cos, sin)
        return q_nope_BHTN, q_rope_BHTR, self.kv_a_layernorm(latent_BTL), k_rope_B1TR

    def qkv(self, x_BTD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor):
        """Per-head queries and keys [B, H, T, N+R] (no-RoPE part first) and values [B, H, T, Vh]."""
        B, T, _ = x_BTD.shape
        q_nope_BHTN, q_rope_BHTR, latent_BTL, k_rope_B1TR = self.project(x_BTD, cos_TR, sin_TR)
        k_nope_BHTN, v_BHTV = self.up_project(latent_BTL)
        q_BHTQ = torch.cat([q_nope_BHTN, q_rope_BHTR], dim=-1)
        k_BHTQ = torch.cat([k_nope_BHTN, k_rope_B1TR.expand(B, self.num_heads, T, self.rope_dim)], dim=-1)
        return q_BHTQ, k_BHTQ, v_BHTV

    def up_project(self, latent_BSL: torch.Tensor):
        """Per-head no-RoPE keys [B, H, S, N] and values [B, H, S, Vh] of latents [B, S, Lkv]."""
        B, S, _ = latent_BSL.shape
        kv_BHSX = self.kv_b_proj(latent_BSL).view(B, S, self.num_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        return kv_BHSX.split([self.nope_dim, self.v_dim], dim=-1)

    def forward_cached(self, x_BTD: torch.Tensor, cos_B1TR: torch.Tensor, sin_B1TR: torch.Tensor,
                       cache: LayerCache) -> torch.Tensor:
        """Attention of T new tokens per sequence over that sequence's cache, which it first extends.

        Only c_KV and the RoPE key are cached (DeepSeek-V2 §2.1.2-2.1.3). `cache.absorbed` chooses
        how the per-head keys and values are formed from them; both give the same numbers.
        """
        B, T, _ = x_BTD.shape
        q_nope_BHTN, q_rope_BHTR, latent_BTL, k_rope_B1TR = self.project(x_BTD, cos_B1TR, sin_B1TR)
        kv_BSC = cache.write(torch.cat([latent_BTL, k_rope_B1TR.squeeze(1)], dim=-1))
        attend = self._attend_absorbed if cache.absorbed else self._attend_per_head
        out_BHTV = attend(q_nope_BHTN, q_rope_BHTR, kv_BSC, cache.visible_B1TS)
        return self.o_proj(out_BHTV.transpose(1, 2).reshape(B, T, self.num_heads * self.v_dim))

    def _attend_per_head(self, q_nope_BHTN, q_rope_BHTR, kv_BSC, visible_B1TS):
        """The reference: up-project every cached latent to per-head K and V, then plain attention."""
        B, S, _ = kv_BSC.shape
        latent_BSL, k_rope_BSR = kv_BSC.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_nope_BHSN, v_BHSV = self.up_project(latent_BSL)
        q_BHTQ = torch.cat([q_nope_BHTN, q_rope_BHTR], dim=-1)
        k_BHSQ = torch.cat([k_nope_BHSN, k_rope_BSR.unsqueeze(1).expand(B, self.num_heads, S, self.rope_dim)], dim=-1)
        return F.scaled_dot_product_attention(q_BHTQ, k_BHSQ, v_BHSV, attn_mask=visible_B1TS, scale=self.scale)

    def _attend_absorbed(self, q_nope_BHTN, q_rope_BHTR, kv_BSC, visible_B1TS):
        """Attention in latent space (DeepSeek-V2 §2.1.2, "absorb W^UK into W^Q, W^UV into W^O").

        k_nope = W_UK c, so q_nope . k_nope = (W_UK^T q_nope) . c: each head's query is mapped into
        the latent once and scored against the cache as it is, as one shared key of Lkv + R dims
        (multi-query attention). Likewise sum_s p_s W_UV c_s = W_UV (sum_s p_s c_s): the latents are
        averaged first and W_UV applied once per query, so no cached token is ever up-projected.
        """
        B, H, T, _ = q_nope_BHTN.shape
        S, L = kv_BSC.shape[1], self.kv_lora_rank
        w_uk_HNL, w_uv_HVL = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, L).split(
            [self.nope_dim, self.v_dim], dim=1)
        q_BHTC = torch.cat([torch.matmul(q_nope_BHTN, w_uk_HNL), q_rope_BHTR], dim=-1)
        # One key per token for all heads: heads and queries fold into one matmul dimension.
        scores_BHTS = torch.bmm(q_BHTC.reshape(B, H * T, -1), kv_BSC.transpose(1, 2)).view(B, H, T, S)
        scores_BHTS = (scores_BHTS * self.scale).masked_fill(~visible_B1TS, float("-inf"))
        p_BHTS = scores_BHTS.float().softmax(dim=-1).to(kv_BSC.dtype)
        o_BHTL = torch.bmm(p_BHTS.view(B, H * T, S), kv_BSC[..., :L]).view(B, H, T, L)
        return torch.matmul(o_BHTL, w_uv_HVL.transpose(1, 2))

    @torch.no_grad()
    def head_max_logits(self, q_BHTQ: torch.Tensor, k_BHTQ: torch.Tensor,
                        visible_B1TT: torch.Tensor | None = None) -> torch.Tensor:
        """[H] fp32: each head's largest scale * q.k over the causal pairs of the batch (only the
        pairs `visible_B1TT` allows, when given: logits softmax never sees must not trigger a clip).

        SDPA does not expose its logits, so this is one extra Q K^T product without softmax, PV or
        backward, blockwise over queries: about 1/6 of the attention's own fwd+bwd matmul work.
        """
        T = q_BHTQ.shape[2]
        best_H = torch.full((self.num_heads,), float("-inf"), device=q_BHTQ.device)
        for start in range(0, T, _MAX_LOGIT_BLOCK):
            end = min(start + _MAX_LOGIT_BLOCK, T)
            # Keys past `end` are masked for every query in the block, so only [0, end) is read.
            s_BHqk = torch.matmul(q_BHTQ[:, :, start:end], k_BHTQ[:, :, :end].transpose(-1, -2)).float()
            if visible_B1TT is None:
                visible_qk = torch.ones(end - start, end, dtype=torch.bool, device=s_BHqk.device).tril(start)
            else:
                visible_qk = visible_B1TT[:, :, start:end, :end]
            s_BHqk.masked_fill_(~visible_qk, float("-inf"))
            best_H = torch.maximum(best_H, s_BHqk.amax(dim=(0, 2, 3)) * self.scale)
        return best_H

    @torch.no_grad()
    def max_logits(self, x_BTD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor,
                   visible_B1TT: torch.Tensor | None = None) -> torch.Tensor:
        """[H] fp32: the largest logit of each head on this input with the current weights (QK-clip's
        re-measure after an update); records nothing. Takes forward's positional arguments, so a
        forward pre-hook can call it with the args it sees."""
        q_BHTQ, k_BHTQ, _ = self.qkv(x_BTD, cos_TR, sin_TR)
        return self.head_max_logits(q_BHTQ, k_BHTQ, visible_B1TT)
