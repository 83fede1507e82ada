"""The chunked linear cross-entropy (moe/loss.py) against torch's F.cross_entropy on materialised
logits: the loss, both gradients, ignored targets, every chunk size, autocast, and inside the model."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from launch.config.training import parse_args
from launch.parallel.recompute import SavedTensorMeter
from launch.train import run
from moe.config import preset
from moe.loss import IGNORE_INDEX, linear_cross_entropy
from moe.model import Transformer

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from harness import tiny_train_flags  # noqa: E402


def _problem(N=37, D=24, V=101, ignored=(3, 4, 30), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=dtype).requires_grad_()
    w = (0.3 * torch.randn(V, D, generator=g, dtype=dtype)).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[list(ignored)] = IGNORE_INDEX
    return x, w, t


def _torch_loss_and_grads(x, w, t):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = F.cross_entropy(F.linear(x, w).float(), t, ignore_index=IGNORE_INDEX)
    loss.backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 1000])
def test_matches_torch_cross_entropy_on_whole_logits(chunk):
    x, w, t = _problem()
    want, want_dx, want_dw = _torch_loss_and_grads(x, w, t)
    loss = linear_cross_entropy(x, w, t, chunk)
    (2.5 * loss).backward()  # an upstream gradient other than 1 reaches both inputs scaled
    torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, 2.5 * want_dx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, 2.5 * want_dw, rtol=1e-5, atol=1e-7)


def test_every_target_ignored_is_nan_like_torch():
    x, w, t = _problem(N=6, ignored=range(6))
    assert torch.isnan(linear_cross_entropy(x, w, t, 4)) and torch.isnan(linear_cross_entropy(x, w, t, 0))


def test_no_gradient_work_without_grad_and_only_the_wanted_gradient():
    x, w, t = _problem()
    want, want_dx, _ = _torch_loss_and_grads(x, w, t)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, t, 8), want)
    linear_cross_entropy(x, w.detach(), t, 8).backward()
    torch.testing.assert_close(x.grad, want_dx, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_runs_the_head_in_bf16_like_the_plain_path():
    x, w, t = _problem(V=301)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = linear_cross_entropy(x, w, t, 0)
        chunked = linear_cross_entropy(x, w, t, 7)
    # Same bf16 logits, fp32 log-sum-exp in both: equal up to the sum's order.
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    chunked.backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32  # through the casts to the masters


def test_bad_chunk_size_names_the_argument():
    x, w, t = _problem()
    with pytest.raises(ValueError, match="chunk_tokens = -1"):
        linear_cross_entropy(x, w, t, -1)


@pytest.mark.parametrize("tied", [False, True])
def test_model_loss_and_gradients_match_the_whole_logits(tied):
    torch.manual_seed(0)
    base = Transformer(preset("tiny", tie_embeddings=tied)).train()
    chunked = copy.deepcopy(base)
    chunked.loss_chunk_tokens = 13
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, base.cfg.vocab_size, (3, 21), generator=g)
    targets = torch.randint(0, base.cfg.vocab_size, (3, 21), generator=g)
    targets[0, :5] = IGNORE_INDEX
    want, got = base(inputs, targets), chunked(inputs, targets)
    assert got.logits is None and want.logits is not None
    torch.testing.assert_close(got.lm_loss, want.lm_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.aux_loss, want.aux_loss)
    want.loss.backward()
    got.loss.backward()
    for (name, p), q in zip(base.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_chunked_loss_keeps_fewer_bytes_for_the_backward():
    torch.manual_seed(0)
    model = Transformer(preset("tiny")).train()
    inputs = torch.randint(0, model.cfg.vocab_size, (4, 64))
    kept = {}
    for chunk in (0, 32):
        model.loss_chunk_tokens = chunk
        with SavedTensorMeter(model) as meter:
            loss = model(inputs, inputs).loss
        kept[chunk] = meter.nbytes()
        loss.backward()
    # The plain path keeps the logits and their fp32 copy; the chunked one gradient buffers instead.
    assert kept[32] < kept[0], kept


def test_trainer_flag_trains_like_whole_logits(tmp_path):
    got = {}
    for chunk in ("0", "40"):
        out = tmp_path / f"chunk{chunk}"
        run(parse_args([*tiny_train_flags(tmp_path, out), "--steps", "3", "--eval-every", "3", "--eval-batches", "1",
                        "--warmup-steps", "1", "--loss-chunk-tokens", chunk]))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        got[chunk] = [r["lm_loss"] for r in records if "lm_loss" in r] + [r["val_loss"] for r in records if "val_loss" in r]
    assert got["40"] == pytest.approx(got["0"], rel=1e-5), got
