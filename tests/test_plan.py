"""The planner (launch/plan.py) against real models, optimizers, autograd and DeepSpeed on CPU.

What "measured" means here (a CPU process's peak RSS is mostly Python and torch themselves, so
tensor bytes are what is compared):
  - weights, gradients, optimizer state, buffers: the bytes of the tensors a real model and an
    optimizer built by optim.build hold after one forward, backward and step (`held_bytes`); 0-d
    optimizer tensors (torch.optim.AdamW's per-parameter `step`, 4 bytes each) are left out, the
    planner does not count them. Planned = measured, exactly.
  - activations: the bytes one training forward leaves saved for backward, by
    launch.parallel.recompute's SavedTensorMeter (distinct storages packed by saved-tensor hooks,
    parameters left out, released ones at 0), for each recompute mode. Within 10% by the issue;
    today within 0.5% (full: 1%), and the test holds that too.
  - peak: the tensor bytes alive when a real optimizer step starts plus the highest net allocation
    torch.profiler's memory events record during it (`measured_peak`; the first step creates the
    optimizer state). Within 10%.
The 2-rank DeepSpeed runs (tests/dist/plan_memory_check.py) measure the same per rank, each gloo
collective made to release its buffers on the main thread, where the profiler sees the frees. Within 10%.
"""

import gc
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import optim
from launch.parallel.engine import LocalStepper
from launch.parallel.recompute import SavedTensorMeter, apply_recompute
from launch.plan import DoesNotFit, Layout, PlanError, main, parse_count, plan, stage_memory
from launch.planning.params import stage_layers
from launch.planning.activations import in_flight
from moe.config import preset
from moe.model import Transformer
from moe.moe import RoutedExperts
from moe.params import count_parameters


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages under `tensors`."""
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Tensor bytes of weights, gradients, optimizer state (no 0-d counters) and buffers, as held now."""
    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
    return {"weights": storage_bytes(params), "gradients": storage_bytes(p.grad for p in params if p.grad is not None),
            "optimizer_state": storage_bytes(state), "buffers": storage_bytes(model.buffers())}


def saved_activation_bytes(model: torch.nn.Module, recompute: str, ids_BT: torch.Tensor, targets_BT: torch.Tensor) -> int:
    """Bytes one training forward leaves saved for backward (launch.parallel.recompute's meter)."""
    apply_recompute(model, recompute)
    with SavedTensorMeter(model) as meter:
        out = model(ids_BT, targets_BT)
    saved = meter.nbytes()
    del out
    return saved


def live_tensor_bytes() -> dict:
    """{storage address: bytes} of every CPU tensor the garbage collector can reach. Tensors without
    data (fake or meta tensors another test's torch.compile left behind) hold no memory: skipped."""
    gc.collect()
    live = {}
    for t in gc.get_objects():
        if torch.is_tensor(t) and t.device.type == "cpu":
            try:
                storage = t.untyped_storage()
                live[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):
                continue
    return live


def peak_allocated_during(fn) -> int:
    """The highest net bytes allocated (allocations minus frees in time order, as torch.profiler's
    memory events record them) while fn runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def measured_peak(name: str, optimizer_name: str, B: int, T: int, grad_accum: int, recompute: str = "none") -> int:
    """Peak tensor bytes of a real optimizer step (launch's LocalStepper, as launch.train runs one
    process): what is alive when the second step starts plus the profiler's highest net allocation
    during it. The first step creates the optimizer state."""
    before = live_tensor_bytes()
    torch.manual_seed(0)
    model = Transformer(preset(name))
    apply_recompute(model, recompute)
    stepper = LocalStepper(model, optim.build(optimizer_name, model, lr=1e-3), grad_accum, 1.0)
    ids = torch.randint(0, model.cfg.vocab_size, (2, grad_accum, B, T + 1))

    def step(i):
        for k in range(grad_accum):
            out = stepper.forward(ids[i, k, :, :-1], ids[i, k, :, 1:])  # held through backward, as launch.train does
            stepper.backward(out.loss)
            del out
        stepper.step()

    step(0)
    start = sum(v for k, v in live_tensor_bytes().items() if k not in before)
    return start + peak_allocated_during(lambda: step(1))


class LocalExperts(RoutedExperts):
    """E/ep experts, the slice launch/parallel/expert_parallel.py gives one rank; a token routed to
    expert e runs on local expert e mod E/ep, which is enough to give every slice a gradient."""

    def forward(self, x_ND, topk_ids_NK, topk_weights_NK):
        return super().forward(x_ND, topk_ids_NK % self.gate_up_proj.shape[0], topk_weights_NK)


def local_expert_model(cfg, ep: int) -> Transformer:
    """What one expert-parallel rank holds: every MoE layer's routed experts cut to E/ep, the rest whole."""
    model = Transformer(cfg)
    for module in model.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, RoutedExperts):
                setattr(module, name, LocalExperts(cfg.num_experts // ep, cfg.hidden_size, cfg.moe_intermediate_size))
    return model


def one_step(model, optimizer_name: str, B: int, T: int) -> dict:
    """Forward, backward and an optimizer step of `model` on random tokens; the bytes then held."""
    torch.manual_seed(0)
    opt = optim.build(optimizer_name, model, lr=1e-3)
    ids = torch.randint(0, model.cfg.vocab_size, (B, T + 1))
    model(ids[:, :-1], ids[:, 1:]).loss.backward()
    opt.step()
    return held_bytes(model, opt)


def plan_anyway(lay: Layout) -> dict:
    """The plan, also of a layout that does not fit (these tests read its terms, not its verdict)."""
    try:
        return plan(lay)
    except DoesNotFit as err:
        return err.plan


def planned(lay: Layout) -> dict:
    return plan_anyway(lay)["memory"]["terms"]


@pytest.mark.parametrize("name, optimizer_name, ep", [
    ("tiny", "adamw", 1), ("tiny", "muon", 1), ("tiny", "muonclip", 1),
    ("small", "adamw", 1), ("small", "muonclip", 1),
    ("tiny", "muon", 2),  # one expert-parallel rank: E/2 experts, everything else whole
    ("small", "adamw", 4),
])
def test_state_bytes_equal_what_a_real_model_and_optimizer_hold(name, optimizer_name, ep):
    cfg = preset(name)
    model = Transformer(cfg) if ep == 1 else local_expert_model(cfg, ep)
    held = one_step(model, optimizer_name, B=2, T=16)
    # ep ranks without ZeRO: the expert split alone (zero 0 keeps every replica's state whole).
    lay = Layout(model=name, gpus=ep, ep=ep, zero=0, optimizer=optimizer_name, precision="fp32", kernels="cpu",
                 seq_len=16, micro_batch=2)
    terms = planned(lay)
    for key in ("weights", "gradients", "optimizer_state", "buffers"):
        assert terms[key] == held[key], (key, terms[key], held[key])
    assert terms["fp32_masters"] == 0 and terms["fp32_grad_partition"] == 0  # fp32 weights, one process


def test_param_totals_match_count_parameters():
    for name in ("tiny", "small", "k2-2b", "kimi-k2"):
        with torch.device("meta"):
            counted = count_parameters(Transformer(preset(name)))
        assert plan_anyway(Layout(model=name, gpus=8, ep=8, seq_len=256))["params"] == counted


# Shapes: T = 1 (one token, one RoPE row), odd T and B (no power-of-two luck), and each preset's
# larger case, where the softmax's T x T scores dominate attention; every recompute mode.
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("name, B, T", [("tiny", 1, 1), ("tiny", 3, 17), ("tiny", 4, 64),
                                        ("small", 2, 33), ("small", 4, 128)])
def test_saved_activations_match_autograd(name, B, T, recompute):
    cfg = preset(name)
    torch.manual_seed(0)
    measured = saved_activation_bytes(Transformer(cfg), recompute, torch.randint(0, cfg.vocab_size, (B, T)),
                                      torch.randint(0, cfg.vocab_size, (B, T)))
    lay = Layout(model=name, precision="fp32", kernels="cpu", seq_len=T, micro_batch=B, recompute=recompute)
    predicted = planned(lay)["activations"]
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)
    # Agreement today is far tighter than the 10%: keep it so (measured: exact but for 32 bytes
    # per MoE layer that kimi_kernels/experts/cpu_ffn.py's group offsets add and the reference does not; full < 1%).
    assert abs(predicted - measured) <= (0.01 if recompute == "full" else 0.005) * measured, (predicted, measured)


@pytest.mark.parametrize("name, optimizer_name, B, T, recompute", [
    ("tiny", "muon", 4, 64, "none"), ("small", "muonclip", 4, 128, "none"), ("small", "adamw", 2, 256, "none"),
    ("small", "adamw", 2, 256, "full")])
def test_planned_peak_within_10_percent_of_a_real_step(name, optimizer_name, B, T, recompute):
    measured = measured_peak(name, optimizer_name, B, T, grad_accum=2, recompute=recompute)
    lay = Layout(model=name, precision="fp32", kernels="cpu", optimizer=optimizer_name, seq_len=T, micro_batch=B,
                 global_batch_tokens=2 * B * T, recompute=recompute)
    predicted = plan(lay)["memory"]["total"]
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)


def test_activations_grow_with_tokens_and_shrink_with_recompute():
    base = dict(model="k2-2b", gpus=8, ep=8, seq_len=4096, micro_batch=1)
    by_mode = {m: planned(Layout(**base, recompute=m))["activations"] for m in ("none", "selective", "full")}
    assert by_mode["none"] > by_mode["selective"] > by_mode["full"] > 0
    # full keeps one [T, D] bf16 input per block (+ RoPE tables, ids, the head's saves on one stage).
    cfg = preset("k2-2b")
    assert by_mode["full"] >= 2 * cfg.hidden_size * 4096 * cfg.num_layers
    two = planned(Layout(**{**base, "micro_batch": 2}, recompute="none"))["activations"]
    assert 1.99 * by_mode["none"] < two < 2.01 * by_mode["none"]


def test_zero_shards_optimizer_state_over_replicas():
    base = dict(model="k2-2b", gpus=64, ep=8, optimizer="muon", seq_len=1024)
    z0, z1, z2 = (planned(Layout(**base, zero=z)) for z in (0, 1, 2))
    # Muon state: dense part / 64 replicas, experts / 8 (64 ranks hold each expert slice 8 times).
    assert z1["optimizer_state"] < z0["optimizer_state"] / 7
    assert z1["gradients"] == z0["gradients"] and z2["gradients"] < z1["gradients"] / 7
    assert z1["weights"] == z2["weights"] == z0["weights"]
    adamw = planned(Layout(**{**base, "optimizer": "adamw"}, zero=0))
    assert adamw["optimizer_state"] == 2 * adamw["weights"] * 2  # two fp32 moments of bf16 weights


def test_pipeline_stages_and_in_flight_micro_batches():
    # Interleaved (modelled only): Megatron's placement of the pp x vpp even chunks.
    assert sum(map(len, stage_layers(preset("kimi-k2"), 16, 2, 1))) == 61
    assert stage_layers(preset("small", num_layers=8), 2, 2, 1) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    lay = Layout(model="kimi-k2", gpus=256, pp=16, ep=16, global_batch_tokens=64 * 4096 * 16)
    assert [in_flight(16, 1, lay.microbatches, s) for s in (0, 15)] == [16, 1]
    assert plan_anyway(lay)["step"]["bubble"] == pytest.approx(15 / (64 + 15))
    inter = Layout(model="kimi-k2", gpus=256, pp=16, vpp=2, ep=16, global_batch_tokens=64 * 4096 * 16)
    assert in_flight(16, 2, inter.microbatches, 0) == (2 * 15 + 16 + 1) / 2  # Megatron's warm-up of 2(p-1) + (v-1)p chunks, + 1
    assert plan_anyway(inter)["step"]["bubble"] == pytest.approx(15 / (128 + 15))


@pytest.mark.parametrize("kwargs, flag", [
    (dict(gpus=10, pp=4), "--pp 4 .*valid: 1, 2, 5, 10"), (dict(gpus=8, ep=3), "--ep 3"), (dict(model="tiny", gpus=3, ep=3), "--ep 3"),
    (dict(gpus=8, ep=8, zero=3), "--zero 3"), (dict(gpus=8, pp=8, vpp=8), "--vpp 8"),
    (dict(gpus=8, global_batch_tokens=67_000_000), "--global-batch-tokens 67000000"),
    (dict(gpu="b300"), "--gpu 'b300'"), (dict(recompute="some"), "--recompute 'some'"),
])
def test_invalid_layouts_name_the_flag(kwargs, flag):
    with pytest.raises(PlanError, match=flag.replace("(", r"\(")):
        Layout(**kwargs)


def test_refusal_names_the_overflowing_term_and_cli_exit_codes(capsys):
    lay = Layout(model="kimi-k2", gpus=8, ep=8, seq_len=4096)
    # 1T parameters over 8 GPUs: the bf16 weights alone overflow; Muon's fp32 momentum is larger
    # still (ep = 8 = dp leaves no expert replicas for ZeRO to shard over).
    with pytest.raises(DoesNotFit, match=r"overflows at 'weights'.*largest term is 'optimizer_state'"):
        plan(lay)
    assert main(["--model", "kimi-k2", "--gpus", "8", "--ep", "8"]) == 1
    assert "REFUSED" in capsys.readouterr().out
    assert main(["--model", "tiny", "--gpus", "3", "--ep", "2"]) == 2
    assert "--ep 2 does not divide" in capsys.readouterr().err
    assert main(["--model", "small", "--gpus", "8", "--ep", "8", "--seq-len", "1024", "--gpu", "h100", "--json"]) == 0
    assert '"fits": true' in capsys.readouterr().out


def test_parse_count():
    assert parse_count("67M") == 67_000_000 and parse_count("64Mi") == 2**26 and parse_count("4096") == 4096
    assert parse_count("64mi") == parse_count("64MI") == 2**26 and parse_count("4k") == 4000
    assert parse_count("1.5M") == 1_500_000 and parse_count("1_048_576") == 2**20
    assert parse_count("9007199254740993") == 9007199254740993  # no float rounding without a fraction
    for text, error in (("lots", "not a count"), ("64 MiB", "not a count"), ("-4", "not a count"),
                        ("0.5", "not a whole number"), ("1.0000001K", "not a whole number")):
        with pytest.raises(Exception, match=error):
            parse_count(text)


def test_cli_reads_names_in_any_case_and_counts_with_suffixes(capsys):
    assert main(["--model", "SMALL", "--gpu", "H100", "--gpus", "8", "--ep", "8", "--seq-len", "1Ki", "--json"]) == 0
    layout = json.loads(capsys.readouterr().out)["layout"]
    assert (layout["model"], layout["gpu"], layout["seq_len"]) == ("small", "h100", 1024)
    # A batch that does not divide names both neighbours; 64Mi does divide.
    small = ["--model", "small", "--gpus", "8", "--ep", "8", "--seq-len", "1024", "--global-batch-tokens"]
    assert main([*small, "67M"]) == 2  # 67e6 / (1024 x 8) = 8178.7
    assert "nearest: 66994176 (8178 micro-batches per step) or 67002368 (8179 micro-batches" in capsys.readouterr().err
    assert main([*small, "64Mi", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"]["microbatches"] == 2**26 // (1024 * 8)
    with pytest.raises(SystemExit) as exit_:  # argparse's own refusal: exit 2 as every invalid layout
        main(["--global-batch-tokens", "64 MiB"])
    assert exit_.value.code == 2 and "not a count such as" in capsys.readouterr().err


@pytest.mark.parametrize("name,pp,ep", [("k2-2b", 4, 1), ("k2-2b", 8, 2), ("small", 3, 4), ("kimi-k2", 16, 16),
                                         ("kimi-k2", 8, 1), ("tiny", 2, 1)])
def test_planned_stages_hold_the_blocks_launch_train_gives_them(name, pp, ep, monkeypatch):
    """The planner's stages against the trainer's cut (launch/parallel/pipeline.py's stage_bounds) of
    a real meta-device model, its experts sliced by expert parallelism as launch.train slices them
    (rank 0 of an ep-sized group, stood in for: no process group is needed to slice)."""
    from launch.parallel import expert_parallel
    from launch.parallel.pipeline import stage_bounds

    cfg = preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    if ep > 1:
        monkeypatch.setattr(expert_parallel.dist, "get_world_size", lambda group=None: ep)
        monkeypatch.setattr(expert_parallel.dist, "get_rank", lambda group=None: 0)
        expert_parallel.apply_expert_parallel(model, None, "ep")
    bounds = stage_bounds(model, pp)
    assert stage_layers(cfg, pp, 1, ep) == [list(range(bounds[s], bounds[s + 1])) for s in range(pp)]


def test_each_pipeline_stage_holds_its_blocks_embedding_first_head_last():
    """Stage weights against a real (meta-device) model's modules: stage 0 the embedding, the last
    the final norm and head, each its contiguous run of blocks; bf16 weights."""
    cfg = preset("k2-2b")
    with torch.device("meta"):
        model = Transformer(cfg)
    lay = Layout(model="k2-2b", gpus=4, pp=4, seq_len=1024)
    layers = stage_layers(cfg, 4, 1, 1)
    assert layers == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    for s in range(4):
        modules = [model.layers[i] for i in layers[s]] + [model.embed_tokens] * (s == 0) + [model.norm, model.lm_head] * (s == 3)
        expected = 2 * sum(p.numel() for m in modules for p in m.parameters())
        phases = stage_memory(cfg, lay, s, layers[s])
        assert phases["persistent"]["weights"] == expected
        assert (phases["backward"]["logits"] > 0) == (s == 3)


@pytest.mark.distributed
def test_deepspeed_ranks_hold_what_the_planner_says(tmp_path):
    """Two gloo ranks under DeepSpeed ZeRO-1/2, with and without EP (tests/dist/plan_memory_check.py)."""
    sys.path.insert(0, str(Path(__file__).parent / "dist"))
    from harness import torchrun_json

    ranks = torchrun_json("plan_memory_check.py", tmp_path, timeout=300)
    for rank in ranks:
        B, T, GA = rank["B"], rank["T"], rank["GA"]
        for case in rank["cases"].values():
            lay = Layout(model=case["model"], gpus=2, ep=case["ep"], zero=case["zero"], optimizer=case["optimizer"],
                         precision="fp32", kernels="cpu", seq_len=T, micro_batch=B, global_batch_tokens=2 * B * T * GA,
                         bucket_elems=rank["bucket"])
            memory = plan(lay)["memory"]
            assert memory["terms"]["weights"] == case["weights"]  # ZeRO's flat buffers: no padding at dp = 2 here
            assert memory["terms"]["fp32_masters"] == case["fp32_masters"]
            # ZeroMuon also keeps the momentum of the (at most two) matrices its slice cuts: measured +6% on tiny.
            assert case["optimizer_state"] >= memory["terms"]["optimizer_state"]
            assert case["optimizer_state"] <= 1.10 * memory["terms"]["optimizer_state"]
            # With the collectives settled (see plan_memory_check.py) the profiled steps agree to the byte
            # and the planner is within 7% (tiny's backward peaks: -4.7..+6.9%; small's step: -2.5..0%).
            assert abs(memory["total"] - case["peak"]) <= 0.10 * case["peak"], (case, memory["total"])


# (stages, T, micro-batches, cases) of tests/dist/plan_pipeline_check.py, B 2. 2 stages: the head's
# logits, Muon and AdamW; 3: a middle stage (no embedding, no head), the optimizer step the peak; 4 at
# T 256: the activations of 4 and 3 micro-batches in flight the peak of stages 0 and 1. The planner
# assumes a later micro-batch's forward follows each stage's first backward (its gradients then
# whole beside the activations), as in any real run (m >> pp): with m = pp stage 0 runs none and peaks
# in its first backward, which frees activations as it makes gradients, +5.5% under the plan (4, 256, 4).
PIPELINE_RUNS = [(2, 64, 4, ("tiny:adamw", "small:muon")), (3, 64, 4, ("small:muon",)), (4, 256, 5, ("small:muon",))]


def pipeline_stage_rows(ranks: list[dict]):
    """(stage, case, planned phases, planned stage total, the plan's blocks of the stage) per rank and case."""
    for rank in ranks:
        B, T, GA, pp = rank["B"], rank["T"], rank["GA"], rank["pp"]
        for key, case in rank["cases"].items():
            lay = Layout(model=case["model"], gpus=pp, pp=pp, zero=1, optimizer=case["optimizer"],
                         precision="fp32", kernels="cpu", seq_len=T, micro_batch=B, global_batch_tokens=B * T * GA,
                         bucket_elems=rank["bucket"])
            result, stage = plan(lay), case["stage"]
            layers = result["memory"]["stage_layers"][stage]
            yield (stage, key, case, stage_memory(lay.model_config(), lay, stage, layers),
                   result["memory"]["stage_totals"][stage], layers)


@pytest.mark.distributed
@pytest.mark.parametrize("pp, T, GA, cases", PIPELINE_RUNS)
def test_pipeline_stages_hold_what_the_planner_says(tmp_path, pp, T, GA, cases):
    """A DeepSpeed pipeline (1F1B, ZeRO-1 in each stage) on gloo ranks, one per stage, built as
    launch.train builds it (tests/dist/plan_pipeline_check.py): each stage against the plan's stage."""
    sys.path.insert(0, str(Path(__file__).parent / "dist"))
    from harness import torchrun_json

    ranks = torchrun_json("plan_pipeline_check.py", tmp_path, str(T), str(GA), *cases, nproc=pp, timeout=300)
    for stage, _, case, phases, planned, layers in pipeline_stage_rows(ranks):
        assert layers == list(range(*case["bounds"][stage:stage + 2]))  # the trainer's cut
        for term in ("weights", "fp32_masters", "optimizer_state"):
            assert phases["persistent"][term] == case[term], (case, term)
        # Measured (benchmarks/plan-validation-cpu.json): within 4.3% on every stage.
        assert abs(planned - case["peak"]) <= 0.05 * case["peak"], (case, planned)


def test_step_estimate_links_volumes_and_mfu():
    cfg = preset("k2-2b")
    moe_layers = cfg.num_layers - cfg.first_k_dense
    base = dict(model="k2-2b", gpu="h100", fabric="8x400g", seq_len=4096, global_batch_tokens=16 * 2**20)
    inside = plan_anyway(Layout(**base, gpus=16, ep=8))["step"]
    # 1 Mi tokens per rank; each goes to K experts, 7/8 of them on other GPUs; 4 passes (dispatch and
    # combine, forward and backward); bf16 rows of D.
    volume = 4 * 2**20 * cfg.num_experts_per_tok * cfg.hidden_size * 2 * 7 / 8 * moe_layers
    assert inside["all_to_all_bytes"] == pytest.approx(volume)
    assert inside["seconds"]["all_to_all"] == pytest.approx(volume / (450e9 * 0.7))  # NVLink only
    across = plan_anyway(Layout(**base, gpus=16, ep=16))["step"]
    # 7 of the 15 peers share the node, 8 sit on the other one, behind 50 GB/s per GPU.
    assert across["seconds"]["all_to_all"] == pytest.approx(across["all_to_all_bytes"] * 8 / 15 / (50e9 * 0.7))
    for step in (inside, across):
        assert 0 < step["mfu"] < 0.135  # never above the assumed compute efficiency
    one = plan_anyway(Layout(model="k2-2b", gpu="h100", seq_len=4096))["step"]
    assert one["all_to_all_bytes"] == one["dp_reduce_bytes"] == one["pipeline_p2p_bytes"] == 0


def test_the_planner_imports_no_torch():
    """launch.plan is arithmetic on a config: it must start in a fraction of a second, with no torch
    (1.1 s of import on a 2-core CPU) and no DeepSpeed, on a laptop or a login node."""
    import subprocess

    probe = "import sys, launch.plan; print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("shape, chunk", [((8, 128, 256), 2**26), ((8, 128, 256), 3 * 128 * 256), ((2, 256, 64), 2**26)])
def test_newton_schulz_working_set_is_what_muon_holds(monkeypatch, shape, chunk):
    """The planner's Newton-Schulz term (it cannot import optim.muon's chunk size, so keeps a copy,
    pinned here) against the profiler's peak while optim.muon_chunks steps a stack of matrices a
    chunk at a time, the update applied as each chunk comes (as optim.Muon applies it)."""
    import optim.muon
    from launch.planning import memory

    assert memory.NS_CHUNK_ELEMENTS == optim.muon.NS_CHUNK_ELEMENTS
    monkeypatch.setattr(memory, "NS_CHUNK_ELEMENTS", chunk)
    grad, buf, master = torch.randn(shape), torch.zeros(shape), torch.zeros(shape)

    def step():
        for lo, hi, O_CMN in optim.muon_chunks(grad, buf, chunk_elements=chunk):
            master[lo:hi].add_(O_CMN, alpha=-0.01)
            del O_CMN

    measured = peak_allocated_during(step)
    planned = 4 * memory._ns_working_set([shape])
    assert abs(planned - measured) <= 0.02 * measured, (planned, measured)  # measured: equal to the byte
