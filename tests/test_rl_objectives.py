"""posttrain.rl.objectives: k1.5 and GRPO losses against formulas written out here, token by token.

Shape legend: S samples, T response tokens, D input features, V vocabulary.

The toy policy is a Linear(D, V) giving logits for fixed inputs; its log-prob of fixed tokens is the
policy's logp_ST. Everything is float64 so finite differences are meaningful.
"""

import math

import pytest
import torch

from posttrain.rl import objectives
from posttrain.rl.objectives import PolicyBatch, group_mean, group_std

S, T, D, V = 9, 6, 4, 7
# Ids neither contiguous nor sorted; group sizes 3 (id 3), 2 (id 7) and 4 (id 0).
GROUPS = [3, 7, 0, 3, 0, 7, 0, 3, 0]
# Group 7 has equal rewards: its std is 0, GRPO's advantage must be 0 there (not 0/0).
REWARDS = [1.0, 0.5, 0.0, 0.0, 1.0, 0.5, 0.25, 1.0, 1.0]


def toy():
    """(policy, reference policy, x_STD, tokens_ST, mask_ST): the reference is a perturbed copy, so
    logp != ref and the tau / ratio terms are not trivial. Sample 4 has no masked token."""
    g = torch.Generator().manual_seed(0)
    policy = torch.nn.Linear(D, V).double()
    with torch.no_grad():
        policy.weight.copy_(torch.randn(V, D, generator=g, dtype=torch.float64))
        policy.bias.copy_(torch.randn(V, generator=g, dtype=torch.float64))
    ref = torch.nn.Linear(D, V).double()
    with torch.no_grad():
        ref.weight.copy_(policy.weight + 0.1 * torch.randn(V, D, generator=g, dtype=torch.float64))
        ref.bias.copy_(policy.bias + 0.1 * torch.randn(V, generator=g, dtype=torch.float64))
    x_STD = torch.randn(S, T, D, generator=g, dtype=torch.float64)
    tokens_ST = torch.randint(0, V, (S, T), generator=g)
    lengths = [6, 3, 5, 1, 0, 6, 2, 4, 6]  # right padding: the mask is False after each length
    mask_ST = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    mask_ST[2, 1] = False  # and a hole inside a response
    return policy, ref, x_STD, tokens_ST, mask_ST


def token_logp(model, x_STD, tokens_ST):
    return model(x_STD).log_softmax(-1).gather(-1, tokens_ST[..., None])[..., 0]


def make_batch(policy, ref, x_STD, tokens_ST, mask_ST, garbage=float("nan")):
    """The batch the trainer would build; masked positions hold `garbage` in logp and ref alike."""
    logp_ST = torch.where(mask_ST, token_logp(policy, x_STD, tokens_ST), garbage)
    with torch.no_grad():
        ref_ST = torch.where(mask_ST, token_logp(ref, x_STD, tokens_ST), garbage)
    return PolicyBatch(logp_ST, ref_ST, mask_ST, torch.tensor(REWARDS, dtype=torch.float64),
                       torch.tensor(GROUPS))


def loop_group_stats(values, groups):
    """Per sample, its group's mean and population std: the dumb way."""
    means, stds = [], []
    for g in groups:
        members = [v for v, h in zip(values, groups) if h == g]
        m = sum(members) / len(members)
        means.append(m)
        stds.append(math.sqrt(sum((v - m) ** 2 for v in members) / len(members)))
    return means, stds


def loop_sequence_logp(model, x_STD, tokens_ST, mask_ST):
    """lp_j = sum over sample j's masked tokens of log softmax(W x + b)[token], one token at a time."""
    out = []
    for j in range(S):
        total = torch.zeros((), dtype=torch.float64)
        for t in range(T):
            if mask_ST[j, t]:
                logits = model.weight @ x_STD[j, t] + model.bias
                total = total + logits[tokens_ST[j, t]] - torch.logsumexp(logits, 0)
        out.append(total)
    return out


def flat_grad(loss, model):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])


def test_group_mean_and_std_match_a_loop():
    g = torch.Generator().manual_seed(1)
    groups = [5, 2, 5, 9, 2, 5, 11, 2]  # sizes 3, 3, 1 (id 9), 1 (id 11)
    values = torch.randn(len(groups), generator=g, dtype=torch.float64)
    means, stds = loop_group_stats(values.tolist(), groups)
    torch.testing.assert_close(group_mean(values, torch.tensor(groups)), torch.tensor(means, dtype=torch.float64))
    torch.testing.assert_close(group_std(values, torch.tensor(groups)), torch.tensor(stds, dtype=torch.float64))
    assert group_std(values, torch.tensor(groups))[3].item() == 0.0  # a group of one has std 0
    with pytest.raises(ValueError, match=r"group_mean takes values_S \[S\] and groups_S \[S\], got shapes \(8,\) and \(7,\)"):
        group_mean(values, torch.tensor(groups[:7]))


def test_k15_by_hand():
    # One group, rewards [1, 0]: r̄ = 0.5, advantages [0.5, -0.5]. One token each: lp = [-1, -2],
    # ref = [-1.5, -2], so lp - ref = [0.5, 0]. With tau = 0.1:
    # L = -mean[0.5 * -1 - 0.05 * 0.25, -0.5 * -2 - 0] = -mean[-0.5125, 1.0] = -0.24375
    # kl = mean[0.25, 0] / 2 = 0.0625; advantage_abs = 0.5
    batch = PolicyBatch(torch.tensor([[-1.0], [-2.0]]), torch.tensor([[-1.5], [-2.0]]), torch.ones(2, 1, dtype=torch.bool),
                        torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    loss, metrics = objectives.build("k15", tau=0.1)(batch)
    assert loss.item() == pytest.approx(-0.24375)
    assert metrics == pytest.approx({"loss": -0.24375, "kl": 0.0625, "advantage_abs": 0.5})


def test_k15_gradient_matches_finite_differences_and_the_analytic_form():
    tau = 0.3
    policy, ref, x_STD, tokens_ST, mask_ST = toy()
    loss, _ = objectives.build("k15", tau=tau)(make_batch(policy, ref, x_STD, tokens_ST, mask_ST))
    grad = flat_grad(loss, policy)

    means, _ = loop_group_stats(REWARDS, GROUPS)
    with torch.no_grad():
        ref_lp = [v.item() for v in loop_sequence_logp(ref, x_STD, tokens_ST, mask_ST)]

    def objective():  # L = -(1/S) sum_j [(r_j - r̄_j) lp_j - tau/2 (lp_j - ref_j)^2], written out again
        lp = loop_sequence_logp(policy, x_STD, tokens_ST, mask_ST)
        return -sum((r - m) * l - tau / 2 * (l - q) ** 2 for r, m, l, q in zip(REWARDS, means, lp, ref_lp)) / S

    assert loss.item() == pytest.approx(objective().item(), rel=1e-12)
    params = list(policy.parameters())
    numeric, h = [], 1e-6
    with torch.no_grad():
        for p in params:
            for k in range(p.numel()):
                old = p.view(-1)[k].item()
                p.view(-1)[k] = old + h
                up = objective().item()
                p.view(-1)[k] = old - h
                down = objective().item()
                p.view(-1)[k] = old
                numeric.append((up - down) / (2 * h))
    torch.testing.assert_close(grad, torch.tensor(numeric, dtype=torch.float64), rtol=1e-6, atol=1e-8)

    # -(1/S) sum_j [(r_j - r̄_j) - tau (lp_j - ref_j)] dlp_j/dtheta
    lp = loop_sequence_logp(policy, x_STD, tokens_ST, mask_ST)
    analytic = torch.zeros_like(grad)
    for j in range(S):
        if mask_ST[j].any():
            analytic -= ((REWARDS[j] - means[j]) - tau * (lp[j].item() - ref_lp[j])) / S * flat_grad(lp[j], policy)
    torch.testing.assert_close(grad, analytic, rtol=1e-10, atol=1e-12)
    assert (lp[0] - ref_lp[0]).abs().item() > 0.05  # the tau term was really exercised


def loop_grpo_loss(logp, ref, mask, clip_eps, kl_coef):
    """GRPO's loss token by token on nested lists, with A_j from loop_group_stats."""
    means, stds = loop_group_stats(REWARDS, GROUPS)
    total = 0.0
    for j in range(S):
        A = (REWARDS[j] - means[j]) / (stds[j] + 1e-4)
        terms = []
        for t in range(T):
            if mask[j][t]:
                ratio = math.exp(logp[j][t] - ref[j][t])
                surrogate = min(ratio * A, min(max(ratio, 1 - clip_eps), 1 + clip_eps) * A)
                d = ref[j][t] - logp[j][t]
                terms.append(surrogate - kl_coef * (math.exp(d) - d - 1))
        total += sum(terms) / len(terms) if terms else 0.0
    return -total / S


def test_grpo_loss_matches_the_token_loop():
    policy, ref, x_STD, tokens_ST, mask_ST = toy()
    with torch.no_grad():  # a reference far enough away that some tokens are clipped
        ref.weight.add_(0.5 * torch.randn(V, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    batch = make_batch(policy, ref, x_STD, tokens_ST, mask_ST)
    loss, metrics = objectives.build("grpo", clip_eps=0.2, kl_coef=0.04)(batch)
    expected = loop_grpo_loss(batch.logp_ST.tolist(), batch.ref_logp_ST.tolist(), mask_ST.tolist(), 0.2, 0.04)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert 0 < metrics["clip_fraction"] < 1 and metrics["kl"] > 0
    means, stds = loop_group_stats(REWARDS, GROUPS)
    assert metrics["advantage_abs"] == pytest.approx(
        sum(abs(r - m) / (s + 1e-4) for r, m, s in zip(REWARDS, means, stds)) / S)


def test_grpo_at_ratio_one_is_the_advantage_weighted_mean_gradient():
    policy, _, x_STD, tokens_ST, mask_ST = toy()
    batch = make_batch(policy, policy, x_STD, tokens_ST, mask_ST)  # ref == current: every ratio is 1
    loss, metrics = objectives.build("grpo", clip_eps=0.2, kl_coef=0.04)(batch)
    grad = flat_grad(loss, policy)

    means, stds = loop_group_stats(REWARDS, GROUPS)
    A = [(r - m) / (s + 1e-4) for r, m, s in zip(REWARDS, means, stds)]
    lp = loop_sequence_logp(policy, x_STD, tokens_ST, mask_ST)  # sum_t logp_t, so dlp_j = sum_t dlogp_t
    n = mask_ST.sum(-1).tolist()
    expected = torch.zeros_like(grad)
    for j in range(S):
        if n[j]:
            expected -= A[j] / n[j] / S * flat_grad(lp[j], policy)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    assert A[1] == A[5] == 0.0 and n[4] == 0  # a zero-std group and an empty sample were in the batch
    # at ratio 1 each non-empty sample's surrogate is A_j, k3 is 0 and no clip is active
    assert loss.item() == pytest.approx(-sum(a for a, k in zip(A, n) if k) / S, rel=1e-12)
    assert metrics["clip_fraction"] == 0.0 and metrics["kl"] == 0.0


def clip_batch():
    """Two samples of one group, rewards [1, 0]: A = [+a, -a] with a = 0.5 / (0.5 + 1e-4).
    Token ratios (ref = 0, logp = log ratio), with clip_eps = 0.2:
      sample 0 (A > 0): 1.5 clipped (past 1.2 in A's direction), 0.5 not, 1.1 inside, masked NaN
      sample 1 (A < 0): 0.5 clipped (past 0.8 in A's direction), 1.5 not, 1.0 inside, masked NaN
    """
    ratios = [[1.5, 0.5, 1.1, 1.0], [0.5, 1.5, 1.0, 1.0]]
    logp_ST = torch.tensor(ratios, dtype=torch.float64).log()
    logp_ST[:, 3] = float("nan")
    mask_ST = torch.tensor([[True, True, True, False]] * 2)
    return PolicyBatch(logp_ST.requires_grad_(), torch.zeros(2, 4, dtype=torch.float64), mask_ST,
                       torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0, 0])), ratios


def test_grpo_clipped_tokens_give_no_surrogate_gradient():
    a = 0.5 / (0.5 + 1e-4)
    batch, ratios = clip_batch()
    loss, metrics = objectives.build("grpo", clip_eps=0.2, kl_coef=0.0)(batch)
    (grad,) = torch.autograd.grad(loss, batch.logp_ST)
    # L = -(1/S)(1/n) sum_t ratio_t A: dL/dlogp_t = -ratio_t A / (S n) = -ratio_t A / 6 where not clipped
    expected = torch.tensor([[0.0, -0.5 * a / 6, -1.1 * a / 6, 0.0],
                             [0.0, 1.5 * a / 6, 1.0 * a / 6, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0.0)
    assert metrics["clip_fraction"] == pytest.approx(2 / 6)

    # With a KL term the clipped token keeps only k3's gradient: d k3 / d logp = 1 - 1/ratio,
    # so dL/dlogp = kl_coef (1 - 1/ratio) / (S n).
    batch, _ = clip_batch()
    loss, _ = objectives.build("grpo", clip_eps=0.2, kl_coef=0.1)(batch)
    (grad,) = torch.autograd.grad(loss, batch.logp_ST)
    assert grad[0, 0].item() == pytest.approx(0.1 * (1 - 1 / 1.5) / 6, rel=1e-12)
    assert grad[1, 0].item() == pytest.approx(0.1 * (1 - 1 / 0.5) / 6, rel=1e-12)


@pytest.mark.parametrize("name, args", [("k15", {"tau": 0.1}), ("grpo", {"clip_eps": 0.2, "kl_coef": 0.04})])
def test_masked_positions_do_not_matter(name, args):
    loss_fn = objectives.build(name, **args)
    policy, ref, x_STD, tokens_ST, mask_ST = toy()
    results = []
    for garbage in (0.0, float("nan"), 1e30, -float("inf")):
        batch = make_batch(policy, ref, x_STD, tokens_ST, mask_ST, garbage)
        loss, metrics = loss_fn(batch)
        grad_ST, *grads = torch.autograd.grad(loss, [batch.logp_ST, *policy.parameters()])
        assert torch.isfinite(grad_ST).all()
        results.append((loss.item(), metrics, grad_ST, torch.cat([g.flatten() for g in grads])))
    for loss, metrics, grad_ST, grad in results[1:]:
        assert loss == results[0][0] and metrics == results[0][1]
        assert torch.equal(grad_ST, results[0][2]) and torch.equal(grad, results[0][3])
    assert (results[0][2][~mask_ST] == 0).all()


def test_low_precision_inputs_are_computed_in_float32():
    batch = PolicyBatch(torch.tensor([[-1.0], [-2.0]], dtype=torch.bfloat16), torch.tensor([[-1.5], [-2.0]], dtype=torch.bfloat16),
                        torch.ones(2, 1, dtype=torch.bool), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    for name in objectives.OBJECTIVES:
        loss, _ = objectives.build(name)(batch)
        assert loss.dtype == torch.float32


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("ppo", {}, r"objective = 'ppo' is not a registry name; valid: k15, grpo"),
        ("k15", {"taus": 0.1}, r"unknown key 'taus' for objective = 'k15'; valid keys: tau"),
        ("grpo", {"tau": 0.1}, r"unknown key 'tau' for objective = 'grpo'; valid keys: clip_eps, kl_coef"),
        ("k15", {"tau": -0.5}, r"tau = -0.5 must be a finite number >= 0"),
        ("k15", {"tau": "0.1"}, r"tau = '0.1' must be a finite number >= 0"),
        ("k15", {"tau": float("nan")}, r"tau = nan must be a finite number >= 0"),
        ("grpo", {"clip_eps": 0.0}, r"clip_eps = 0.0 must be a finite number > 0"),
        ("grpo", {"kl_coef": -0.01}, r"kl_coef = -0.01 must be a finite number >= 0"),
    ],
)
def test_check_and_build_name_the_problem(name, args, message):
    with pytest.raises(ValueError, match=message):
        objectives.check(name, **args)
    with pytest.raises(ValueError, match=message):
        objectives.build(name, **args)


def test_registry_defaults_and_batch_validation():
    objectives.check("k15")
    objectives.check("grpo", clip_eps=0.1)
    assert objectives.build("grpo").keywords == {"clip_eps": 0.2, "kl_coef": 0.04}
    assert objectives.build("k15").keywords == {"tau": 0.1}
    logp = torch.zeros(3, 5)
    with pytest.raises(ValueError, match=r"PolicyBatch.ref_logp_ST has shape \(3, 4\); logp_ST has \(3, 5\)"):
        PolicyBatch(logp, torch.zeros(3, 4), torch.ones(3, 5, dtype=torch.bool), torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"PolicyBatch.groups_S has shape \(2,\), expected \[S\] = \(3,\)"):
        PolicyBatch(logp, logp, torch.ones(3, 5, dtype=torch.bool), torch.zeros(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"PolicyBatch.mask_ST must be a bool tensor, got torch.float32"):
        PolicyBatch(logp, logp, torch.ones(3, 5), torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"PolicyBatch.groups_S must be an integer tensor, got torch.float32"):
        PolicyBatch(logp, logp, torch.ones(3, 5, dtype=torch.bool), torch.zeros(3), torch.zeros(3))
