"""The TRM network and deep supervision (trm/model.py, trm/supervision.py, trm/losses.py).

References: the recursion written out by hand in the test (the paper's pseudocode, §4 Figure 3),
full backpropagation through every pass for contrast, and PyTorch's cross-entropy for softmax.
"""

import pytest
import torch
import torch.nn.functional as F

from moe.config import ConfigError
from trm.config import TRMConfig, preset
from trm.losses import log_stablemax, token_losses
from trm.model import TRM
from trm.supervision import evaluate, new_carry, refill, supervision_step


def _model(mixer="attention", **kw) -> TRM:
    torch.manual_seed(0)
    cfg = TRMConfig(vocab_size=5, seq_len=6, hidden_size=16, num_heads=2, intermediate_size=32, mixer=mixer, T=3, n=2,
                    n_sup=4, **kw)
    return TRM(cfg)


def _grads(model) -> dict:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mixer", ["attention", "mlp"])
def test_the_gradient_flows_only_through_the_last_of_the_T_recursions(mixer):
    model = _model(mixer)
    tokens = torch.randint(0, 5, (3, 6))
    targets = torch.randint(0, 5, (3, 6))
    x = model.embed(tokens)
    y0, z0 = model.initial_state(3)

    _, _, logits, _ = model.supervise(x, y0, z0)
    F.cross_entropy(logits.transpose(1, 2), targets).backward()
    ours = _grads(model)
    model.zero_grad()

    def f(h, inj):  # the network by hand, the paper's pseudocode
        h = h + inj
        for layer in model.layers:
            h = layer(h)
        return h

    def latent_recursion(x, y, z):
        for _ in range(2):
            z = f(z, x + y)
        return f(y, z), z

    y, z = y0, z0
    with torch.no_grad():
        for _ in range(2):
            y, z = latent_recursion(x.detach(), y, z)
    y, z = latent_recursion(model.embed(tokens), y, z)
    F.cross_entropy(model.lm_head(y).transpose(1, 2), targets).backward()
    expected = _grads(model)
    assert ours.keys() == expected.keys()
    for k in ours:
        assert torch.allclose(ours[k], expected[k], atol=1e-6), k
    model.zero_grad()

    # Backpropagating through all T passes gives other gradients: the no-grad passes do matter.
    y, z = y0, z0
    x = model.embed(tokens)
    for _ in range(3):
        y, z = latent_recursion(x, y, z)
    F.cross_entropy(model.lm_head(y).transpose(1, 2), targets).backward()
    full = _grads(model)
    assert max((full[k] - ours[k]).abs().max().item() for k in ours) > 1e-4


def test_the_carried_state_is_detached_between_supervision_steps():
    model = _model()
    tokens, targets = torch.randint(0, 5, (2, 6)), torch.randint(0, 5, (2, 6))
    x = model.embed(tokens)
    y, z, logits, _ = model.supervise(x, *model.initial_state(2))
    assert not y.requires_grad and not z.requires_grad and logits.requires_grad
    # Step 2's gradient is that of a step started from a fresh copy of the carried state: nothing of step 1.
    _, _, logits2, _ = model.supervise(model.embed(tokens), y, z)
    F.cross_entropy(logits2.transpose(1, 2), targets).backward()
    a = _grads(model)
    model.zero_grad()
    _, _, logits3, _ = model.supervise(model.embed(tokens), y.clone(), z.clone())
    F.cross_entropy(logits3.transpose(1, 2), targets).backward()
    b = _grads(model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_halted_slots_take_new_examples_with_a_fresh_state_and_the_others_carry_on():
    model = _model(halt_exploration=0.0)
    data_in, data_out = torch.randint(0, 5, (10, 6)), torch.randint(0, 5, (10, 6))
    position = [0]

    def draw(k):
        index = torch.arange(position[0], position[0] + k) % 10
        position[0] += k
        return index, data_in[index], data_out[index], torch.zeros(k, dtype=torch.int64)

    g = torch.Generator().manual_seed(0)
    carry = new_carry(model, 4, "cpu")
    assert refill(model, carry, draw, g) == 4 and carry.examples_B.tolist() == [0, 1, 2, 3]
    supervision_step(model, carry)
    assert carry.steps_B.tolist() == [1, 1, 1, 1] and not carry.halted_B.any()  # q starts at -5: nobody halts
    # Slots 1 and 3 halt (their heads say "right"); 0 and 2 go on with their state.
    carry.halted_B[:] = torch.tensor([False, True, False, True])
    kept_y = carry.y_BLD[[0, 2]].clone()
    assert refill(model, carry, draw, g) == 2
    assert carry.examples_B.tolist() == [0, 4, 2, 5] and carry.steps_B.tolist() == [1, 0, 1, 0]
    assert torch.equal(carry.inputs_BL[1], data_in[4]) and torch.equal(carry.targets_BL[3], data_out[5])
    y0, _ = model.initial_state(1)
    assert torch.equal(carry.y_BLD[1], y0[0]) and torch.equal(carry.y_BLD[[0, 2]], kept_y)
    # At n_sup every slot halts, whatever its head says.
    for _ in range(3):
        supervision_step(model, carry)
    assert carry.halted_B.tolist() == [True, False, True, False] and carry.steps_B.tolist() == [4, 3, 4, 3]
    # A head that says "right" halts a slot early in training, never in evaluation.
    with torch.no_grad():
        model.q_head.bias.fill_(10.0)
    refill(model, carry, draw, g)
    supervision_step(model, carry)
    assert carry.halted_B.all()
    refill(model, carry, draw, g)
    supervision_step(model, carry, training=False)
    assert not carry.halted_B.any()


def test_exploration_sets_a_minimum_number_of_steps():
    model = _model(halt_exploration=1.0)
    carry = new_carry(model, 64, "cpu")
    refill(model, carry, lambda k: (torch.arange(k), torch.zeros(k, 6, dtype=torch.int64),
                                    torch.zeros(k, 6, dtype=torch.int64), torch.zeros(k, dtype=torch.int64)),
           torch.Generator().manual_seed(1))
    assert carry.min_steps_B.min() >= 2 and carry.min_steps_B.max() <= 4 and len(set(carry.min_steps_B.tolist())) == 3


def test_evaluation_runs_every_step_and_reports_each():
    model = _model()
    inputs, targets = torch.randint(0, 5, (7, 6)), torch.randint(0, 5, (7, 6))
    report = evaluate(model, inputs, targets, batch_size=3)
    assert len(report["exact_by_step"]) == 4 and sum(report["halt_steps"]) == 7
    assert report["predictions"].shape == targets.shape
    # Teach the "model" the targets: every cell's argmax right at every step.
    report = evaluate(model, inputs, inputs, batch_size=3)
    assert 0.0 <= report["exact"] <= 1.0


def test_stablemax_and_softmax_losses():
    logits = torch.randn(2, 3, 5) * 4
    targets = torch.randint(0, 5, (2, 3))
    assert torch.allclose(token_losses(logits, targets, "softmax"),
                          F.cross_entropy(logits.transpose(1, 2), targets, reduction="none"))
    p = log_stablemax(logits).exp()
    assert torch.allclose(p.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    x = torch.tensor([[-1.0, 0.0, 2.0]])  # s = 1/2, 1, 3
    assert torch.allclose(log_stablemax(x).exp(), torch.tensor([[0.5, 1.0, 3.0]], dtype=torch.float64) / 4.5)
    assert (token_losses(logits, targets, "stablemax") >= 0).all()


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match="mixer = 'conv'"):
        TRMConfig(mixer="conv")
    with pytest.raises(ConfigError, match="T = 0"):
        TRMConfig(T=0)
    with pytest.raises(ConfigError, match="num_heads = 7"):
        TRMConfig(num_heads=7)
    with pytest.raises(ConfigError, match="puzzle_ids = 3 and puzzle_emb_len = 0"):
        TRMConfig(puzzle_ids=3)
    with pytest.raises(ConfigError, match="preset = 'huge'"):
        preset("huge")
    with pytest.raises(ConfigError, match="unknown TRMConfig field 'layers'"):
        preset("tiny-sudoku-mlp", layers=3)
    assert preset("trm-sudoku-mlp").mixer == "mlp" and preset("trm-arc-att").puzzle_emb_len == 16


def test_puzzle_embeddings_fill_the_prefix():
    model = _model(puzzle_ids=3, puzzle_emb_len=2)
    x = model.embed(torch.zeros(2, 6, dtype=torch.int64), torch.tensor([0, 2]))
    assert x.shape == (2, 8, 16) and x[:, :2].abs().sum() == 0  # zero-initialised
    _, _, logits, q = model.supervise(x, *model.initial_state(2))
    assert logits.shape == (2, 6, 5) and q.shape == (2,)
    with pytest.raises(ValueError, match="pass puzzle_ids_B"):
        model.embed(torch.zeros(2, 6, dtype=torch.int64))
