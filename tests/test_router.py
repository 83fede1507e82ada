"""The sigmoid top-k router: biased choice, unbiased gate weights, bias balancing, sequence-wise loss.

References not written by us: megatron-core's routing utilities (`topk_routing_with_score_function`,
`compute_routing_scores_for_aux_loss` + `switch_load_balancing_loss_func` as its router's
`_apply_seq_aux_loss` combines them, and `get_updated_expert_bias`), run on a one-process gloo group.
Shape legend: B batch, T tokens per sequence, N = B*T, D hidden, E experts, K experts per token.
"""

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import (
    compute_routing_scores_for_aux_loss,
    get_tokens_per_expert_and_token_count,
    get_updated_expert_bias,
    switch_load_balancing_loss_func,
    topk_routing_with_score_function,
)

from moe.config import preset
from moe.router import Router

E, K, D = 8, 2, 16


def _router(**overrides) -> Router:
    cfg = preset("tiny", hidden_size=D, num_experts=E, num_experts_per_tok=K, **overrides)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=1.0, generator=torch.Generator().manual_seed(0))
    return router


@pytest.fixture
def megatron_one_process():
    """megatron's parallel_state over a 1-process gloo group, torn down so no other test sees it."""
    assert not dist.is_initialized(), "another test left a process group behind"
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel()
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_bias_flips_the_choice_and_gate_weights_use_unbiased_scores():
    router = _router(routed_scaling_factor=2.5).eval()
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0])
    x_BTD = torch.zeros(1, 1, D)
    x_BTD[..., 0] = 1.0  # logits = weight[:, 0]
    assert router(x_BTD).topk_ids_NK.sort().values.tolist() == [[0, 1]]

    router.e_score_correction_bias[7] = 1.0  # sigmoid(-2) + 1 = 1.12 beats sigmoid(1) = 0.73
    routing = router(x_BTD)
    ids = routing.topk_ids_NK[0].tolist()
    assert sorted(ids) == [0, 7]
    weights = dict(zip(ids, routing.topk_weights_NK[0].tolist()))
    # Unbiased: s0 = sigmoid(2) = 0.880797, s7 = sigmoid(-2) = 0.119203; normalised, times 2.5.
    assert weights[0] == pytest.approx(2.5 * 0.880797 / (0.880797 + 0.119203), abs=1e-5)
    assert weights[7] == pytest.approx(2.5 * 0.119203, abs=1e-5)
    assert sum(weights.values()) == pytest.approx(2.5, abs=1e-6)


def test_routing_matches_megatron_sigmoid_topk_with_bias_and_scaling():
    router = _router(routed_scaling_factor=2.827).eval()
    router.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.4, E))
    x_BTD = torch.randn(4, 13, D, generator=torch.Generator().manual_seed(1))
    routing = router(x_BTD)

    logits_NE = x_BTD.reshape(-1, D) @ router.weight.detach().T
    probs_NE, map_NE = topk_routing_with_score_function(
        logits_NE, K, score_function="sigmoid", expert_bias=router.e_score_correction_bias, scaling_factor=2.827
    )
    ours_map = torch.zeros(52, E, dtype=torch.bool).scatter_(1, routing.topk_ids_NK, True)
    assert torch.equal(ours_map, map_NE)
    ours_probs = torch.zeros(52, E).scatter_(1, routing.topk_ids_NK, routing.topk_weights_NK.detach())
    torch.testing.assert_close(ours_probs, probs_NE, atol=1e-6, rtol=0)
    # The bias changed some choices, so the test compares the biased path, not plain top-k.
    unbiased = torch.topk(logits_NE, K).indices.sort().values
    assert (unbiased != routing.topk_ids_NK.sort().values).any(dim=1).sum() >= 10


def test_sequence_balance_loss_and_gradient_match_megatron(megatron_one_process):
    B, T, coef = 3, 11, 0.01
    router = _router(seq_aux_loss_coef=coef).train()
    x_BTD = torch.randn(B, T, D, generator=torch.Generator().manual_seed(2))
    # Skew sequence 0 toward expert 3 so the per-sequence loss differs from a batch-wide one.
    x_BTD[0] += 2.0 * router.weight.detach()[3] / router.weight.detach()[3].norm()
    ours = router(x_BTD).aux_loss
    ours.backward()
    ours_grad = router.weight.grad.clone()

    # Megatron's layout is [T, B, E] (sequence first). _apply_seq_aux_loss views the T*B tokens as
    # [T, B*E], i.e. sequence b's expert e becomes column b*E + e, and divides the sum by B.
    weight = router.weight.detach().clone().requires_grad_(True)
    logits_TBE = (x_BTD @ weight.T).transpose(0, 1)
    map_NE, scores_NE = compute_routing_scores_for_aux_loss(logits_TBE.reshape(-1, E), K, "sigmoid")
    scores_TX, map_TX = scores_NE.reshape(T, -1), map_NE.reshape(T, -1)
    tokens_per_X, _, total_tokens = get_tokens_per_expert_and_token_count(
        map_TX, parallel_state.get_tensor_and_context_parallel_group(), topk=K * B
    )
    theirs = switch_load_balancing_loss_func(scores_TX, tokens_per_X, total_tokens, K, E, coef) / B
    theirs.backward()

    assert total_tokens == T
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    torch.testing.assert_close(ours_grad, weight.grad, atol=1e-9, rtol=1e-5)
    # A batch-wide (not per-sequence) loss would differ: the test can tell the two apart.
    batch_wide = switch_load_balancing_loss_func(scores_NE, map_NE.sum(0), B * T, K, E, coef)
    assert abs(batch_wide.item() - theirs.item()) > 1e-2 * theirs.item()


def test_bias_update_matches_megatron(megatron_one_process):
    router = _router(bias_update_speed=0.003).train()
    router.e_score_correction_bias.copy_(torch.linspace(-0.02, 0.02, E))
    x_BTD = torch.randn(2, 16, D, generator=torch.Generator().manual_seed(3))
    for _ in range(3):  # counts of several micro-batches add up before one update
        router(x_BTD)
    load_E = router.tokens_per_expert_E.clone()
    assert load_E.sum() == 3 * 32 * K
    expected = get_updated_expert_bias(load_E.clone(), router.e_score_correction_bias.clone(), 0.003)
    router.update_bias()
    torch.testing.assert_close(router.e_score_correction_bias, expected, atol=0, rtol=0)
    assert router.tokens_per_expert_E.sum() == 0


def test_bias_update_with_a_load_equal_to_the_mean_leaves_it(megatron_one_process):
    router = _router(bias_update_speed=0.5)
    load_E = torch.tensor([4.0, 2.0, 2.0, 0.0, 2.0, 2.0, 1.0, 3.0])  # mean 2
    router.tokens_per_expert_E.copy_(load_E)
    expected = get_updated_expert_bias(load_E.clone(), torch.zeros(E), 0.5)
    router.update_bias()
    assert router.e_score_correction_bias.tolist() == expected.tolist() == [-0.5, 0, 0, 0.5, 0, 0, 0.5, -0.5]


def test_bias_updates_move_a_skewed_batch_toward_balance():
    router = _router(bias_update_speed=0.01).train()
    # Logits of std ~1: sigmoid scores spread over (0, 1) without saturating, so biases of ~0.1 matter.
    torch.nn.init.normal_(router.weight, std=0.25, generator=torch.Generator().manual_seed(0))
    w = router.weight.detach()
    # A fixed batch most of whose tokens lean toward experts 0 and 1.
    x_BTD = torch.randn(4, 64, D, generator=torch.Generator().manual_seed(4))
    x_BTD += 2.0 * (w[0] / w[0].norm() + w[1] / w[1].norm())
    ratios = []
    with torch.no_grad():
        for _ in range(80):
            router(x_BTD)
            ratios.append(router.load_stats()["max_over_mean"])
            router.update_bias()
    # Max/mean load of 256 tokens x 2 choices over 8 experts (balanced: 1.0, worst: 4.0). The sign
    # update moves each bias by a fixed step, so on a fixed batch it ends in a small oscillation.
    assert ratios[0] == pytest.approx(3.03, abs=0.01)
    assert max(ratios[-10:]) < 1.3, ratios[-10:]
    bias = router.e_score_correction_bias
    assert bias[0] < -0.2 and bias[1] < -0.2, bias  # the overloaded experts were pushed down
    steps = bias / 0.01  # ... by a whole number of steps of 0.01 each
    torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)
