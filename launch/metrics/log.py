"""Run outputs: the one metrics writer of every trainer, its reader, and a PNG of the loss curves.

`MetricsLog` appends each record as a JSON line to <run>/metrics.jsonl, the record of the run, and
writes the record's scalars as TensorBoard events under <run>/tensorboard/ (and, when asked, to an
offline Weights & Biases run under <run>/wandb/), at x = the record's step key. Only rank 0 builds
one. How a record becomes scalars (`scalars`):

    {"lm_loss": 2.1}                          lm_loss
    {"router_max_over_mean": [1.3, 1.8]}      router_max_over_mean/layer_0, .../layer_1 (one per MoE layer)
    {"heldout_by_difficulty": {"1": 0.5}}     heldout_by_difficulty/1
    {"skipped": True}                         skipped = 1.0 (booleans are 0/1)
    None values and strings                   not written
"""

import json
import math
import sys
from pathlib import Path

from moe.config import ConfigError

TENSORBOARD_DIR = "tensorboard"


class MetricsError(ValueError):
    """metrics.jsonl has a damaged line that is not its last: the message names the file and the line."""


def scalars(record: dict, step_key: str = "step") -> dict[str, float]:
    """The record's numbers by tag (module docstring), the step key itself left out."""
    out: dict[str, float] = {}

    def add(tag: str, value) -> None:
        if isinstance(value, (int, float)):  # a bool too: 0 or 1
            out[tag] = float(value)
        elif isinstance(value, (list, tuple)):
            # Every list a trainer logs holds one value per layer.
            for i, item in enumerate(value):
                add(f"{tag}/layer_{i}", item)
        elif isinstance(value, dict):
            for key, item in value.items():
                add(f"{tag}/{key}", item)

    for name, value in record.items():
        if name != step_key:
            add(name, value)
    return out


def _import_wandb():
    # W&B is never required: imported only when asked for, and a clear error when it is not installed.
    try:
        import wandb
    except ImportError:
        raise ConfigError("wandb = true, but the wandb package is not installed: `pip install wandb`, or set "
                          "--wandb false (TensorBoard events are written either way unless --tensorboard false)") from None
    return wandb


def check_writers(tensorboard: bool, wandb: bool) -> None:
    """ConfigError now if a writer asked for cannot be built: a trainer calls it before it writes anything."""
    if wandb:
        _import_wandb()
    if tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("tensorboard = true, but the tensorboard package is not installed: "
                              "`pip install tensorboard`, or set --tensorboard false") from None


class MetricsLog:
    """Appends one JSON object per line to `path` (flushed, so a crash keeps it); the record's scalars
    also go to TensorBoard (on by default) and W&B (off by default, offline), x = record[step_key]:
    "step" for launch.train and SFT, "iteration" for RL.

    `first_step` is the first step this attempt writes: TensorBoard hides the events of earlier
    attempts from it on, as run_dir.supersede_metrics moves their JSON lines aside on a resume."""

    def __init__(self, path: Path, step_key: str = "step", tensorboard: bool = True, wandb: bool = False,
                 first_step: int | None = None):
        self.path = Path(path)
        self.step_key = step_key
        self._tb = self._wandb = None
        wandb_module = _import_wandb() if wandb else None  # before anything is written: a refusal leaves no files
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard = true, but the tensorboard package is not installed: "
                                  "`pip install tensorboard`, or set --tensorboard false") from None
            # flush_secs: a run being watched shows up within seconds; metrics.jsonl is what a crash keeps.
            self._tb = SummaryWriter(str(self.path.parent / TENSORBOARD_DIR), purge_step=first_step, flush_secs=10)
        if wandb_module is not None:
            # Offline: nothing leaves the machine; `wandb sync <run>/wandb/offline-run-*` uploads it later.
            self._wandb = wandb_module.init(mode="offline", dir=str(self.path.parent), project="kimi-moe",
                                            name=self.path.parent.name)
        self._file = self.path.open("a")

    def write(self, record: dict) -> None:
        step = record.get(self.step_key)
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(f"metrics record needs an integer {self.step_key!r} (its x-axis), got {step!r} "
                             f"in a record with keys {sorted(record)}")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        values = scalars(record, self.step_key)
        if self._tb is not None:
            for tag, value in values.items():
                self._tb.add_scalar(tag, value, global_step=step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A damaged last line (a crash mid-write can leave one) is skipped
    with a warning on stderr; a damaged line before it is a MetricsError naming the file and line."""
    path = Path(path)
    lines = [(number, line) for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
             if line.strip()]
    records = []
    for i, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not a record")
        except ValueError as err:
            if i == len(lines) - 1:
                print(f"warning: {path} line {number} is not a complete record (a run cut off mid-write?); "
                      f"skipped it ({err})", file=sys.stderr)
                break
            raise MetricsError(f"{path} line {number} is not a JSON record ({err}); only the last line may be "
                               "cut off by a crash, so this file was damaged otherwise") from None
        records.append(record)
    return records


def plot_losses(metrics_path: Path, png_path: Path, title: str = "") -> None:
    """Train loss (raw and smoothed) and validation loss against step."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["lm_loss"]) for r in records if "lm_loss" in r and math.isfinite(r["lm_loss"])]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, ema(losses, 0.9), color="tab:blue", label="train (EMA 0.9)")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="tab:orange", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def ema(values, decay):
    out, avg = [], None
    for v in values:
        avg = v if avg is None else decay * avg + (1 - decay) * v
        out.append(avg)
    return out
