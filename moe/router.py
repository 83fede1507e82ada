"""Top-k router with auxiliary-loss-free bias balancing and a sequence-wise balance loss.

DeepSeek-V3 §2.1.2 (eq. 12-20), as in Kimi K2. Shape legend: B batch, T tokens per sequence,
N = B*T tokens, D hidden, E routed experts, K experts per token.

- scores s = sigmoid(x W^T) (or softmax, for ablations), computed in fp32;
- experts are *chosen* by top-k of s + b, where the bias b is no parameter: it is nudged after each
  optimizer step by `update_bias`, toward equal load (eq. 16's update, speed gamma);
- gate weights use the *unbiased* s of the chosen experts, normalised to sum to 1 and multiplied by
  the routed scaling factor;
- the sequence-wise balance loss (eq. 17-20) is alpha * sum_i f_i P_i per sequence, averaged.

Routing replay (RL, the R3 idea of arXiv 2510.11370): while `replay_ids_NK` is set, a token whose
row holds expert ids (>= 0) goes to exactly those experts instead of its top-k, and its gate weights
are the scores of those experts, so the gradient flows through the experts that produced a sampled
token; a row of -1 routes as usual. Set and cleared by Transformer.replay_routing.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import ModelConfig


@dataclass
class Routing:
    topk_ids_NK: torch.Tensor  # int64 expert ids
    topk_weights_NK: torch.Tensor  # fp32 gate weights
    aux_loss: torch.Tensor  # scalar sequence-wise balance loss (already times alpha)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.score_func = cfg.score_func
        self.scaling = cfg.routed_scaling_factor
        self.bias_update_speed = cfg.bias_update_speed
        self.aux_loss_coef = cfg.seq_aux_loss_coef
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        # Saved with the model (HF calls it e_score_correction_bias), kept fp32 whatever the model dtype.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        # Assignments per expert since the last bias update: what the update and the logs read.
        self.register_buffer("tokens_per_expert_E", torch.zeros(cfg.num_experts, dtype=torch.float32), persistent=False)
        self.replay_ids_NK: torch.Tensor | None = None  # int64 [N, K] of the next forward, -1 rows route freely

    def forward(self, x_BTD: torch.Tensor) -> Routing:
        B, T, D = x_BTD.shape
        logits_NE = F.linear(x_BTD.reshape(B * T, D).float(), self.weight.float())
        scores_NE = logits_NE.sigmoid() if self.score_func == "sigmoid" else logits_NE.softmax(dim=-1)
        with torch.no_grad():
            topk_ids_NK = torch.topk(scores_NE + self.e_score_correction_bias, self.top_k, dim=-1).indices
            if self.replay_ids_NK is not None:
                if self.replay_ids_NK.shape != topk_ids_NK.shape:
                    raise ValueError(f"replayed routing has shape {tuple(self.replay_ids_NK.shape)} but this forward "
                                     f"routes {tuple(topk_ids_NK.shape)} (tokens, experts per token)")
                forced_N1 = self.replay_ids_NK[:, :1] >= 0
                topk_ids_NK = torch.where(forced_N1, self.replay_ids_NK.to(topk_ids_NK.device), topk_ids_NK)
        weights_NK = scores_NE.gather(1, topk_ids_NK)
        weights_NK = weights_NK / (weights_NK.sum(dim=-1, keepdim=True) + 1e-20) * self.scaling
        if self.training:
            with torch.no_grad():
                # scatter_add_, not bincount: a fixed output shape, so torch.compile keeps the graph whole.
                ids_A = topk_ids_NK.reshape(-1)
                self.tokens_per_expert_E.scatter_add_(0, ids_A, torch.ones_like(ids_A, dtype=self.tokens_per_expert_E.dtype))
        aux = self.sequence_balance_loss(scores_NE.view(B, T, -1)) if self.training and self.aux_loss_coef > 0 \
            else scores_NE.new_zeros(())
        return Routing(topk_ids_NK, weights_NK, aux)

    def sequence_balance_loss(self, scores_BTE: torch.Tensor) -> torch.Tensor:
        """alpha * mean over sequences of sum_i f_i P_i (DeepSeek-V3 eq. 17-20).

        f_i = E / (K T) * #tokens whose top-k of the *unbiased* scores holds i (eq. 18);
        P_i = mean over the sequence of s_i / sum_j s_j (eq. 19-20).
        """
        B, T, E = scores_BTE.shape
        probs_BTE = scores_BTE / (scores_BTE.sum(dim=-1, keepdim=True) + 1e-20)
        with torch.no_grad():
            chosen_BTK = torch.topk(scores_BTE, self.top_k, dim=-1).indices
            counts_BE = torch.zeros(B, E, device=scores_BTE.device).scatter_add_(
                1, chosen_BTK.reshape(B, -1), torch.ones(B, T * self.top_k, device=scores_BTE.device))
            f_BE = counts_BE * (E / (self.top_k * T))
        P_BE = probs_BTE.mean(dim=1)
        return self.aux_loss_coef * (f_BE * P_BE).sum(dim=-1).mean()

    @torch.no_grad()
    def update_bias(self) -> None:
        """b_i += gamma * sign(mean load - load_i), then start counting afresh (eq. 16's update).

        Call once per optimizer step, after the counts of every micro-batch (and, when data is
        sharded across processes, every rank: all-reduce tokens_per_expert_E first) are in.
        """
        load_E = self.tokens_per_expert_E
        if load_E.sum() > 0:
            self.e_score_correction_bias += self.bias_update_speed * torch.sign(load_E.mean() - load_E)
        load_E.zero_()

    def load_stats(self) -> dict:
        """Load since the last bias update: per-expert counts, max/mean load, dropped assignments.

        Dropless routing computes every assignment, so `dropped` is 0 by construction; it is reported
        so a capacity-limited variant would show up in the same logs.
        """
        load_E = self.tokens_per_expert_E
        mean = load_E.mean().clamp_min(1e-9)
        return {
            "tokens_per_expert": load_E.tolist(),
            "max_over_mean": float(load_E.max() / mean),
            "dropped": 0,
        }
