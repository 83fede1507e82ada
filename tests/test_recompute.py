"""Activation recomputation (launch/parallel/recompute.py): each mode against "none" on the same model
and tokens (gradients, losses and everything the forward records), the bytes each mode keeps for the
backward, full recompute under expert parallelism on 2 gloo processes, and the trainer's --recompute flag."""

import copy
import json
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launch.config.training import TrainConfig, parse_args
from launch.parallel.recompute import SavedTensorMeter, apply_recompute
from launch.train import run
from moe.config import ConfigError, preset
from moe.generate import generate
from moe.model import Transformer
from moe.moe import MoE

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from harness import tiny_train_flags, torchrun  # noqa: E402


def _model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset("tiny", **overrides))


def _recomputed(base: Transformer, mode: str) -> Transformer:
    model = copy.deepcopy(base)
    apply_recompute(model, mode)
    return model


def _batch(cfg, B: int = 2, T: int = 19, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, cfg.vocab_size, (B, T), generator=g),
            torch.randint(0, cfg.vocab_size, (B, T), generator=g))


def _packed(B: int, T: int) -> torch.Tensor:
    """Row 0: three documents of uneven length (one of a single token); the other rows one document."""
    doc_BT = torch.zeros(B, T, dtype=torch.int64)
    doc_BT[0, 7:] = 1
    doc_BT[0, 8:] = 2
    return doc_BT


def _step(model: Transformer, ids, targets, **kwargs) -> dict:
    """One forward and backward with QK-clip's recording on, then the bias update; what each side
    effect left behind."""
    model.zero_grad(set_to_none=True)
    for attention in model.attentions():
        attention.record_max_logits = True
        attention.reset_max_logits()
    out = model(ids, targets, return_routing=True, **kwargs)
    max_logits = torch.stack([a.max_logits_H.clone() for a in model.attentions()])
    for attention in model.attentions():
        attention.reset_max_logits()  # whatever is recorded from here on is a recompute's doing
    aux_losses = [block.mlp.aux_loss for block in model.layers if isinstance(block.mlp, MoE)]
    out.loss.backward()
    counts = torch.stack([r.tokens_per_expert_E.clone() for r in model.routers()])
    model.update_router_biases()
    return {
        "loss": out.loss.detach(), "aux_loss": out.aux_loss.detach(), "routing": out.routing,
        "max_logits": max_logits,
        # The recompute's balance losses must not replace the forward's on the modules (nor keep its graph).
        "aux_loss_kept": all(block.mlp.aux_loss is a for block, a in
                             zip([b for b in model.layers if isinstance(b.mlp, MoE)], aux_losses)),
        "max_logits_after_backward": torch.stack([a.max_logits_H.clone() for a in model.attentions()]),
        "counts": counts, "biases": torch.stack([r.e_score_correction_bias.clone() for r in model.routers()]),
        "grads": {name: p.grad.clone() for name, p in model.named_parameters()},
    }


def _assert_same(got: dict, want: dict) -> None:
    assert torch.equal(got["loss"], want["loss"]) and torch.equal(got["aux_loss"], want["aux_loss"])
    assert want["aux_loss"] > 0  # the balance loss is on, so its gradient path is exercised
    assert torch.equal(got["routing"], want["routing"])
    assert torch.equal(got["max_logits"], want["max_logits"]) and torch.isfinite(want["max_logits"]).all()
    assert torch.isneginf(got["max_logits_after_backward"]).all()  # the recompute recorded no logits
    assert torch.equal(got["counts"], want["counts"])  # ... and counted no load
    assert got["aux_loss_kept"] and want["aux_loss_kept"]
    assert torch.equal(got["biases"], want["biases"])
    assert got["grads"].keys() == want["grads"].keys()
    for name, grad in want["grads"].items():
        assert grad.abs().max() > 0, name  # a parameter without gradient would compare nothing
        assert (got["grads"][name] - grad).abs().max() <= 1e-6 * grad.abs().max(), name


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_mode_matches_none_over_two_steps(mode, packed):
    base = _model()
    ids, targets = _batch(base.cfg)
    kwargs = {"document_ids_BT": _packed(*ids.shape)} if packed else {}
    reference, model = copy.deepcopy(base), _recomputed(base, mode)
    for _ in range(2):  # the second step routes with the biases the first one moved
        want, got = _step(reference, ids, targets, **kwargs), _step(model, ids, targets, **kwargs)
        _assert_same(got, want)
        N, K = ids.numel(), base.cfg.num_experts_per_tok
        assert (want["counts"].sum(dim=1) == N * K).all()  # once per token and expert: counted once


def test_full_replays_the_forward_routing_when_backward_runs_after_replay_ended():
    """RL replays sampled routing in the forward; its backward may run after the with-statement.
    The recompute must send tokens to the experts the forward used, not to the router's own top-k."""
    base = _model()
    ids, targets = _batch(base.cfg)
    L, (B, T), K, E = len(base.routers()), ids.shape, base.cfg.num_experts_per_tok, base.cfg.num_experts
    g = torch.Generator().manual_seed(5)
    forced_LBTK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(L * B * T)]).view(L, B, T, K)
    forced_LBTK[:, 1, ::3] = -1  # some tokens route freely
    grads = {}
    for mode in ("none", "full"):
        model = _recomputed(base, mode)
        with model.replay_routing(forced_LBTK):
            out = model(ids, targets, return_routing=True)
        out.loss.backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
        assert torch.equal(out.routing[:, 0], forced_LBTK[:, 0])
    for name, grad in grads["none"].items():
        assert torch.equal(grads["full"][name], grad), name


def test_full_with_tied_router_scores():
    """All scores equal (zero router weights): top-k breaks ties, and the recompute must break them the same way."""
    base = _model()
    with torch.no_grad():
        for router in base.routers():
            router.weight.zero_()
    ids, targets = _batch(base.cfg)
    _assert_same(_step(_recomputed(base, "full"), ids, targets), _step(copy.deepcopy(base), ids, targets))


def test_full_recompute_records_no_routing_even_inside_a_capture():
    """Routing capture hooks the routers only inside Transformer.forward; were one open during the
    backward (here it is, on purpose), the recompute must still not record a second time."""
    model = _recomputed(_model(), "full")
    ids, targets = _batch(model.cfg)
    with model._capture_routing(True) as record:
        out = model(ids, targets)
        out.loss.backward()
        assert len(record.ids_NK) == len(model.routers())


def test_selective_under_bf16_autocast_matches_none():
    """The refill must run under the forward's autocast, or kv_b_proj comes back in fp32."""
    base = _model()
    ids, targets = _batch(base.cfg)
    grads = {}
    for mode in ("none", "selective"):
        model = _recomputed(base, mode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, targets)
        out.loss.backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    for name, grad in grads["none"].items():
        assert torch.equal(grads["selective"][name], grad), name


def test_modes_replace_each_other_and_leave_inference_alone():
    base = _model()
    ids, targets = _batch(base.cfg)
    model = copy.deepcopy(base)
    prompts = ids[:, :5].tolist()
    for mode in ("selective", "full", "none"):
        apply_recompute(model, mode)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, base(ids).logits)
        assert generate(model, prompts, 4).tokens == generate(base, prompts, 4).tokens  # the cached path
    assert all("forward" not in m.__dict__ for m in model.modules())  # "none" took every wrapper off
    assert model.state_dict().keys() == base.state_dict().keys()


def test_selective_keeps_a_stage_output_that_other_code_uses():
    """The final norm applied by other code (a value head, say): the next lm_head call must not
    release that output, which its own backward still reads."""
    base = _model()
    ids, targets = _batch(base.cfg)
    grads = {}
    for mode in ("none", "selective"):
        model = _recomputed(base, mode)
        h_BTD = torch.randn(2, 5, base.cfg.hidden_size, generator=torch.Generator().manual_seed(3), requires_grad=True)
        side = model.norm(h_BTD).square().sum()
        loss = model(ids, targets).loss
        side.backward()  # before the model's backward, which would refill whatever lm_head released
        loss.backward()
        grads[mode] = h_BTD.grad
    assert torch.equal(grads["selective"], grads["none"])


def test_unknown_mode_names_the_setting_and_the_valid_values():
    with pytest.raises(ValueError, match=r"recompute = 'ful'.*'none', 'selective', 'full'"):
        apply_recompute(_model(), "ful")


def _saved_bytes(model: Transformer, ids, targets, **kwargs) -> int:
    with SavedTensorMeter(model) as meter:
        out = model(ids, targets, **kwargs)
    nbytes = meter.nbytes()
    out.loss.backward()  # the graph the meter measured is sound
    return nbytes


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_saved_activation_bytes_shrink_none_selective_full(packed):
    # Four blocks and a vocabulary small next to D * layers, so the head's logits do not dominate.
    base = _model(num_layers=4, vocab_size=128)
    ids, targets = _batch(base.cfg, B=2, T=64)
    kwargs = {"document_ids_BT": _packed(*ids.shape)} if packed else {}
    nbytes = {mode: _saved_bytes(_recomputed(base, mode), ids, targets, **kwargs) for mode in ("none", "selective", "full")}
    assert nbytes["full"] < nbytes["selective"] < nbytes["none"], nbytes
    cfg = base.cfg
    N, D = ids.numel(), cfg.hidden_size
    # Selective drops at least every norm's output and normalised x (2 x width) and SwiGLU's silu(gate)
    # and output (2 x F), in fp32. kv_b_proj's output is not counted: on CPU attention keeps a copy of v.
    per_block = [2 * (2 * D + cfg.q_lora_rank + cfg.kv_lora_rank)
                 + 2 * (cfg.moe_intermediate_size * cfg.num_shared_experts if cfg.is_moe_layer(i) else cfg.intermediate_size)
                 for i in range(cfg.num_layers)]
    dropped = (sum(per_block) + 2 * D) * N * 4
    assert nbytes["none"] - nbytes["selective"] >= dropped, (nbytes, dropped)
    # Full keeps per block at most its input [N, D] on top of what lies outside the blocks (the head's
    # logits and softmax over V, the final norm, embeddings), shared cos/sin and mask once.
    outside = 4 * N * base.cfg.vocab_size * 4 + 3 * N * D * 4 + (N * N if packed else 0)
    assert nbytes["full"] <= base.cfg.num_layers * N * D * 4 + outside, nbytes


# --------------------------------------------------------------------------- expert parallelism, 2 processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ep_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    from launch.parallel.expert_parallel import apply_expert_parallel

    base = _model(num_layers=3)
    results = {}
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own tokens: uneven splits
    ids = torch.randint(0, base.cfg.vocab_size, (2, 17), generator=g)
    targets = torch.randint(0, base.cfg.vocab_size, (2, 17), generator=g)
    for mode in ("none", "selective", "full"):
        model = copy.deepcopy(base)
        apply_expert_parallel(model, dist.group.WORLD, "ep_size_2")
        apply_recompute(model, mode)  # after EP, as the trainer must
        results[mode] = _step(model, ids, targets)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.distributed
def test_recompute_under_expert_parallelism_matches_none(tmp_path):
    pytest.importorskip("deepspeed")  # launch.parallel.expert_parallel marks its layers for DeepSpeed
    mp.spawn(_ep_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for mode in ("selective", "full"):
            _assert_same(results[mode], results["none"])


def _trainer_losses(tmp_path, name: str, *flags: str) -> list[float]:
    out = tmp_path / name
    run(parse_args([*tiny_train_flags(tmp_path, out), "--steps", "4", "--eval-every", "4", "--eval-batches", "1",
                    "--warmup-steps", "1", *flags]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["lm_loss"] for r in records if "lm_loss" in r] + [r["grad_norm"] for r in records if "grad_norm" in r]


def test_trainer_flag_trains_like_no_recomputation(tmp_path):
    """`--recompute` in launch.train: the same losses and gradient norms as without, step by step."""
    base = _trainer_losses(tmp_path, "none")
    for mode in ("selective", "full"):
        got = _trainer_losses(tmp_path, mode, "--recompute", mode)
        assert got == pytest.approx(base, rel=1e-6), (mode, got, base)


def test_trainer_refuses_an_unknown_recompute_mode():
    with pytest.raises(ConfigError, match=r"TrainConfig.recompute = 'some'; valid: none, selective, full"):
        TrainConfig(recompute="some")


@pytest.mark.distributed
def test_trainer_flag_under_deepspeed_and_expert_parallelism(tmp_path):
    """2 processes, ZeRO-2, EP 2: `--recompute full` trains like none; ZeRO-3 with recompute is refused."""
    losses = {}
    for mode in ("none", "full"):
        out = tmp_path / mode
        torchrun(["-m", "launch.train", *tiny_train_flags(tmp_path, out), "--steps", "3", "--eval-every", "3",
                  "--eval-batches", "1", "--zero-stage", "2", "--ep-size", "2", "--recompute", mode])
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [r["lm_loss"] for r in records if "lm_loss" in r]
    assert len(losses["full"]) == 3 and losses["full"] == pytest.approx(losses["none"], rel=1e-6), losses
    refused = torchrun(["-m", "launch.train", *tiny_train_flags(tmp_path, tmp_path / "z3"), "--steps", "1",
                        "--zero-stage", "3", "--recompute", "selective"], check=False)
    assert refused.returncode != 0 and "with zero_stage 3 is not supported" in refused.stderr + refused.stdout


@pytest.mark.distributed
def test_trainer_flag_under_pipeline_stages(tmp_path):
    """2 pipeline stages: selective and full recompute give none's losses and gradient norms."""
    got = {}
    for mode in ("none", "full", "selective"):
        out = tmp_path / mode
        torchrun(["-m", "launch.train", *tiny_train_flags(tmp_path, out), "--steps", "3", "--eval-every", "3",
                  "--eval-batches", "1", "--grad-accum", "2", "--pp-size", "2", "--recompute", mode])
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        got[mode] = [r[k] for r in records for k in ("lm_loss", "grad_norm") if k in r]
    assert len(got["none"]) == 6
    for mode in ("full", "selective"):
        assert got[mode] == pytest.approx(got["none"], rel=1e-6), (mode, got)
