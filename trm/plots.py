"""A TRM run's picture from its metrics.jsonl: validation exact accuracy over training, accuracy and
loss per supervision step (the value of recursion), and where the halting head stops."""

from __future__ import annotations

from pathlib import Path

from launch.metrics.log import read_metrics


def plot_run(metrics: Path, png: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    evals = [r for r in records if "val_exact" in r]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2), dpi=110)
    ax = axes[0]
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_exact"] for r in evals], "o-", label="validation (EMA)")
    train = [r for r in records if "exact" in r]
    if train:
        ax.plot([r["step"] for r in train], [r["exact"] for r in train], alpha=0.4, label="training batch")
    ax.set(xlabel="optimizer step", ylabel="exact accuracy (every cell right)", title="exact accuracy", ylim=(0, 1))
    ax.legend()
    if evals:
        last = evals[-1]
        steps = range(1, len(last["val_exact_by_step"]) + 1)
        axes[1].plot(steps, last["val_exact_by_step"], "o-")
        axes[1].set(xlabel="supervision step", ylabel="exact accuracy", ylim=(0, 1),
                    title=f"validation by supervision step (step {last['step']})")
        axes[2].plot(steps, last["val_loss_by_step"], "o-", color="tab:red")
        axes[2].set(xlabel="supervision step", ylabel="cell loss (nats)", title="validation loss by supervision step")
        axes[3].bar(steps, last["val_halt_steps"], color="tab:green")
        axes[3].set(xlabel="supervision step", ylabel="puzzles", title="where the halting head first stops")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
