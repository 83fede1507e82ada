"""Packed sequences (SFT): documents in one row must not see each other, and each must be computed
as if it were alone (block-diagonal causal attention, RoPE restarting at every document).

Shape legend: B batch, T sequence, D hidden, V vocabulary, H heads.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from moe.config import preset
from moe.layers import rope_cos_sin
from moe.model import Transformer

# Document lengths of the packed row A|B|C; odd, unequal, and one of length 1 in the second row.
LENGTHS = (7, 11, 5)


def _model(**overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(preset("tiny", **overrides))
    # Larger weights than init_std, so that a leaked cross-document term would not hide in rounding.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(std=0.1)
    return model


def _packed(lengths, vocab_size: int, seed: int = 0):
    """Token ids [1, T] of random documents back to back, and their document ids [1, T]."""
    gen = torch.Generator().manual_seed(seed)
    ids_T = torch.randint(0, vocab_size, (sum(lengths),), generator=gen)
    # Non-consecutive, non-zero ids: documents are defined by runs of equal ids, not by their values.
    doc_T = torch.cat([torch.full((n,), 10 * d + 3) for d, n in enumerate(lengths)])
    return ids_T[None], doc_T[None]


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_loss_on_one_document_has_zero_gradient_on_the_others(q_lora_rank):
    model = _model(q_lora_rank=q_lora_rank).train()
    ids_BT, doc_BT = _packed(LENGTHS, model.cfg.vocab_size)
    embedded = []
    handle = model.embed_tokens.register_forward_hook(lambda m, args, out: embedded.append(out) or out.retain_grad())
    try:
        logits_BTV = model(ids_BT, document_ids_BT=doc_BT).logits
    finally:
        handle.remove()
    a, b = LENGTHS[0], LENGTHS[0] + LENGTHS[1]
    targets_T = ids_BT[0, a + 1 : b + 1]  # B's next tokens (the last one is C's first: any target works)
    loss_B = torch.nn.functional.cross_entropy(logits_BTV[0, a:b], targets_T)
    loss_B.backward()
    grad_TD = embedded[0].grad[0]
    assert torch.count_nonzero(grad_TD[:a]) == 0  # A, before B: blocked by the document mask
    assert torch.count_nonzero(grad_TD[b:]) == 0  # C, after B: blocked by causality and the mask
    assert grad_TD[a:b].abs().amax(dim=-1).min() > 0  # every token of B does feed B's loss


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_each_packed_document_matches_that_document_alone(q_lora_rank):
    model = _model(q_lora_rank=q_lora_rank).eval()
    # Two rows with different document boundaries: positions and masks must be per row.
    row0, doc0 = _packed(LENGTHS, model.cfg.vocab_size, seed=1)
    row1, doc1 = _packed((1, 16, 6), model.cfg.vocab_size, seed=2)
    ids_BT, doc_BT = torch.cat([row0, row1]), torch.cat([doc0, doc1])
    with torch.no_grad():
        packed_BTV = model(ids_BT, document_ids_BT=doc_BT).logits
        for b, lengths in enumerate([LENGTHS, (1, 16, 6)]):
            start = 0
            for n in lengths:
                alone_TV = model(ids_BT[b : b + 1, start : start + n]).logits[0]
                torch.testing.assert_close(packed_BTV[b, start : start + n], alone_TV, atol=1e-5, rtol=1e-5)
                start += n
        # The same row unpacked differs: the comparison above is not vacuous.
        assert not torch.allclose(model(ids_BT).logits[0, LENGTHS[0]:], packed_BTV[0, LENGTHS[0]:], atol=1e-3)


def test_rope_positions_restart_at_every_document():
    # RoPE scores depend on position differences only, so within a block-diagonal mask a missing
    # restart would change logits by rounding alone (and bf16 angles at large positions); hence the
    # angles are checked directly against those of each document alone.
    model = _model().eval()
    lengths = [LENGTHS, (1, 16, 6)]
    rows = [_packed(n, model.cfg.vocab_size, seed=b) for b, n in enumerate(lengths)]
    ids_BT, doc_BT = (torch.cat(t) for t in zip(*rows))
    captured = []
    handle = model.attentions()[0].register_forward_pre_hook(lambda m, args: captured.append(args[1:3]))
    try:
        with torch.no_grad():
            model(ids_BT, document_ids_BT=doc_BT)
    finally:
        handle.remove()
    cos_B1TR, sin_B1TR = captured[0]
    R, theta = model.cfg.qk_rope_head_dim, model.cfg.rope_theta
    for b, row_lengths in enumerate(lengths):
        positions_T = torch.cat([torch.arange(n) for n in row_lengths])
        cos_TR, sin_TR = rope_cos_sin(positions_T, R, theta, torch.float32)
        assert torch.equal(cos_B1TR[b, 0], cos_TR) and torch.equal(sin_B1TR[b, 0], sin_TR)


def test_without_document_ids_the_forward_is_unchanged_bit_for_bit(monkeypatch):
    model = _model().train()
    ids_BT, _ = _packed(LENGTHS, model.cfg.vocab_size)
    ids_BT = torch.cat([ids_BT, ids_BT.flip(1)])
    targets_BT = ids_BT.roll(-1, dims=1)
    sdpa, sdpa_calls = F.scaled_dot_product_attention, []

    def spy(*args, **kwargs):
        sdpa_calls.append(kwargs)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    plain = model(ids_BT, targets_BT)
    # Unpacked batches keep SDPA's fused causal kernels: no mask tensor is built or passed.
    assert len(sdpa_calls) == model.cfg.num_layers
    assert all(c.get("is_causal") is True and c.get("attn_mask") is None for c in sdpa_calls)
    monkeypatch.undo()
    default = model(ids_BT, targets_BT, document_ids_BT=None)
    assert torch.equal(plain.logits, default.logits) and torch.equal(plain.loss, default.loss)
    # One document per row is the plain causal forward (other kernel path, so up to rounding).
    whole = model(ids_BT, targets_BT, document_ids_BT=torch.zeros_like(ids_BT))
    torch.testing.assert_close(whole.logits, plain.logits, atol=1e-5, rtol=1e-5)


def test_max_logits_record_only_pairs_inside_a_document():
    model = _model().train()
    attn = model.attentions()[0]
    attn.record_max_logits = True
    # A|B|A: the second A's queries meet the first A's keys at every position pair, including
    # s > t, which A alone never scores; so cross-document logits include larger ones for some head.
    # B is one token so that A's pairs dominate the row.
    a = 11
    ids_BT, doc_BT = _packed((a, 1), model.cfg.vocab_size)
    ids_BT = torch.cat([ids_BT, ids_BT[:, :a]], dim=1)
    doc_BT = torch.cat([doc_BT, torch.full((1, a), 99)], dim=1)
    captured = []
    handle = attn.register_forward_pre_hook(lambda m, args: captured.append(args))
    try:
        with torch.no_grad():
            model(ids_BT, document_ids_BT=doc_BT)
    finally:
        handle.remove()
    x_BTD, cos, sin, visible_B1TT = captured[0]
    q_BHTQ, k_BHTQ, _ = attn.qkv(x_BTD, cos, sin)
    scores_BHTT = (q_BHTQ.double() @ k_BHTQ.double().transpose(-1, -2)) / math.sqrt(q_BHTQ.shape[-1])
    inside_H = scores_BHTT.masked_fill(~visible_B1TT, -math.inf).amax(dim=(0, 2, 3))
    causal_TT = torch.ones(visible_B1TT.shape[-2:], dtype=torch.bool).tril()
    across_H = scores_BHTT.masked_fill(~causal_TT, -math.inf).amax(dim=(0, 2, 3))
    torch.testing.assert_close(attn.max_logits_H.double(), inside_H, atol=1e-5, rtol=1e-5)
    assert (across_H > inside_H + 1e-3).any()  # some head's largest causal logit crosses documents
    # The re-measure (QK-clip's pre-hook calls max_logits with forward's positional args) agrees.
    torch.testing.assert_close(attn.max_logits(*captured[0]).double(), inside_H, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("as_keyword", [True, False])
def test_qk_clip_remeasure_runs_the_packed_batch_with_its_documents(as_keyword):
    """With lr 0 the re-measure re-runs the step's batch on unchanged weights, so it must find exactly
    the logits the training forward recorded; re-run without the document ids it would also score
    the cross-document pairs, which are larger for some head of this A|B|A row."""
    import optim

    model = _model().train()
    opt = optim.build("muonclip", model, lr=0.0, weight_decay=0.0, qk_clip_tau=1e9)
    a = 11
    ids_BT, doc_BT = _packed((a, 1), model.cfg.vocab_size)
    ids_BT = torch.cat([ids_BT, ids_BT[:, :a]], dim=1)
    doc_BT = torch.cat([doc_BT, torch.full((1, a), 99)], dim=1)
    targets_BT = torch.roll(ids_BT, -1, dims=1)
    if as_keyword:
        out = model(ids_BT, targets_BT, document_ids_BT=doc_BT)
    else:
        out = model(ids_BT, targets_BT, False, doc_BT)
    recorded_LH = torch.stack([attn.max_logits_H.clone() for attn in model.attentions()])
    out.loss.backward()
    opt.step()
    torch.testing.assert_close(opt.last_max_logits_LH, recorded_LH.float(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the same weights without document ids: some head sees a larger logit
        for attn in model.attentions():
            attn.reset_max_logits()
        model(ids_BT)
    across_LH = torch.stack([attn.max_logits_H for attn in model.attentions()])
    assert (across_LH > recorded_LH + 1e-3).any()


@pytest.mark.parametrize("document_ids, message", [
    (torch.zeros(1, 22, dtype=torch.int64), r"shape \(1, 22\) but input_ids \(1, 23\)"),
    (torch.zeros(23, dtype=torch.int64), r"shape \(23,\) but input_ids \(1, 23\)"),
    (torch.zeros(1, 23), r"dtype torch.float32; need an integer dtype"),
    (torch.zeros(1, 23, dtype=torch.bool), r"dtype torch.bool; need an integer dtype"),
    (torch.tensor([[0] * 7 + [1] * 11 + [0] * 5]), r"row 0 .* reuses an id after another document"),
])
def test_bad_document_ids_are_refused(document_ids, message):
    model = _model()
    ids_BT, _ = _packed(LENGTHS, model.cfg.vocab_size)
    with pytest.raises(ValueError, match=message):
        model(ids_BT, document_ids_BT=document_ids)


def test_a_packed_row_may_exceed_max_seq_len_but_not_one_of_its_documents():
    torch.manual_seed(0)
    model = Transformer(preset("tiny", max_seq_len=16)).eval()
    ids = torch.randint(0, 512, (1, 40))
    docs = torch.arange(40).div(10, rounding_mode="floor")[None]  # 4 documents of 10 tokens
    with torch.no_grad():
        packed = model(ids, document_ids_BT=docs).logits
        alone = model(ids[:, 10:20]).logits
    assert torch.allclose(packed[:, 10:20], alone, atol=1e-5)
    with pytest.raises(ValueError, match="sequence length 40 exceeds"):
        model(ids)
    with pytest.raises(ValueError, match="packed document of 20 tokens"):
        model(ids, document_ids_BT=torch.arange(40).div(20, rounding_mode="floor")[None])
