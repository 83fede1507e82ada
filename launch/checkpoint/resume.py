"""What a resume may change, field by field.

A checkpoint's manifest records the training config and the resolved model config it was written
under. Resuming compares them with the config of the command that resumes:

- FREE fields may change: how long to train, how often to evaluate, log and checkpoint, how many
  checkpoints to keep, fault tolerance, where caches live. They change nothing already trained.
- SCHEDULE fields (lr and its schedule) may change when the command says so; the new values apply
  from the resume step on and the change is logged and kept in config_history.jsonl.
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
}
SCHEDULE = {"lr", "warmup_steps", "min_lr_ratio"}
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
