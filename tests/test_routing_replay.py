"""Routing replay (moe/router.py, Transformer.replay_routing): a forward uses the recorded experts.

The reference for "which experts a forward used" is the model's own routing capture
(return_routing), which reads the ids the routers hand to the experts.
"""

import pytest
import torch

from moe.config import preset
from moe.generate import generate
from moe.model import Transformer

CFG = dict(init_std=0.1, num_shared_experts=0, first_k_dense=0, num_layers=3)  # 3 MoE layers


def _model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset("tiny", **CFG))


def test_replay_makes_the_training_forward_use_the_recorded_experts():
    sampler, trainer = _model(0), _model(1)  # the same shapes, different weights: different routing
    prompts = [[5, 17, 300, 2], [3, 1, 4, 1, 5, 9]]
    gen = generate(sampler, prompts, 10, temperature=1.0, sequence_seeds=[1, 2], return_routing=True)
    for b, prompt in enumerate(prompts):
        ids = torch.tensor([prompt + gen.tokens[b][:-1]])
        recorded = gen.routing[b][:, None]  # [L, 1, T, K]
        free = trainer(ids, return_routing=True).routing
        assert not torch.equal(free, recorded)  # without replay the other weights route elsewhere
        with trainer.replay_routing(recorded):
            replayed = trainer(ids, return_routing=True).routing
        assert torch.equal(replayed, recorded)
        assert torch.equal(trainer(ids, return_routing=True).routing, free)  # the replay ends with the block


def test_unrecorded_tokens_route_freely_and_the_gradient_reaches_the_router():
    model = _model(0).train()
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        own = model(ids, return_routing=True).routing
        free_logits = model(ids).logits
    other = (own + 1) % model.cfg.num_experts  # other experts everywhere...
    other[:, :, :3] = -1  # ...but the first 3 tokens of each row are unrecorded
    with model.replay_routing(other):
        out = model(ids, ids, return_routing=True)
    assert torch.equal(out.routing[:, :, 3:], other[:, :, 3:])
    assert torch.equal(out.routing[:, :, :3], own[:, :, :3])
    # Causal: logits of the unrecorded prefix are unchanged; later ones move with the experts.
    assert torch.allclose(out.logits[:, :3], free_logits[:, :3], atol=1e-6)
    assert not torch.allclose(out.logits[:, 3:], free_logits[:, 3:], atol=1e-3)
    out.lm_loss.backward()
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in model.routers())
    with torch.no_grad(), model.replay_routing(own):  # replaying a model's own choice changes nothing
        assert torch.allclose(model(ids).logits, free_logits, atol=1e-6)


def test_bad_replays_are_refused_with_the_shape():
    model = _model(0)
    ids = torch.zeros(1, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"need \[3, B, T, 2\]"):
        with model.replay_routing(torch.zeros(2, 1, 4, 2, dtype=torch.int64)):
            pass
    with pytest.raises(ValueError, match="dtype"):
        with model.replay_routing(torch.zeros(3, 1, 4, 2)):
            pass
    with pytest.raises(ValueError, match="outside"):
        with model.replay_routing(torch.full((3, 1, 4, 2), 99, dtype=torch.int64)):
            pass
    with pytest.raises(ValueError, match="routes"):  # recorded for 5 tokens, the forward has 4
        with model.replay_routing(torch.zeros(3, 1, 5, 2, dtype=torch.int64)):
            model(ids)
    assert all(r.replay_ids_NK is None for r in model.routers())
