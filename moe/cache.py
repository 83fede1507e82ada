"""MLA's compressed KV cache for incremental decoding (DeepSeek-V2 §2.1.2-2.1.3).

Shape legend: L layers, B batch, S cached positions (at most max_len), T new tokens per call,
C = Lkv + R numbers per position: the KV latent c_KV after kv_a_layernorm (Lkv = kv_lora_rank)
followed by the RoPE key shared by all heads (R = qk_rope_head_dim, RoPE already applied).

Every per-head key and value is a function of those C numbers, so nothing else is kept: 576 per
token and layer for Kimi K2 (512 + 64), where a per-head cache holds H * (N + R + Vh) = 20,480.

Each sequence has its own length. A call appends T tokens to every sequence at positions
lengths[b], ..., lengths[b] + T - 1 and then advances each length by how many of them were real,
so a batch of prompts of different lengths is prefilled right-padded in one call: a padding token
is written past its sequence's end, where no real query looks (a query at position p sees keys at
positions <= p only) and the next call overwrites it. Positions, and so RoPE angles, are the same
as for that sequence alone.
"""

from dataclasses import dataclass

import torch

from moe.config import ModelConfig


def cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes LatentCache holds per token of one sequence, all layers: L * (Lkv + R) numbers."""
    return cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype.itemsize


def per_head_cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """The same for a cache of up-projected per-head keys (N + R) and values (Vh), as for MHA."""
    return cfg.num_layers * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim) * dtype.itemsize


@dataclass
class LayerCache:
    """What one layer's attention needs for one cached call."""

    kv_BSC: torch.Tensor  # this layer's whole buffer [B, max_len, C]
    positions_BT: torch.Tensor  # int64: where each new token goes
    visible_B1TS: torch.Tensor  # bool: key s is visible to new token t (s <= its position)
    absorbed: bool  # attend in latent space (True) or through per-head K and V (False)

    def write(self, kv_BTC: torch.Tensor) -> torch.Tensor:
        """Store the new tokens' latents and RoPE keys; return the visible prefix [B, S, C]."""
        B = kv_BTC.shape[0]
        rows_B1 = torch.arange(B, device=kv_BTC.device)[:, None]
        self.kv_BSC[rows_B1, self.positions_BT] = kv_BTC.to(self.kv_BSC.dtype)
        return self.kv_BSC[:, : self.visible_B1TS.shape[-1]]


class LatentCache:
    """Preallocated [L, B, max_len, C] buffer plus one length per sequence."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        if batch_size < 1:
            raise ValueError(f"LatentCache: batch_size = {batch_size} must be >= 1")
        if not 1 <= max_len <= cfg.max_seq_len:
            raise ValueError(f"LatentCache: max_len = {max_len} must be in [1, ModelConfig.max_seq_len = {cfg.max_seq_len}]")
        C = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        self.kv_LBSC = torch.zeros(cfg.num_layers, batch_size, max_len, C, device=device, dtype=dtype)
        self.lengths_B = torch.zeros(batch_size, dtype=torch.int64, device=device)

    @property
    def batch_size(self) -> int:
        return self.kv_LBSC.shape[1]

    @property
    def max_len(self) -> int:
        return self.kv_LBSC.shape[2]

    def views(self, T: int, absorbed: bool) -> tuple[torch.Tensor, list[LayerCache]]:
        """Positions [B, T] of a call that appends T tokens to every sequence, and a view per layer."""
        end = int(self.lengths_B.max()) + T  # the one host sync of a call: how far to attend
        if end > self.max_len:
            raise ValueError(
                f"LatentCache: appending {T} token(s) to a sequence of length {end - T} needs {end} "
                f"positions; this cache holds max_len = {self.max_len}"
            )
        device = self.lengths_B.device
        positions_BT = self.lengths_B[:, None] + torch.arange(T, device=device)
        visible_B1TS = (torch.arange(end, device=device) <= positions_BT[:, :, None]).unsqueeze(1)
        # Indexed, not unbound: unbind's views may not be written in place when grad mode is on.
        return positions_BT, [LayerCache(self.kv_LBSC[i], positions_BT, visible_B1TS, absorbed)
                              for i in range(self.kv_LBSC.shape[0])]

    def advance(self, num_new_B: torch.Tensor) -> None:
        """Count the real tokens of the last call (the rest were padding, overwritten next call)."""
        self.lengths_B += num_new_B.to(self.lengths_B)
