"""QK-clip and MuonClip (Kimi K2 tech report, §2.1 "MuonClip: Stable Training with Weight Clipping").

Shape legend: L attention layers, H heads per layer, N no-RoPE head dim, R RoPE head dim,
Vh value head dim, P rows of one projection weight.

Muon at a high learning rate lets a few heads' pre-softmax logits grow without bound, until the
softmax saturates and the loss spikes. QK-clip caps them after each optimizer step by rescaling the
weights that make them. Let S_h be head h's largest logit scale * q_h.k_h over the step's batches.
Where S_h > tau, gamma_h = tau / S_h and for MLA

    q_nope_h, k_nope_h <- sqrt(gamma_h) * (both),   q_rope_h <- gamma_h * q_rope_h,   k_rope untouched

so q_h.k_h = q_nope.k_nope + q_rope.k_rope shrinks by exactly gamma_h for every token pair, and the
largest one becomes tau. The RoPE key is shared by all heads: scaling it would touch heads under tau,
hence the whole factor goes on the head's own RoPE query. All of these are rows of a projection
weight (see moe/attention.py's layout note), so the clip is a per-row scaling of two weights.

For the data-parallel / ZeRO engine (launch/), the pieces are public:

    max_LH = reduce_max_logits(attentions)            # stacks max_logits_H, all-reduce MAX if dist is up
    gamma_LH = clip_factors(max_LH, tau)              # 1 where S_h <= tau
    q_P, kv_P = mla_row_scales(gamma_H, N, R, Vh)     # per-row factors for query_proj / kv_b_proj
    qk_clip_(attentions, tau, row_scaler)             # all of the above, then reset the records

A `row_scaler(param, scale_P)` must scale row p of the weight that the next forward will use, in
the precision it is kept in. The default scales `param.data`; `MuonClip` scales its fp32 master copy
(and re-rounds the parameter). Under ZeRO the master lives in DeepSpeed's partitions, e.g.

    def zero_row_scaler(param, scale_P):
        w = deepspeed.utils.safe_get_full_fp32_param(param)
        deepspeed.utils.safe_set_full_fp32_param(param, scale_rows_(w, scale_P))

Cost: the records are one extra no-grad Q K^T per attention in the forward (moe/attention.py); the
clip itself is one all-reduce of L*H floats and, for clipped layers only, two row scalings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from optim.muon import Muon, model_param_groups

RowScaler = Callable[[nn.Parameter, torch.Tensor], None]


def clip_factors(max_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """gamma = tau / S where S > tau, else 1 (a head never seen, S = -inf, is left alone)."""
    S = max_logits.float()
    return torch.where(S > tau, tau / S, torch.ones_like(S))


def mla_row_scales(gamma_H: torch.Tensor, nope_dim: int, rope_dim: int, v_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row factors (q_P [H*(N+R)], kv_P [H*(N+Vh)]) for an MLA's query projection and kv_b_proj.

    Head h's rows: q_nope -> sqrt(gamma_h), q_rope -> gamma_h; k_nope -> sqrt(gamma_h), v -> 1.
    """
    H = gamma_H.numel()
    sqrt_H1 = gamma_H.sqrt()[:, None]
    q_P = torch.cat([sqrt_H1.expand(H, nope_dim), gamma_H[:, None].expand(H, rope_dim)], dim=1).reshape(-1)
    kv_P = torch.cat([sqrt_H1.expand(H, nope_dim), torch.ones_like(sqrt_H1).expand(H, v_dim)], dim=1).reshape(-1)
    return q_P, kv_P


def scale_rows_(weight_PX: torch.Tensor, scale_P: torch.Tensor) -> torch.Tensor:
    """weight[p] *= scale[p] in place, computed in at least fp32 (a bf16 factor is off by up to 0.4%);
    a factor of exactly 1 leaves its row bit-identical. Returns the weight."""
    dtype = torch.promote_types(weight_PX.dtype, torch.float32)
    weight_PX.copy_(weight_PX.to(dtype) * scale_P.to(device=weight_PX.device, dtype=dtype)[:, None])
    return weight_PX


def scale_param_rows_(param: nn.Parameter, scale_P: torch.Tensor) -> None:
    """The default RowScaler: the weights used next step are `param.data` itself."""
    scale_rows_(param.data, scale_P)


def reduce_max_logits(attentions: Sequence[nn.Module]) -> torch.Tensor:
    """max_LH: every layer's recorded per-head max logit, maxed over data-parallel ranks when a process
    group is initialised (each rank saw different batches; all must apply the same clip)."""
    max_LH = torch.stack([attn.max_logits_H.float() for attn in attentions])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(max_LH, op=dist.ReduceOp.MAX)
    return max_LH


@torch.no_grad()
def qk_clip_(attentions: Sequence[nn.Module], tau: float, row_scaler: RowScaler = scale_param_rows_) -> torch.Tensor:
    """Clip every head over tau in every MLA of `attentions`, then reset their records.

    Returns the max logits [L, H] the clip acted on (before clipping), for logging.
    """
    max_LH = reduce_max_logits(attentions)
    gamma_LH = clip_factors(max_LH, tau)
    clipped_L = (gamma_LH < 1).any(dim=1).tolist()  # one host sync for all layers
    for attn, gamma_H, clipped in zip(attentions, gamma_LH, clipped_L):
        if clipped:
            q_P, kv_P = mla_row_scales(gamma_H, attn.nope_dim, attn.rope_dim, attn.v_dim)
            row_scaler(attn.query_proj().weight, q_P)
            row_scaler(attn.kv_b_proj.weight, kv_P)
        attn.reset_max_logits()
    return max_LH


class MuonClip(Muon):
    """Muon (+ AdamW groups) followed, inside each `step()`, by QK-clip on the given attentions.

    Construction switches on the attentions' max-logit records. The clip uses what the forwards since
    the previous step recorded (all micro-batches of this step), acts on the weights just updated,
    and resets the records. `last_max_logits_LH` keeps the pre-clip max logits of the last step.
    Replace `row_scaler` when another component owns the master weights (see the module docstring).
    """

    def __init__(self, param_groups: list[dict], attentions: Sequence[nn.Module], qk_clip_tau: float = 100.0):
        if not qk_clip_tau > 0:
            raise ValueError(f"qk_clip_tau = {qk_clip_tau!r}; must be > 0")
        super().__init__(param_groups)
        self.attentions = list(attentions)
        self.qk_clip_tau = qk_clip_tau
        self.row_scaler: RowScaler = self.scale_master_rows
        self.last_max_logits_LH: torch.Tensor | None = None
        for attn in self.attentions:
            attn.record_max_logits = True
            attn.reset_max_logits()

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self.last_max_logits_LH = qk_clip_(self.attentions, self.qk_clip_tau, self.row_scaler)
        return loss

    def scale_master_rows(self, param: nn.Parameter, scale_P: torch.Tensor) -> None:
        """Scale the fp32 master of a low-precision parameter and re-round the parameter from it;
        scale the parameter itself when it is its own master."""
        master = self.state[param].get("master") if param in self.state else None
        if master is None:
            scale_param_rows_(param, scale_P)
        else:
            scale_rows_(master, scale_P)
            param.data.copy_(master)


def build(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
          nesterov: bool = True, ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.95),
          eps: float = 1e-8, qk_clip_tau: float = 100.0) -> MuonClip:
    """The registry's "muonclip": `optim.muon.build`'s groups, QK-clip at tau on `model.attentions()`."""
    if not hasattr(model, "attentions"):
        raise ValueError(f"muonclip needs a model with .attentions() listing its MLA modules; "
                         f"{type(model).__name__} has none")
    groups = model_param_groups(model, lr, weight_decay, momentum, nesterov, ns_steps, betas, eps)
    return MuonClip(groups, model.attentions(), qk_clip_tau)
