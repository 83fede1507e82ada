"""The Tiny Recursive Model: one small network f applied recursively to a latent z and an answer y.

Shape legend: B batch, L positions (puzzle-embedding prefix, then the cells), D hidden, V vocab, H heads.

One supervision step (`supervise`, the paper's deep_recursion):

    repeat T times (the first T - 1 without gradient):
        repeat n times:  z <- f(x + y + z)       latent reasoning
        y <- f(y + z)                             answer refinement
    logits = head(y), q = halting head(y at position 0)

f(a, b) runs the layers on a + b: the same network for both updates, told apart by what it is
given (x is absent from the answer update). y and z come back detached: deep supervision carries
them to the next step, and its gradient never reaches an earlier one.

The layers are post-norm (h = norm(h + mixer(h)); h = norm(h + ffn(h))), with SwiGLU and no biases,
from moe/layers.py. The mixer is self-attention with RoPE, not causal, or (TRM-MLP) a SwiGLU over
the sequence dimension, which suits a fixed-size board such as Sudoku's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe.layers import MLP, RMSNorm, apply_rope, rope_cos_sin
from trm.config import TRMConfig


class Attention(nn.Module):
    """Bidirectional multi-head self-attention with RoPE over all L positions."""

    def __init__(self, cfg: TRMConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        self.qkv_proj = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        cos, sin = rope_cos_sin(torch.arange(cfg.positions), self.head_dim, cfg.rope_theta, torch.float32)
        self.register_buffer("cos_LR", cos, persistent=False)
        self.register_buffer("sin_LR", sin, persistent=False)

    def forward(self, h_BLD: torch.Tensor) -> torch.Tensor:
        B, L, D = h_BLD.shape
        q, k, v = self.qkv_proj(h_BLD).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = self.cos_LR.to(q.dtype), self.sin_LR.to(q.dtype)
        out_BHLd = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        return self.o_proj(out_BHLd.transpose(1, 2).reshape(B, L, D))


class SequenceMLP(nn.Module):
    """TRM-MLP's mixer: a SwiGLU across positions, the same for every feature channel."""

    def __init__(self, cfg: TRMConfig):
        super().__init__()
        self.mlp = MLP(cfg.positions, 4 * cfg.positions)

    def forward(self, h_BLD: torch.Tensor) -> torch.Tensor:
        return self.mlp(h_BLD.transpose(1, 2)).transpose(1, 2)


class Layer(nn.Module):
    def __init__(self, cfg: TRMConfig):
        super().__init__()
        self.mixer = Attention(cfg) if cfg.mixer == "attention" else SequenceMLP(cfg)
        self.mixer_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.ffn = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, h_BLD: torch.Tensor) -> torch.Tensor:
        h_BLD = self.mixer_norm(h_BLD + self.mixer(h_BLD))
        return self.ffn_norm(h_BLD + self.ffn(h_BLD))


class TRM(nn.Module):
    def __init__(self, cfg: TRMConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, D)
        nn.init.normal_(self.embed_tokens.weight, std=1.0 / math.sqrt(D))  # scaled by sqrt(D) below: unit entries
        self.puzzle_emb = None
        if cfg.puzzle_ids:
            # One [puzzle_emb_len, D] prefix per puzzle id; zero at first, so an unseen id changes nothing.
            self.puzzle_emb = nn.Embedding(cfg.puzzle_ids, cfg.puzzle_emb_len * D)
            nn.init.zeros_(self.puzzle_emb.weight)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
        self.q_head = nn.Linear(D, 1)
        with torch.no_grad():  # start far from halting: early answers are wrong (the reference's -5)
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)
        # The starting y and z: fixed random vectors (not trained), the same for every example and position.
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("y_init", torch.randn(D, generator=generator).clamp(-2, 2))
        self.register_buffer("z_init", torch.randn(D, generator=generator).clamp(-2, 2))

    def embed(self, tokens_BL: torch.Tensor, puzzle_ids_B: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, D]: the puzzle prefix (if any), then the cells' embeddings scaled by sqrt(D)."""
        x = self.embed_tokens(tokens_BL) * math.sqrt(self.cfg.hidden_size)
        if self.puzzle_emb is not None:
            if puzzle_ids_B is None:
                raise ValueError("this TRM has puzzle embeddings (puzzle_ids > 0): pass puzzle_ids_B")
            prefix = self.puzzle_emb(puzzle_ids_B).view(-1, self.cfg.puzzle_emb_len, self.cfg.hidden_size)
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        return x

    def initial_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, z) before an example's first supervision step, [B, L, D] each."""
        shape = (batch, self.cfg.positions, self.cfg.hidden_size)
        return self.y_init.expand(shape).clone(), self.z_init.expand(shape).clone()

    def f(self, hidden_BLD: torch.Tensor, injection_BLD: torch.Tensor) -> torch.Tensor:
        h = hidden_BLD + injection_BLD
        for layer in self.layers:
            h = layer(h)
        return h

    def recursion(self, x, y, z, n: int):
        """n latent steps, then one answer step."""
        for _ in range(n):
            z = self.f(z, x + y)
        y = self.f(y, z)
        return y, z

    def supervise(self, x_BLD, y_BLD, z_BLD, T: int | None = None, n: int | None = None):
        """One supervision step: (y, z) detached for the next step, logits [B, seq_len, V] of the cells,
        and the halting logit q [B] (> 0: the head thinks the answer is right)."""
        T = self.cfg.T if T is None else T
        n = self.cfg.n if n is None else n
        with torch.no_grad():
            for _ in range(T - 1):
                y_BLD, z_BLD = self.recursion(x_BLD, y_BLD, z_BLD, n)
        y_BLD, z_BLD = self.recursion(x_BLD, y_BLD, z_BLD, n)
        logits_BLV = self.lm_head(y_BLD[:, self.cfg.puzzle_emb_len :])
        q_B = self.q_head(y_BLD[:, 0]).squeeze(-1)
        return y_BLD.detach(), z_BLD.detach(), logits_BLV, q_B


def parameter_count(model: TRM) -> int:
    return sum(p.numel() for p in model.parameters())
