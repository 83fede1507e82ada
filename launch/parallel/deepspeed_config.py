"""The DeepSpeed JSON for a run, generated from the training config (or read from the user's file).

The generated file is written beside the run as `<out_dir>/deepspeed_config.json`, so what DeepSpeed
was told is on disk next to the metrics. A user file (`--deepspeed-config ds.json`) is taken as the
base; the batch geometry, clipping and precision are then set from our config, because the trainer's
loop, logs and checkpoints are built on those values and a disagreement would be silent.
"""

from __future__ import annotations

import json
from pathlib import Path

from moe.config import ConfigError

# Fields our config owns. A user file that sets them to something else is refused rather than
# overridden quietly.
_OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")


def build_deepspeed_config(
    *,
    micro_batch_size: int,
    grad_accum: int,
    dp_size: int,
    grad_clip: float,
    zero_stage: int,
    bf16: bool,
    user_file: str | None = None,
) -> dict:
    """global batch = micro_batch_size x grad_accum x dp_size sequences per optimizer step."""
    if zero_stage not in (1, 2, 3):
        raise ConfigError(f"zero_stage = {zero_stage}; valid: 1 (optimizer state sharded), 2 (+ gradients), 3 (+ weights)")
    ds = {}
    if user_file:
        path = Path(user_file)
        if not path.is_file():
            raise ConfigError(f"deepspeed_config = {user_file!r} does not exist")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"deepspeed_config = {user_file!r} is not valid JSON: {err}") from None
        if not isinstance(ds, dict):
            raise ConfigError(f"deepspeed_config = {user_file!r} must hold a JSON object")
    ours = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * dp_size,
        "gradient_clipping": grad_clip,
    }
    for key in _OWNED:
        if key in ds and ds[key] != ours[key]:
            raise ConfigError(
                f"{user_file}: {key} = {ds[key]!r} disagrees with the training config ({ours[key]!r}); "
                "set it through the trainer's flags (--micro-batch-size, --grad-accum, --grad-clip) or drop it"
            )
    ds.update(ours)
    zero = ds.setdefault("zero_optimization", {})
    if "stage" in zero and zero["stage"] != zero_stage:
        raise ConfigError(
            f"{user_file}: zero_optimization.stage = {zero['stage']} disagrees with zero_stage = {zero_stage}"
        )
    zero["stage"] = zero_stage
    if zero_stage < 3:
        # The expert-parallel gradient path in DeepSpeed's ZeRO-1/2 needs both (it asserts them).
        zero.setdefault("contiguous_gradients", True)
        zero.setdefault("reduce_scatter", True)
    # bf16 weights with fp32 masters on GPU; fp32 throughout on CPU. A non-finite gradient norm then
    # makes DeepSpeed skip the step (bf16: only with check_grad_overflow), which the trainer logs.
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16}
    if bf16:
        ds["bf16"].setdefault("check_grad_overflow", True)
    # Client optimizers (ours) are not on DeepSpeed's ZeRO-tested list; they are tested here instead.
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 2**31 - 1)  # the trainer prints its own progress
    return ds


def write_deepspeed_config(ds: dict, out_dir: Path) -> Path:
    path = Path(out_dir) / "deepspeed_config.json"
    path.write_text(json.dumps(ds, indent=2, sort_keys=True) + "\n")
    return path
