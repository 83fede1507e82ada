"""One run's dashboard: a single PNG of what a training run did, to read at a glance.

    loss: train (raw, EMA) and validation       learning rate
    global gradient norm                        throughput: tokens/s (and MFU when logged)
    expert load per MoE layer (heatmap)         max attention logit per layer, QK-clip's tau as a line

Red vertical lines on the time-series panels mark skipped steps (non-finite loss or gradient). A panel whose
figures the run did not log says so. launch.train writes <run>/dashboard.png at the end of a run;
`python -m launch.report RUN` redraws it from the run's metrics.jsonl.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from launch.metrics.log import ema, read_metrics

# Written into the PNG's "Software" text: a file that carries it is one of ours, which may be replaced.
MARK = "kimi-moe launch.metrics.dashboard"
X_LABELS = {"step": "optimizer step", "iteration": "RL iteration"}


def step_key(records: list[dict]) -> str:
    """The records' x-axis: "step" (launch.train, SFT) or "iteration" (RL)."""
    return "iteration" if records and all("iteration" in r and "step" not in r for r in records) else "step"


def series(records: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    """(xs, values) of the records holding a finite number under `key`."""
    pairs = [(r[x], r[key]) for r in records if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)
             and math.isfinite(r[key]) and x in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def run_config(run: Path) -> dict:
    """The run's config.yaml ({} if it has none or it cannot be read)."""
    try:
        config = yaml.safe_load((Path(run) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def run_title(run: Path) -> str:
    """`name: preset, optimizer`, from what config.yaml holds."""
    config = run_config(run)
    model = config.get("model")
    details = [model.get("preset") if isinstance(model, dict) else None, config.get("optimizer")]
    details = [str(d) for d in details if d]
    return Path(run).name + (f": {', '.join(details)}" if details else "")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    return plt


def not_logged(ax, title: str, why: str = "not logged") -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="gray", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": MARK})
    pyplot().close(fig)


def is_ours(path: Path) -> bool:
    """True if `path` is a PNG this module's `save` wrote."""
    from PIL import Image  # matplotlib's own dependency

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.text.get("Software") == MARK
    except OSError:
        return False


def log_scale_if_spiky(ax, values: list[float]) -> None:
    # A gradient spike of 100x would flatten every other step against the axis on a linear scale.
    if min(values) > 0 and max(values) / min(values) > 30:
        ax.set_yscale("log")


def _loss(ax, records, x):
    steps, losses = series(records, "lm_loss", x)
    val_steps, val = series(records, "val_loss", x)
    if not steps and not val_steps:
        return not_logged(ax, "loss")
    if steps:
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, ema(losses, 0.9), color="tab:blue", label="train (EMA 0.9)")
    if val_steps:
        ax.plot(val_steps, val, "o-", color="tab:orange", label="validation")
    ax.set(title="loss", ylabel="cross-entropy (nats/token)")
    ax.legend()


def _line(ax, records, x, key, title, ylabel, log=False):
    steps, values = series(records, key, x)
    if not steps:
        return not_logged(ax, title)
    ax.plot(steps, values, color="tab:green")
    ax.set(title=title, ylabel=ylabel)
    if log:
        log_scale_if_spiky(ax, values)


def _throughput(ax, records, x):
    steps, tokens = series(records, "tokens_per_s", x)
    if not steps:
        return not_logged(ax, "throughput")
    ax.plot(steps, tokens, color="tab:purple", label="tokens/s")
    ax.set(title="throughput", ylabel="tokens/s (all processes)")
    mfu_steps, mfu = series(records, "mfu", x)
    if mfu_steps:  # logged on GPUs whose peak FLOP/s is known (launch/metrics/mfu.py)
        twin = ax.twinx()
        twin.plot(mfu_steps, [100 * m for m in mfu], color="tab:gray", alpha=0.7, label="MFU")
        twin.set_ylabel("MFU (% of bf16 peak)")


def _per_layer(records, key, x):
    """(xs, rows [step][layer]) of the records holding a list under `key`."""
    rows = [(r[x], r[key]) for r in records if isinstance(r.get(key), list) and r[key] and x in r]
    return [s for s, _ in rows], [v for _, v in rows]


def _edges(centres: list[float]) -> list[float]:
    # pcolormesh cell edges halfway between logged steps, which need not be evenly spaced (log_every, skips)
    if len(centres) == 1:
        return [centres[0] - 0.5, centres[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(centres, centres[1:])]
    return [2 * centres[0] - mids[0], *mids, 2 * centres[-1] - mids[-1]]


def _expert_load(fig, ax, records, x):
    steps, rows = _per_layer(records, "router_max_over_mean", x)
    if not steps or len({len(r) for r in rows}) != 1:
        return not_logged(ax, "expert load")
    layers = len(rows[0])
    grid_LS = [[row[layer] for row in rows] for layer in range(layers)]  # [MoE layer, step]
    mesh = ax.pcolormesh(_edges(steps), [i - 0.5 for i in range(layers + 1)], grid_LS, cmap="viridis", shading="flat")
    fig.colorbar(mesh, ax=ax, label="max / mean tokens per expert (1 = balanced)")
    ax.set(title="expert load per MoE layer", ylabel="MoE layer")
    ax.set_yticks(range(layers) if layers <= 16 else range(0, layers, max(1, layers // 8)))


def _max_logits(ax, records, x):
    title = "max attention logit (before QK-clip)"
    steps, rows = _per_layer(records, "max_logit_by_layer", x)
    if steps and len({len(r) for r in rows}) == 1:
        layers = len(rows[0])
        plt = pyplot()
        for layer in range(layers):
            ax.plot(steps, [row[layer] for row in rows], color=plt.cm.viridis(layer / max(1, layers - 1)),
                    linewidth=0.9, label=f"layer {layer}" if layers <= 8 else None)
        ax.plot([], [], color="gray", label=f"layers 0-{layers - 1}, dark to light" if layers > 8 else None)
    else:
        steps, values = series(records, "max_logit", x)
        if not steps:
            return not_logged(ax, title, "not logged (the max logit is measured by QK-clip: --optimizer muonclip)")
        ax.plot(steps, values, color="tab:red", label="max over layers")
    _, taus = series(records, "qk_clip_tau", x)
    if taus:
        ax.axhline(taus[-1], color="black", linestyle="--", linewidth=1, label=f"QK-clip tau = {taus[-1]:g}")
    ax.set(title=title, ylabel="max q.k logit over heads")
    ax.legend(fontsize="small")


def figure(records: list[dict], title: str = ""):
    """The dashboard of one run's records, as a matplotlib figure (module docstring)."""
    plt = pyplot()
    x = step_key(records)
    fig, axes = plt.subplots(3, 2, figsize=(13, 11), dpi=110)
    (loss, lr), (grad, speed), (load, logits) = axes
    _loss(loss, records, x)
    _line(lr, records, x, "lr", "learning rate", "learning rate")
    _line(grad, records, x, "grad_norm", "gradient norm", "global L2 norm, before clipping", log=True)
    _throughput(speed, records, x)
    _expert_load(fig, load, records, x)
    _max_logits(logits, records, x)
    skipped = [r[x] for r in records if r.get("skipped") is True and x in r]
    for ax in (loss, lr, grad, speed, logits):
        if ax.has_data():
            for i, step in enumerate(skipped):
                ax.axvline(step, color="red", alpha=0.6, linewidth=0.8, label=None if i else "skipped step")
    if skipped and loss.has_data():
        loss.legend()
    for ax in axes.flat:
        if ax.has_data():
            ax.set_xlabel(X_LABELS[x])
        if ax.has_data() and ax is not load:
            ax.grid(alpha=0.3)
    fig.suptitle(title + (f"  ({len(skipped)} skipped step(s))" if skipped else ""))
    return fig


def write_dashboard(run: Path) -> Path:
    """<run>/dashboard.png from <run>/metrics.jsonl; returns its path."""
    run = Path(run)
    png = run / "dashboard.png"
    save(figure(read_metrics(run / "metrics.jsonl"), title=run_title(run)), png)
    return png
