"""Rollouts (posttrain/rl/rollout.py): partial rollouts continue exactly, loops and budgets end samples,
and the training rows (posttrain/rl/batch.py's Rows) line up with what was sampled.

References: one uninterrupted generate call with the same seeds (for continued rollouts), and the
model's own teacher-forced forward with routing capture (for the recorded log-probs and experts).
"""

import torch

from moe.config import preset
from moe.model import Transformer
from posttrain.rl.rollout import Group, GrowSettings, Sample, _extend, grow, new_group
from posttrain.rl.batch import Rows, token_logprobs

PROMPTS = [[5, 17, 300, 2, 9], [3, 1, 4], [511, 0, 77, 77, 8, 250, 13]]


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", init_std=0.1, first_k_dense=0, num_layers=2, num_shared_experts=0)).eval()


def _settings(segment: int, budget: int = 18, **kw) -> GrowSettings:
    base = dict(budget=budget, segment=segment, temperature=1.0, top_p=None, stop_tokens=(), loop_period=0,
                loop_repeats=4, record_routing=True, batch_size=2)
    return GrowSettings(**{**base, **kw})


def _groups() -> list[Group]:
    return [new_group(i, p, 2, seed=100 + 10 * i) for i, p in enumerate(PROMPTS)]


def test_a_rollout_continued_over_iterations_equals_one_uninterrupted_rollout():
    model = _model()
    whole, parts = _groups(), _groups()
    grow(model, [s for g in whole for s in g.samples], _settings(segment=18))
    samples = [s for g in parts for s in g.samples]
    for _ in range(3):  # three iterations of 7, 7 and 4 tokens
        assert all(s.finish is None for s in samples)
        grow(model, samples, _settings(segment=7))
    for a, b in zip([s for g in whole for s in g.samples], samples):
        assert a.tokens == b.tokens and len(a.tokens) == 18
        assert a.finish == b.finish == "length" and (a.segments, b.segments) == (1, 3)
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
        assert torch.equal(a.routing, b.routing)
    # Two samples of one prompt draw differently (seed + j).
    assert whole[0].samples[0].tokens != whole[0].samples[1].tokens


def test_rows_hold_the_sampled_tokens_logprobs_and_experts():
    model = _model()
    groups = _groups()
    grow(model, [s for g in groups for s in g.samples], _settings(segment=6, budget=12))  # unequal lengths next
    grow(model, [groups[1].samples[0]], _settings(segment=6, budget=12))
    rows = Rows(groups, "cpu")
    with torch.no_grad():
        logp_ST = token_logprobs(model, rows, replay=False)
    samples = [s for g in groups for s in g.samples]
    assert rows.groups_S.tolist() == [0, 0, 1, 1, 2, 2]
    assert rows.inputs_1N.shape[1] == sum(len(s.prompt) + len(s.tokens) - 1 for s in samples)  # no padding
    for i, s in enumerate(samples):
        n = len(s.tokens)
        assert rows.mask_ST[i].sum() == n
        assert rows.targets_1N[0, rows.index_ST[i, :n]].tolist() == s.tokens
        # Packed, each sample's log-probs are those it gets alone, and those it was sampled with.
        assert torch.allclose(logp_ST[i, :n], torch.tensor(s.logprobs), atol=1e-5)
        ids = torch.tensor([s.prompt + s.tokens[:-1]])
        with torch.no_grad():
            expected = model(ids, return_routing=True).routing[:, 0]
        mine = rows.documents_1N[0] == i
        assert torch.equal(rows.routing_L1NK[:, 0, mine], expected)


def test_stop_tokens_loops_and_the_budget_end_a_sample():
    settings = _settings(segment=10, budget=20, loop_period=3, loop_repeats=4, record_routing=False)
    s = Sample(0, 1, [7, 7])
    _extend(s, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [0.0] * 10, None, "length", settings)
    assert s.finish is None and len(s.tokens) == 10  # room left: continues next iteration
    _extend(s, [9, 8, 9, 8, 9, 8, 9, 8, 1, 1], [0.0] * 10, None, "length", settings)
    assert s.finish == "repeat" and s.tokens[10:] == [9, 8, 9, 8, 9, 8, 9, 8]  # cut where the 4th repeat ends
    t = Sample(0, 1, [7])
    _extend(t, [4, 5, 6], [0.0] * 3, None, "stop", settings)
    assert t.finish == "stop"
    u = Sample(0, 1, [7])
    _extend(u, list(range(20)), [0.0] * 20, None, "length", settings)
    assert u.finish == "length"


def test_group_state_round_trips():
    model = _model()
    groups = _groups()
    grow(model, [s for g in groups for s in g.samples], _settings(segment=5))
    back = [Group.from_state(g.state()) for g in groups]
    for a, b in zip(groups, back):
        assert a.problem == b.problem
        for x, y in zip(a.samples, b.samples):
            assert (x.tokens, x.logprobs, x.seed, x.finish, x.segments) == (y.tokens, y.logprobs, y.seed, y.finish, y.segments)
            assert torch.equal(x.routing, y.routing)
