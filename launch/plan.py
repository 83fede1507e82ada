"""Will a layout fit, and how fast will it run? `python -m launch.plan --model kimi-k2 --gpus 2048 ...`

Pure arithmetic on the ModelConfig and the layout: nothing is built, nothing is allocated. Every
memory term is bytes on one GPU of the fullest pipeline stage; every volume is bytes one GPU sends
per optimizer step; times are seconds. Terms are grouped by when they are alive (`stage_memory`):
always, while micro-batches run, or inside the optimizer step; the peak is the first plus the
larger of the other two. The parts live in launch/planning/: parameter counts (params.py), the
memory terms (memory.py), the saved-for-backward bytes, op by op as this stack's code saves them
(activations.py), traffic and time (step_time.py). tests/test_plan.py checks every term against
real CPU runs (benchmarks/plan_validation.py prints the comparison); no GPU run has checked the bf16
paths yet.

Layout (Kimi K2 tech report §2.4.1: PP with virtual stages, EP, ZeRO-1 DP): the world is pp x dp;
inside one pipeline stage the dp ranks each see different tokens, and every run of `ep` consecutive
ranks splits each MoE layer's routed experts (so ep divides dp, and an expert is replicated over
dp/ep "expert-data-parallel" ranks). Dense weights are replicated over dp. ZeRO shards over those
replicas: optimizer state and fp32 masters from stage 1, gradients from 2, weights at 3.

Precision, as the stack runs it (launch/train.py, launch/parallel/deepspeed_config.py):
  fp32      CPU: weights, gradients, optimizer state and activations fp32, no masters;
  autocast  one GPU: fp32 weights, gradients and optimizer state, bf16 activations (the activation
            accounting then uses bf16 for every activation: autocast's fp32 copies are not modelled);
  bf16      DeepSpeed on GPU: bf16 weights and gradients, fp32 masters and optimizer state
            (optim.Muon keeps fp32 masters for bf16 parameters the same way).

Pipeline parallelism: launch.train --pp-size runs plain 1F1B (DeepSpeed's pipeline engine), and the
stages planned here hold the blocks its cut gives them (launch/parallel/stage_cut.py: parameters
balanced, the embedding on stage 0, the norm and head on the last). Each stage's memory was checked
against a 2-stage run on CPU in fp32 (tests/dist/plan_pipeline_check.py); the bubble and any bf16 or
GPU pipeline were not. Virtual stages (vpp > 1) are modelled, not run. 1F1B keeps up to p - s
micro-batches of stage s in flight, and the bubble is (p-1)/(m+p-1) for m micro-batches; with v
virtual stages (Megatron-LM's interleaved schedule, Narayanan et al. 2021 §2.2) the bubble is
(p-1)/(v*m+p-1) and stage s warms up with 2(p-s-1) + (v-1)p chunks of 1/v of its layers.

Shape letters as moe/: D hidden, H heads, N/R no-RoPE/RoPE head dims, Vh value head dim, Lq/Lkv the
LoRA ranks, I dense FFN width, F expert FFN width, E experts, K experts per token, V vocab,
T sequence length, b micro-batch sequences; `a` is the activation dtype's bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from dataclasses import dataclass, fields

from launch.planning.memory import dtype_bytes, peak_bytes, stage_memory
from launch.planning.params import param_totals, stage_layers, stage_params
from launch.planning.step_time import FABRICS, GPUS, step_estimate
from launch.parallel.recompute_modes import MODES as RECOMPUTE_MODES
from moe.config import PRESETS, ConfigError, ModelConfig, check_field_types, doc_field, preset

GIB = 2**30


class PlanError(ConfigError):
    """An invalid layout: the message names the flag, its value and what would be valid."""


class DoesNotFit(Exception):
    """A valid layout whose memory exceeds the GPU: the message names the term that overflows."""

    def __init__(self, message: str, plan: dict):
        super().__init__(message)
        self.plan = plan


@dataclass
class Layout:
    """A training layout. Each field is a flag of `python -m launch.plan` (underscores as dashes)."""

    model: str = doc_field("kimi-k2", "model preset: " + ", ".join(PRESETS))
    gpus: int = doc_field(1, "GPUs in the job (the world): pp x dp (a count: 2Ki = 2048)")
    pp: int = doc_field(1, "pipeline stages (launch.train --pp-size; its cut of the blocks is the one planned)")
    vpp: int = doc_field(1, "virtual stages per pipeline rank (interleaved 1F1B, modelled: launch.train runs "
                            "1); 1: plain 1F1B")
    ep: int = doc_field(1, "expert-parallel size: consecutive data-parallel ranks that split the routed experts")
    zero: int = doc_field(1, "ZeRO stage over the data-parallel replicas: 0 none, 1 optimizer state and masters, "
                             "2 + gradients, 3 + weights (not with muon/muonclip or ep > 1)")
    optimizer: str = doc_field("muon", "adamw (two fp32 moments) | muon | muonclip (one momentum per matrix, "
                                       "AdamW for embeddings, head and norms)")
    precision: str = doc_field("bf16", "fp32 | autocast | bf16 (see the module docstring)")
    grad_dtype: str = doc_field("auto", "gradient (accumulation) dtype: auto (the weights') | fp32 | bf16")
    seq_len: int = doc_field(4096, "tokens per sequence T (suffixes as --global-batch-tokens: 4Ki = 4096)")
    micro_batch: int = doc_field(1, "sequences per micro-batch b on each data-parallel rank")
    global_batch_tokens: int = doc_field(0, "tokens per optimizer step (suffixes K M G, Ki Mi Gi, any case: 67M, 64Mi); "
                                            "0: one micro-batch per data-parallel rank")
    recompute: str = doc_field("none", "activation recompute: none | selective (norms, SwiGLU, MLA up-projections) "
                                       "| full (only each block's input is kept)")
    kernels: str = doc_field("gpu", "whose saved tensors are counted: gpu (Triton expert FFN, fused SDPA) | "
                                    "cpu (kimi_kernels/experts/cpu_ffn.py or the reference, SDPA's math path with T x T scores)")
    gpu: str = doc_field("h800", "GPU preset: " + ", ".join(GPUS))
    fabric: str = doc_field("8x400g", "inter-node network preset (per 8-GPU node): " + ", ".join(FABRICS))
    bucket_elems: float = doc_field(5e8, "DeepSpeed's reduce/all-gather bucket, elements (its default 5e8)")
    reserve_gib: float = doc_field(4.0, "GiB of each GPU kept for the CUDA context, NCCL and fragmentation")
    compute_efficiency: float = doc_field(0.135, "achieved fraction of peak FLOP/s over the step's compute; "
                                                 "default: this stack's one GPU figure (k2-2b, one H100, README)")
    comm_efficiency: float = doc_field(0.7, "achieved fraction of link bandwidth in collectives (an assumption)")
    a2a_overlap: float = doc_field(0.0, "fraction of the expert all-to-all hidden behind compute (0: this "
                                        "stack's dispatch is synchronous; K2 overlaps it in interleaved 1F1B)")

    def __post_init__(self):
        check_field_types(self)
        choices = {"model": PRESETS, "optimizer": ("adamw", "muon", "muonclip"), "precision": ("fp32", "autocast", "bf16"),
                   "grad_dtype": ("auto", "fp32", "bf16"), "recompute": RECOMPUTE_MODES,
                   "kernels": ("gpu", "cpu"), "gpu": GPUS, "fabric": FABRICS}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise PlanError(f"{_flag(name)} {getattr(self, name)!r}; valid: {', '.join(valid)}")
        for name in ("gpus", "pp", "vpp", "ep", "seq_len", "micro_batch"):
            if getattr(self, name) < 1:
                raise PlanError(f"{_flag(name)} {getattr(self, name)} must be >= 1")
        if self.zero not in (0, 1, 2, 3):
            raise PlanError(f"--zero {self.zero}; valid: 0, 1, 2, 3")
        for name in ("compute_efficiency", "comm_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise PlanError(f"{_flag(name)} {getattr(self, name)} must be in (0, 1]")
        if not 0 <= self.a2a_overlap <= 1:
            raise PlanError(f"--a2a-overlap {self.a2a_overlap} must be in [0, 1]")
        if self.gpus % self.pp:
            raise PlanError(f"--pp {self.pp} does not divide --gpus {self.gpus}: the world is pp x dp; "
                            f"valid: {_divisors(self.gpus)}")
        if self.dp % self.ep:
            raise PlanError(f"--ep {self.ep} does not divide the data-parallel size {self.dp} (= gpus / pp): "
                            f"expert parallelism spans data-parallel ranks of one stage; valid: {_divisors(self.dp)}")
        cfg = self.model_config()
        if cfg.num_experts % self.ep:
            raise PlanError(f"--ep {self.ep} does not divide num_experts = {cfg.num_experts} of {self.model}; "
                            f"each rank must hold E/ep experts; valid: {_divisors(cfg.num_experts)}")
        if cfg.num_layers < self.pp * self.vpp:
            raise PlanError(f"--pp {self.pp} x --vpp {self.vpp} exceeds the {cfg.num_layers} layers of {self.model}: "
                            "every virtual stage needs at least one block")
        if self.seq_len > cfg.max_seq_len:
            raise PlanError(f"--seq-len {self.seq_len} exceeds max_seq_len = {cfg.max_seq_len} of {self.model}")
        if self.zero == 3 and self.optimizer != "adamw":
            raise PlanError(f"--zero 3 with --optimizer {self.optimizer}: ZeRO-3 steps flat shards, where Newton-"
                            "Schulz would orthogonalise fragments (launch/parallel/engine.py); use --zero 1 or 2")
        if self.zero == 3 and self.ep > 1:
            raise PlanError("--zero 3 with --ep > 1: DeepSpeed's ZeRO-3 does not partition expert-parallel weights; "
                            "use --zero 1 or 2")
        tokens_per_round = self.seq_len * self.micro_batch * self.dp
        if self.global_batch_tokens == 0:
            self.global_batch_tokens = tokens_per_round
        if self.global_batch_tokens % tokens_per_round:
            below = self.global_batch_tokens // tokens_per_round
            nearest = [f"{m * tokens_per_round} ({_plural(m, 'micro-batch')} per step)" for m in (below, below + 1) if m]
            raise PlanError(
                f"--global-batch-tokens {self.global_batch_tokens} is not a multiple of seq_len x micro_batch x dp = "
                f"{self.seq_len} x {self.micro_batch} x {self.dp} = {tokens_per_round}; nearest: {' or '.join(nearest)}")
        if self.vpp > 1 and self.microbatches % self.pp:
            raise PlanError(f"--vpp {self.vpp}: the interleaved schedule needs micro-batches per step "
                            f"({self.microbatches}) to be a multiple of --pp {self.pp}")

    @property
    def dp(self) -> int:
        return self.gpus // self.pp

    @property
    def microbatches(self) -> int:
        """m: micro-batches per data-parallel rank per optimizer step."""
        return self.global_batch_tokens // (self.seq_len * self.micro_batch * self.dp)

    def model_config(self) -> ModelConfig:
        return preset(self.model)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("es" if noun.endswith("h") else "s") * (n != 1)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


# ---------------------------------------------------------------------------------------------------
# The plan: memory per GPU (each stage, the fullest reported), traffic and time per step.

def plan(lay: Layout) -> dict:
    """Every stage's memory terms, the fullest stage's verdict, per-step traffic, bubble, time and MFU.
    Raises DoesNotFit (with the plan attached) when the fullest stage exceeds the GPU."""
    cfg = lay.model_config()
    gpu = GPUS[lay.gpu]
    layers_of = stage_layers(cfg, lay.pp, lay.vpp, lay.ep)
    stages = [stage_memory(cfg, lay, s, layers) for s, layers in enumerate(layers_of)]
    peak = max(range(lay.pp), key=lambda s: peak_bytes(stages[s]))
    phases = stages[peak]
    total = peak_bytes(phases)
    busiest = max(("backward", "step"), key=lambda k: sum(phases[k].values()))
    usable = gpu.hbm_bytes - lay.reserve_gib * GIB
    terms = {name: value for phase in phases.values() for name, value in phase.items()}
    result = {
        "layout": dataclasses.asdict(lay) | {"dp": lay.dp, "edp": lay.dp // lay.ep, "microbatches": lay.microbatches},
        "params": param_totals(cfg),
        "memory": {"stage": peak, "phases": phases, "terms": terms, "peak_phase": busiest, "total": total,
                   "usable": usable, "hbm": gpu.hbm_bytes, "stage_totals": [peak_bytes(t) for t in stages],
                   "stage_layers": layers_of},
        "step": step_estimate(cfg, lay, gpu, param_totals(cfg)["active"],
                              stage_params(cfg, list(range(cfg.num_layers)), True, True, lay.ep), *dtype_bytes(lay)[1:],
                              optimizer_bytes=2 * sum(phases["persistent"].values()) + 2 * sum(phases["step"].values())),
        # The fullest stage's saved activations (and full recompute's working set) under each setting.
        "activations_by_recompute": {
            mode: sum(v for k, v in stage_memory(cfg, dataclasses.replace(lay, recompute=mode), peak,
                                                 layers_of[peak])["backward"].items()
                      if k in ("activations", "recompute_working_set"))
            for mode in ("none", "selective", "full")},
    }
    if total > usable:
        counted = phases["persistent"] | phases[busiest]
        running, culprit = 0.0, None
        for name, value in counted.items():
            running += value
            if culprit is None and running > usable:
                culprit = name
        largest = max(counted, key=counted.get)
        raise DoesNotFit(
            f"{lay.model} does not fit: stage {peak} needs {total / GIB:.1f} GiB per GPU, {(total - usable) / GIB:.1f} "
            f"GiB over the {usable / GIB:.1f} GiB usable on a {lay.gpu} ({gpu.hbm_bytes / GIB:.1f} GiB less "
            f"--reserve-gib {lay.reserve_gib:g}); the sum overflows at '{culprit}' and the largest term is "
            f"'{largest}' ({counted[largest] / GIB:.1f} GiB){_advice(largest, lay)}", result)
    return result


def _advice(term: str, lay: Layout) -> str:
    """What would shrink `term`, leaving out what the layout already does."""
    more = "more data-parallel replicas (ZeRO shards them over them), --pp or --ep"
    options = {"activations": [f"--recompute {m}" for m in ("selective", "full")
                               if ("none", "selective", "full").index(m) > ("none", "selective", "full").index(lay.recompute)]
                              + (["a smaller --micro-batch"] if lay.micro_batch > 1 else []) + ["more --pp"],
               "weights": ["more --pp or --ep"] + (["--zero 3 (AdamW, no EP)"] if lay.optimizer == "adamw" else []),
               "gradients": (["--zero 2"] if lay.zero < 2 else []) + ["more --pp or --ep"],
               "optimizer_state": [more], "fp32_masters": [more], "step_temporaries": [more],
               "logits": ["a smaller --micro-batch"] if lay.micro_batch > 1 else ["more --pp"]}.get(term)
    return ": try " + ", or ".join(options) if options else ""


# ---------------------------------------------------------------------------------------------------
# Command line.

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
# Flags that take a count with a suffix (a GPU count, tokens); the others are plain numbers.
_COUNT_FLAGS = ("gpus", "seq_len", "global_batch_tokens")


def parse_count(text: str) -> int:
    """'67M' -> 67_000_000, '64Mi' -> 67_108_864, '4k' -> 4000, '4096' -> 4096, '1_024' -> 1024.
    Suffixes in any case: a count has no milli- to confuse with mega-."""
    match = re.fullmatch(r"\s*(\d[\d_]*(?:\.\d+)?)\s*([kmg]i?)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count such as 4096, 4Ki, 67M or 64Mi")
    number, suffix = match.group(1).replace("_", ""), (match.group(2) or "").lower()
    value = int(number) * _SUFFIX[suffix] if "." not in number else float(number) * _SUFFIX[suffix]
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.plan", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Memory per GPU, traffic per step, pipeline bubble, step time and MFU of a training layout; "
                    "exit 1 if it does not fit (naming the term), 2 if it is invalid (naming the flag).",
        epilog="Memory terms are bytes on one GPU of the fullest pipeline stage. See launch/plan.py's docstrings "
               "for the assumption behind each term and docs/planning.md for worked layouts.")
    for f in fields(Layout):
        # Names (presets, modes) in any case: `--gpu H100` is h100.
        kind = parse_count if f.name in _COUNT_FLAGS else {"int": int, "float": float}.get(f.type, str.lower)
        parser.add_argument(_flag(f.name), type=kind, default=f.default, help=f.metadata["doc"])
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of tables")
    return parser


def _blocks(layers: list[int]) -> str:
    """", blocks 4-7" for a stage's contiguous run, ", 4 blocks" for an interleaved stage's chunks,
    ", no block" for a first or last stage that holds only the embedding or the head."""
    if not layers:
        return ", no block"
    if layers != list(range(layers[0], layers[-1] + 1)):
        return f", {len(layers)} blocks"
    return f", block {layers[0]}" if len(layers) == 1 else f", blocks {layers[0]}-{layers[-1]}"


def _gib_header(text: str) -> str:
    return text + " " * max(1, 53 - len(text)) + "GiB"  # "GiB" over the value column of the rows below


def format_plan(result: dict) -> str:
    lay, mem, step = result["layout"], result["memory"], result["step"]
    lines = [f"{lay['model']} ({result['params']['total'] / 1e9:.2f}B total, {result['params']['active'] / 1e9:.2f}B "
             f"active) on {lay['gpus']} x {lay['gpu']}: pp {lay['pp']} (vpp {lay['vpp']}) x dp {lay['dp']}, "
             f"ep {lay['ep']} (expert replicas {lay['edp']}), ZeRO-{lay['zero']}, {lay['optimizer']}, {lay['precision']}, "
             f"recompute {lay['recompute']}",
             f"batch: {lay['global_batch_tokens']:,} tokens/step = {_plural(lay['microbatches'], 'micro-batch')} x "
             f"{lay['micro_batch']} x {lay['seq_len']} tokens x dp {lay['dp']}", "",
             _gib_header(f"memory per GPU (stage {mem['stage']} of {lay['pp']}, the fullest"
                         f"{_blocks(mem['stage_layers'][mem['stage']])})")]
    for phase, terms in mem["phases"].items():
        label = {"persistent": "always", "backward": "while micro-batches run", "step": "inside the optimizer step"}
        lines.append(f" {label[phase]}:" + ("   <- the larger of the two" if phase == mem["peak_phase"] else ""))
        lines += [f"  {name:<44}{value / GIB:>10.2f}" for name, value in terms.items()]
    lines += [f"  {'total':<44}{mem['total'] / GIB:>10.2f}",
              f"  {'usable (HBM less reserve)':<44}{mem['usable'] / GIB:>10.2f}", "",
              "activations of that stage under each recompute setting   GiB"]
    lines += [f"  {mode:<44}{value / GIB:>10.2f}" for mode, value in result["activations_by_recompute"].items()]
    sec = step["seconds"]
    lines += ["", "per step, per GPU                                  GB sent   seconds",
              f"  {'expert all-to-all':<44}{step['all_to_all_bytes'] / 1e9:>8.1f}{sec['all_to_all']:>10.3f}",
              f"  {'pipeline p2p':<44}{step['pipeline_p2p_bytes'] / 1e9:>8.1f}{sec['pipeline_p2p']:>10.3f}",
              f"  {'data-parallel reduce + gather':<44}{step['dp_reduce_bytes'] / 1e9:>8.1f}{sec['dp_reduce']:>10.3f}",
              f"  {'compute (model + recompute FLOPs)':<52}{sec['compute']:>10.3f}",
              f"  {'optimizer step (HBM-bound)':<52}{sec['optimizer']:>10.3f}",
              f"  {'pipeline bubble ({:.1%} of the pipelined time)'.format(step['bubble']):<52}{sec['bubble']:>10.3f}",
              f"  {'step':<52}{sec['step']:>10.3f}",
              f"  tokens/s {step['tokens_per_second']:,.0f}   MFU {step['mfu']:.1%} "
              f"(at --compute-efficiency {lay['compute_efficiency']:g}, --comm-efficiency {lay['comm_efficiency']:g})"]
    if lay["vpp"] > 1:
        lines.append("  note: launch.train runs vpp = 1 (plain 1F1B); the interleaved schedule is modelled")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    as_json = args.pop("json")
    try:
        lay = Layout(**args)
    except ConfigError as err:
        print(f"invalid layout: {err}", file=sys.stderr)
        return 2
    try:
        result, error = plan(lay), None
    except DoesNotFit as err:
        result, error = err.plan, str(err)
    if as_json:
        print(json.dumps(result | {"fits": error is None, "error": error}, indent=2))
    else:
        print(format_plan(result))
        print("\nverdict: " + ("fits" if error is None else "REFUSED: " + error))
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main())
