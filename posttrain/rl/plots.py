"""Pictures of RL runs from their metrics.jsonl: one run, or several side by side (k15 beside grpo)."""

from __future__ import annotations

from pathlib import Path

from launch.metrics.log import read_metrics

# (metrics key, axis label, title) per panel
PANELS = [
    ("reward", "mean shaped reward", "reward of the samples"),
    ("heldout_accuracy", "exact answers (greedy)", "held-out accuracy"),
    ("response_tokens", "tokens", "response length (samples)"),
    ("correct_response_tokens", "tokens", "length of correct responses"),
    ("kl", "nats per token", "KL(pi_i || pi_i+1) on the samples"),
    ("mismatch", "|log p| per token", "sampling vs training log-prob mismatch"),
]


def plot_runs(runs: dict[str, Path], png: Path, title: str = "") -> None:
    """runs: label -> metrics.jsonl. One panel per PANELS entry, every run a line in each."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), dpi=110)
    records = {label: read_metrics(path) for label, path in runs.items()}
    for ax, (key, ylabel, panel_title) in zip(axes.flat, PANELS):
        for i, (label, rows) in enumerate(records.items()):
            color = f"C{i}"
            points = [(r["iteration"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), "o-" if key == "heldout_accuracy" else "-", color=color, label=label,
                        markersize=4)
            if key == "mismatch":
                free = [(r["iteration"], r["mismatch_without_replay"]) for r in rows
                        if r.get("mismatch_without_replay") is not None]
                if free:
                    ax.plot(*zip(*free), "--", color=color, label=f"{label}, without replay")
        ax.set_title(panel_title)
        ax.set_xlabel("RL iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if key == "heldout_accuracy":
            ax.set_ylim(0, 1)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def plot_run(metrics: Path, png: Path, title: str = "") -> None:
    plot_runs({"policy": metrics}, png, title)
