"""bf16 weight copies made once per optimizer step (launch.train.accumulate, moe.moe.weight_casts_once):
the same gradients as casting at every micro-batch, and a cast count that no longer grows with them."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import launch.train
from launch.parallel.engine import LocalStepper
from moe.config import preset
from moe.model import Transformer
from moe.moe import autocast_operands, weight_casts_once


class CastCounter(TorchDispatchMode):
    """Counts aten._to_copy calls whose input is one of `weights` (by storage)."""

    def __init__(self, weights):
        super().__init__()
        self.ptrs = {w.untyped_storage().data_ptr() for w in weights}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].untyped_storage().data_ptr() in self.ptrs:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _bf16_cpu_autocast(device, info=None):
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _steps(model, micro_batches, casts_once: bool):
    stepper = LocalStepper(model, torch.optim.SGD(model.parameters(), lr=0.0), grad_accum=len(micro_batches),
                           grad_clip=0.0)
    losses = launch.train.accumulate(stepper, iter(micro_batches), len(micro_batches), torch.device("cpu"), None,
                                     casts_once=casts_once)
    return losses, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.fixture
def bf16_trainer(monkeypatch):
    """launch.train's autocast made bf16 on CPU, as it is on a GPU."""
    monkeypatch.setattr(launch.train, "autocast", _bf16_cpu_autocast)


def test_one_cast_per_step_and_the_same_gradients(bf16_trainer):
    torch.manual_seed(0)
    base = Transformer(preset("tiny")).train()
    g = torch.Generator().manual_seed(1)
    micro_batches = [tuple(torch.randint(0, base.cfg.vocab_size, (2, 2, 16), generator=g)) for _ in range(3)]
    weights = [p for name, p in base.named_parameters() if p.ndim >= 2 and "embed" not in name]
    counts, results = {}, {}
    for casts_once in (False, True):
        model = copy.deepcopy(base)
        counter = CastCounter([p for name, p in model.named_parameters() if p.ndim >= 2 and "embed" not in name])
        with counter:
            results[casts_once] = _steps(model, micro_batches, casts_once)
        counts[casts_once] = counter.count
    # Per micro-batch, every matrix is cast once; per step, once in all.
    assert counts[False] == 3 * len(weights) and counts[True] == len(weights), (counts, len(weights))
    (loss_a, grads_a), (loss_b, grads_b) = results[False], results[True]
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)  # the very same bf16 copies: bit-identical
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=0, msg=name)
        assert grads_b[name].dtype == torch.float32


def test_an_updated_weight_is_cast_again():
    w = torch.nn.Parameter(torch.randn(4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16), weight_casts_once():
        first = autocast_operands(w)[0]
        assert autocast_operands(w)[0] is first
        with torch.no_grad():
            w.mul_(2)  # bumps the version
        again = autocast_operands(w)[0]
    assert again is not first and torch.equal(again, (2 * first.float()).to(torch.bfloat16))


def test_a_cast_made_without_grad_is_not_shared():
    w = torch.nn.Parameter(torch.randn(4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16), weight_casts_once():
        with torch.no_grad():
            autocast_operands(w)
        used = autocast_operands(w)[0]
        used.float().sum().backward()
    assert w.grad is not None and torch.equal(w.grad, torch.ones(4, 4))


def test_outside_the_region_nothing_is_kept():
    w = torch.nn.Parameter(torch.randn(4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with weight_casts_once():
            inside = autocast_operands(w)[0]
        assert autocast_operands(w)[0] is not inside
