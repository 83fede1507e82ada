"""Transformer.forward refuses a bad batch before it runs: empty, wrong rank, targets of another shape,
dtype or outside the vocabulary; -100 (the ignore index) stays a legal target."""

import re

import pytest
import torch
import torch.nn.functional as F

from moe.config import preset
from moe.model import IGNORE_INDEX, Transformer


@pytest.fixture(scope="module")
def model():
    return Transformer(preset("tiny"))  # vocab_size = 512


@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0, 0), (6,)])
def test_an_empty_or_flat_batch_names_its_shape(model, shape):
    ids = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match=re.escape(f"input_ids has shape {shape}; need [B, T] with B >= 1 and T >= 1")):
        model(ids)
    with pytest.raises(ValueError, match=r"input_ids has shape"):
        model(ids, ids.clone())


@pytest.mark.parametrize(
    "bad, reported",
    [
        (512, 512),  # = vocab_size
        (9_999, 9_999),
        (-1, -1),
        (-101, -101),  # below the ignore index
    ],
)
def test_targets_outside_the_vocabulary_are_refused(model, bad, reported):
    ids = torch.zeros(2, 5, dtype=torch.long)
    targets = ids.clone()
    targets[1, 3] = bad
    targets[0, 0] = IGNORE_INDEX  # must not hide the bad one: -100 < -1 would win the min otherwise
    with pytest.raises(ValueError, match=rf"target id {reported} is outside the vocabulary \[0, 512\) .*-100 marks a position"):
        model(ids, targets)


def test_the_ignore_index_is_left_out_of_the_loss(model):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (2, 6), generator=gen)
    targets = torch.randint(0, 512, (2, 6), generator=gen)
    targets[0, :3] = IGNORE_INDEX
    out = model(ids, targets)
    kept = targets != IGNORE_INDEX
    expected = F.cross_entropy(out.logits.float()[kept], targets[kept])
    torch.testing.assert_close(out.lm_loss, expected)


@pytest.mark.parametrize(
    "targets, message",
    [
        (torch.zeros(2, 4, dtype=torch.long), r"targets have shape \(2, 4\) but input_ids \(2, 5\); need the same \[B, T\]"),
        (torch.zeros(10, dtype=torch.long), r"targets have shape \(10,\) but input_ids \(2, 5\)"),
        (torch.zeros(2, 5, dtype=torch.int32), r"targets have dtype torch.int32; need torch.int64"),
        (torch.zeros(2, 5), r"targets have dtype torch.float32; need torch.int64"),
    ],
)
def test_targets_of_another_shape_or_dtype_are_refused(model, targets, message):
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(2, 5, dtype=torch.long), targets)


def test_checks_skip_meta_tensors():
    # Dense layers only: the MoE's bincount has no meta kernel. A meta tensor has no values to range-check.
    with torch.device("meta"):
        model = Transformer(preset("tiny", first_k_dense=2))
        ids = torch.full((2, 5), 10_000, dtype=torch.long)
        out = model(ids, ids)
    assert out.logits.shape == (2, 5, 512) and out.loss.device.type == "meta"
