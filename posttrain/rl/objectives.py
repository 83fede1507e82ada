"""RL policy losses, built by name: `loss_fn = objectives.build("k15", tau=0.1); loss, metrics = loss_fn(batch)`.

Shape legend: S samples (several per prompt, one group per prompt), T padded response tokens.

A registry name maps to a factory in OBJECTIVES that validates its hyper-parameters and returns
`loss_fn(batch: PolicyBatch) -> (loss, metrics)`: a scalar to minimise and plain-float metrics to log.
The maths lives in the pure functions `k15_loss` and `grpo_loss`; the factories only bind arguments.
`check(name, **args)` validates the name, the keys and the values without a batch, so a trainer can
refuse a typo before it samples anything; `build` runs the same check first.

Reference policy. Both losses compare the current policy with `ref_logp_ST`, the log-probabilities of
the policy at the start of the iteration, which is also the one that sampled the responses: k1.5's
pi_i (§2.3) and GRPO's pi_old (§4.1). GRPO's separate KL to a frozen SFT model is not modelled here;
its k3 term regularises towards the same pi_old.

Precision: half and bfloat16 inputs are computed in float32 (a sum of T log-probabilities in bf16 loses
the small differences the losses are made of); float32 and float64 stay as they are.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

LossFn = Callable[["PolicyBatch"], tuple[torch.Tensor, dict[str, float]]]
GRPO_STD_EPS = 1e-4  # added to the group's reward std: a group with equal rewards gets advantage 0, not 0/0


@dataclass
class PolicyBatch:
    """One batch of sampled responses, several per prompt.

    logp_ST: current policy's log-prob of each response token (requires grad); any value, NaN included,
        where mask_ST is False.
    ref_logp_ST: the iteration's reference/sampling policy's log-prob of the same tokens (no grad).
    mask_ST: True on the response tokens that count.
    rewards_S: the (shaped) reward of each sample.
    groups_S: integer group id per sample; samples of one prompt share an id, every group is complete.
    """

    logp_ST: torch.Tensor
    ref_logp_ST: torch.Tensor
    mask_ST: torch.Tensor
    rewards_S: torch.Tensor
    groups_S: torch.Tensor

    def __post_init__(self):
        if self.logp_ST.ndim != 2 or self.logp_ST.size(0) == 0:
            raise ValueError(f"PolicyBatch.logp_ST must be [S, T] with S >= 1, got shape {tuple(self.logp_ST.shape)}")
        shape = tuple(self.logp_ST.shape)
        for field in ("ref_logp_ST", "mask_ST"):
            if tuple(getattr(self, field).shape) != shape:
                raise ValueError(f"PolicyBatch.{field} has shape {tuple(getattr(self, field).shape)}; "
                                 f"logp_ST has {shape} and they must match")
        for field in ("rewards_S", "groups_S"):
            if tuple(getattr(self, field).shape) != shape[:1]:
                raise ValueError(f"PolicyBatch.{field} has shape {tuple(getattr(self, field).shape)}, "
                                 f"expected [S] = {shape[:1]}")
        for field in ("logp_ST", "ref_logp_ST", "rewards_S"):
            if not getattr(self, field).is_floating_point():
                raise ValueError(f"PolicyBatch.{field} must be a float tensor, got {getattr(self, field).dtype}")
        if self.mask_ST.dtype != torch.bool:
            raise ValueError(f"PolicyBatch.mask_ST must be a bool tensor, got {self.mask_ST.dtype}")
        if self.groups_S.is_floating_point() or self.groups_S.is_complex() or self.groups_S.dtype == torch.bool:
            raise ValueError(f"PolicyBatch.groups_S must be an integer tensor, got {self.groups_S.dtype}")


def group_mean(values_S: torch.Tensor, groups_S: torch.Tensor) -> torch.Tensor:
    """[S]: for each sample, the mean of `values_S` over the samples sharing its group id.

    Ids need not be contiguous or sorted; one scatter-add over the G distinct ids, no Python loop.
    """
    if values_S.ndim != 1 or tuple(groups_S.shape) != tuple(values_S.shape):
        raise ValueError(f"group_mean takes values_S [S] and groups_S [S], got shapes {tuple(values_S.shape)} "
                         f"and {tuple(groups_S.shape)}")
    ids_G, inverse_S = torch.unique(groups_S, return_inverse=True)
    G = ids_G.numel()
    sums_G = values_S.new_zeros(G).index_add(0, inverse_S, values_S)
    counts_G = torch.bincount(inverse_S, minlength=G).to(values_S.dtype)
    return (sums_G / counts_G)[inverse_S]


def group_std(values_S: torch.Tensor, groups_S: torch.Tensor) -> torch.Tensor:
    """[S]: for each sample, the population std (divide by n, not n - 1) of its group's values.

    Computed as sqrt(mean of squared deviations), not sqrt(E[x^2] - E[x]^2), which cancels badly when
    the rewards are large and close together.
    """
    dev_S = values_S - group_mean(values_S, groups_S)
    return group_mean(dev_S * dev_S, groups_S).sqrt()


def k15_loss(batch: PolicyBatch, tau: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Kimi k1.5's policy-mirror-descent surrogate (arXiv 2501.12599, §2.3, eq. 3).

    With the sequence log-probabilities lp_j = sum_t mask * logp, ref_j likewise for pi_i, and r̄_j
    the mean reward of sample j's group (the paper's estimate of tau log Z):

        L = -(1/S) sum_j [ (r_j - r̄_j) lp_j - (tau/2) (lp_j - ref_j)^2 ]
        dL/dlp_j = -(1/S) [ (r_j - r̄_j) - tau (lp_j - ref_j) ]

    r̄ and ref are constants. The squared log-ratio keeps the new policy near pi_i (mirror descent);
    tau = 0 leaves plain REINFORCE with a group-mean baseline.
    Metrics: "loss"; "kl" = mean_j (lp_j - ref_j)^2 / 2 (the regulariser, per unit tau);
    "advantage_abs" = mean_j |r_j - r̄_j|.
    """
    logp_ST, ref_ST, rewards_S = _computed_dtype(batch)
    lp_S = torch.where(batch.mask_ST, logp_ST, 0.0).sum(-1)  # where, not *: NaN * 0 is NaN
    ref_S = torch.where(batch.mask_ST, ref_ST, 0.0).sum(-1)
    adv_S = rewards_S - group_mean(rewards_S, batch.groups_S)
    diff_S = lp_S - ref_S
    loss = -(adv_S * lp_S - 0.5 * tau * diff_S * diff_S).mean()
    with torch.no_grad():
        values = torch.stack([loss, 0.5 * (diff_S * diff_S).mean(), adv_S.abs().mean()]).tolist()  # one sync
    return loss, dict(zip(("loss", "kl", "advantage_abs"), values))


def grpo_advantages(rewards_S: torch.Tensor, groups_S: torch.Tensor) -> torch.Tensor:
    """[S] GRPO's outcome advantage (arXiv 2402.03300, §4.1.2): A_j = (r_j - mean_group) / (std_group + 1e-4)."""
    return (rewards_S - group_mean(rewards_S, groups_S)) / (group_std(rewards_S, groups_S) + GRPO_STD_EPS)


def grpo_loss(batch: PolicyBatch, clip_eps: float, kl_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO (DeepSeekMath, arXiv 2402.03300, §4.1, eq. 3) with pi_old = the reference of the batch.

    Every token of sample j gets A_j (grpo_advantages). With ratio_t = exp(logp_t - ref_t),

        J_j = (1/n_j) sum_{t in mask_j} [ min(ratio_t A_j, clip(ratio_t, 1 - eps, 1 + eps) A_j) - kl_coef k3_t ]
        k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1      (eq. 4: unbiased, >= 0, 0 at ratio 1)
        L = -(1/S) sum_j J_j

    n_j is sample j's count of masked tokens; a sample with n_j = 0 has J_j = 0 and still counts in S.
    The clip stops the gradient of a token whose ratio has already moved past 1 + eps (A > 0) or
    1 - eps (A < 0) in the advantage's direction.
    Metrics: "loss"; "kl" = mean k3 over all masked tokens; "clip_fraction" = share of masked tokens
    where the clipped term is the smaller one (strictly); "advantage_abs" = mean_j |A_j|.
    """
    logp_ST, ref_ST, rewards_S = _computed_dtype(batch)
    mask_ST = batch.mask_ST
    A_S = grpo_advantages(rewards_S, batch.groups_S)
    logratio_ST = torch.where(mask_ST, logp_ST - ref_ST, 0.0)  # masked tokens: ratio 1, whatever they hold
    ratio_ST = logratio_ST.exp()
    A_ST = A_S[:, None]
    plain_ST = ratio_ST * A_ST
    clipped_ST = ratio_ST.clamp(1.0 - clip_eps, 1.0 + clip_eps) * A_ST
    k3_ST = torch.expm1(-logratio_ST) + logratio_ST  # exp(d) - d - 1 with d = -logratio; expm1 keeps it >= 0 near 0
    token_ST = torch.where(mask_ST, torch.minimum(plain_ST, clipped_ST) - kl_coef * k3_ST, 0.0)
    n_S = mask_ST.sum(-1)
    loss = -(token_ST.sum(-1) / n_S.clamp(min=1)).mean()
    with torch.no_grad():
        n_tokens = n_S.sum().clamp(min=1)
        kl = torch.where(mask_ST, k3_ST, 0.0).sum() / n_tokens
        clip_fraction = ((clipped_ST < plain_ST) & mask_ST).sum() / n_tokens
        values = torch.stack([loss, kl, clip_fraction.to(loss.dtype), A_S.abs().mean()]).tolist()
    return loss, dict(zip(("loss", "kl", "clip_fraction", "advantage_abs"), values))


def _computed_dtype(batch: PolicyBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logp, ref (detached) and rewards (detached) in the dtype the loss is computed in."""
    dtype = torch.promote_types(batch.logp_ST.dtype, torch.float32)
    return (batch.logp_ST.to(dtype), batch.ref_logp_ST.detach().to(dtype), batch.rewards_S.detach().to(dtype))


def _number(name: str, value, *, positive: bool = False) -> float:
    """`value` as a float if it is a finite real number (> 0 when `positive`, else >= 0), else ValueError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} = {value!r} must be a finite number {'> 0' if positive else '>= 0'}")
    return float(value)


def build_k15(tau: float = 0.1) -> LossFn:
    """The registry's "k15": k15_loss with `tau` (>= 0), the weight of the squared log-ratio to pi_i."""
    return functools.partial(k15_loss, tau=_number("tau", tau))


def build_grpo(clip_eps: float = 0.2, kl_coef: float = 0.04) -> LossFn:
    """The registry's "grpo": grpo_loss with `clip_eps` (> 0) and `kl_coef` (>= 0), DeepSeekMath's defaults
    for the clip and for beta."""
    return functools.partial(grpo_loss, clip_eps=_number("clip_eps", clip_eps, positive=True),
                             kl_coef=_number("kl_coef", kl_coef))


OBJECTIVES: dict[str, Callable[..., LossFn]] = {
    "k15": build_k15,
    "grpo": build_grpo,
}


def check(name: str, **args) -> None:
    """Raise ValueError if `name` is not in OBJECTIVES, or `args` holds a key its factory does not take,
    lacks one it needs, or has a bad value (tau < 0, clip_eps <= 0, ...)."""
    build(name, **args)  # building is a validated functools.partial: nothing to undo


def build(name: str, **args) -> LossFn:
    """The policy loss `name` with hyper-parameters `args`: `loss_fn(batch) -> (loss, metrics)`.

    Unknown keys raise ValueError naming the key and the valid ones, so a typo in a config never
    silently falls back to a default.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"objective = {name!r} is not a registry name; valid: {', '.join(OBJECTIVES)}")
    factory = OBJECTIVES[name]
    params = inspect.signature(factory).parameters.values()
    named = [p.name for p in params]
    for key in args:
        if key not in named:
            raise ValueError(f"unknown key {key!r} for objective = {name!r}; valid keys: {', '.join(named)}")
    for p in params:
        if p.default is p.empty and p.name not in args:
            raise ValueError(f"objective = {name!r} needs key {p.name!r}; given: {', '.join(args) or 'none'}")
    return factory(**args)


__all__ = [
    "PolicyBatch", "OBJECTIVES", "check", "build", "group_mean", "group_std", "k15_loss", "grpo_loss",
    "grpo_advantages",
]
