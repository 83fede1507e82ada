"""What a resume may change, field by field.

A checkpoint's manifest records the training config and the resolved model config it was written
under. Resuming compares them with the config of the command that resumes:

- FREE fields may change: how long to train, how often to evaluate, log and checkpoint, how many
  checkpoints to keep, fault tolerance, where caches live, activation recomputation and the loss's
  chunking. They change nothing already trained.
- SCHEDULE fields (lr and its schedule) may change when the command says so; the new values apply
  from the resume step on and the change is logged and kept in config_history.jsonl.
- LAYOUT fields (expert-parallel size, ZeRO stage, micro-batch size, accumulation, pipeline stages)
  may change, and with them the number of processes, when the global batch micro_batch_size x
  grad_accum x data-parallel size (world / pp_size) stays the same (`check_global_batch`): checkpoints hold the single-device model's tensors
  (`launch/checkpoint/shards.py`), and the data position is global (`launch.data.batches`).
- Everything else (the model, the data, the optimizer and its state's hyper-parameters, the batch,
  the seed, the parallel layout) is refused with the field and both values: the weights and the
  optimizer state were trained under the saved values, and DeepSpeed restores some of them
  (weight decay, gradient clipping) from the checkpoint anyway, so a new value would be silently
  ignored or would train a different network on the old weights.
"""

from __future__ import annotations

from moe.config import ConfigError

FREE = {
    "steps", "eval_every", "eval_batches", "log_every", "checkpoint_every", "keep_checkpoints", "max_skipped_steps",
    "dist_timeout_s", "resume", "device", "out_dir", "data.cache_dir", "data.num_proc", "tensorboard", "wandb",
    "recompute", "loss_chunk_tokens",  # memory for compute: the same gradients (tests/test_recompute.py, test_loss.py)
}
SCHEDULE = {"lr", "warmup_steps", "min_lr_ratio"}
LAYOUT = {"ep_size", "zero_stage", "micro_batch_size", "grad_accum", "pp_size"}
# Recorded in the training config, compared through the resolved model config instead.
_SKIP = {"resolved_model"}


def _flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key in ("model", "data", "optimizer_args") and not prefix:
            out.update(_flatten(value, f"{name}."))
            if not value:
                out[name] = {}
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _same(a, b) -> bool:
    # 3 and 3.0 are one value (a YAML file may write either); a bool is not a number here.
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def compare(saved_train: dict, saved_model: dict, train: dict, model: dict, free: set[str] = FREE,
            schedule: set[str] = SCHEDULE) -> dict[str, tuple]:
    """The changes a resume may make, {field: (saved, new)}; ConfigError naming every refused one.
    `free` and `schedule` are the fields that may change (another trainer's, e.g. RL's, differ)."""
    old, new = _flatten(saved_train), _flatten(train)
    changed, refused = {}, []
    for name in sorted(set(old) | set(new)):
        if name in _SKIP or name.split(".")[0] in _SKIP:
            continue
        a, b = old.get(name, "(unset)"), new.get(name, "(unset)")
        if _same(a, b):
            continue
        if name in free or name in schedule:
            changed[name] = (a, b)
        else:
            refused.append(f"{name}: the run has {a!r}, this command gives {b!r}")
    for name in sorted(set(saved_model) | set(model)):
        a, b = saved_model.get(name, "(unset)"), model.get(name, "(unset)")
        if not _same(a, b):
            refused.append(f"resolved model {name}: the run has {a!r}, this command gives {b!r}")
    if refused:
        raise ConfigError(
            "this command cannot resume the run: it changes what the checkpoint was trained with ("
            + "; ".join(refused) + "). Resume with the run's own settings (`--resume --out-dir RUN` alone uses "
            "them), or start a new run in another --out-dir. Fields a resume may change: "
            + ", ".join(sorted(free - {"resume", "out_dir"}))
            + ("; and, explicitly, " + ", ".join(sorted(schedule)) if schedule else "")
        )
    return {k: v for k, v in changed.items() if k not in ("resume", "out_dir")}


def check_global_batch(saved_train: dict, saved_world: int | None, train: dict, world: int) -> None:
    """ConfigError unless a resume keeps the global batch (sequences per optimizer step) the run was
    trained with; `saved_world` None (no checkpoint yet: the run starts over) checks nothing. The
    data-parallel size is the world over the pipeline stages (a run saved before pp_size: 1)."""
    if saved_world is None:
        return
    saved_dp, dp = saved_world // saved_train.get("pp_size", 1), world // train.get("pp_size", 1)
    before = saved_train["micro_batch_size"] * saved_train["grad_accum"] * saved_dp
    now = train["micro_batch_size"] * train["grad_accum"] * dp
    if before != now:
        raise ConfigError(
            f"this command cannot resume the run: its global batch is micro_batch_size x grad_accum x data-parallel "
            f"size (world / pp_size) = {saved_train['micro_batch_size']} x {saved_train['grad_accum']} x {saved_dp} = "
            f"{before} sequences, this command's is {train['micro_batch_size']} x {train['grad_accum']} x {dp} = {now}. "
            f"Another layout may resume it with the same product: set --micro-batch-size and --grad-accum so that "
            f"they give {before} with a data-parallel size of {dp}"
        )
