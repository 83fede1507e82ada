"""Look at runs after the fact: `python -m launch.report RUN [RUN ...] [--out FILE.png]`.

One run: its dashboard (launch/metrics/dashboard.py) redrawn from its metrics.jsonl, into <run>/dashboard.png
unless --out names another file. Several: one figure overlaying them (train and validation loss,
gradient norm, max attention logit, tokens/s), each run named by its directory and its optimizer
(from its config.yaml), into ./report.png unless --out names another file, and the table of their
final figures as JSON beside it (report.json). The table is printed in both cases:

    final train / val loss   the last logged value (train: one step's loss, not smoothed)
    steps                    the last step (RL: iteration) logged
    tokens/s                 the median over logged steps: the first ones include compilation and warm-up
    max logit                the last max attention logit QK-clip measured (runs without QK-clip: -)

A run is a directory launch.train or posttrain.rl marked as theirs (launch/checkpoint/run_dir.py's run.json)
that holds a metrics.jsonl. A file already at an output path is replaced only if this tool or the
trainer wrote it; anything else is refused with exit status 2, as is a directory that is not a run.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from launch.metrics import dashboard

from launch.checkpoint import run_dir
from launch.config.flags import ConfigArgumentParser
from launch.metrics.log import MetricsError, ema, read_metrics
from launch.runtime import run_cli
from moe.config import ConfigError

KIND = "kimi-moe report"  # the JSON table's "kind": a file that has it is ours to replace
# (key in a table row, column heading)
COLUMNS = [("run", "run"), ("optimizer", "optimizer"), ("steps", "steps"), ("final_train_loss", "train loss"),
           ("final_val_loss", "val loss"), ("tokens_per_s", "tokens/s"), ("max_logit", "max logit")]


def load_run(path: str) -> list[dict]:
    """The records of the run at `path`; ConfigError if it is not a run with metrics."""
    run = Path(path)
    if not run.is_dir():
        raise ConfigError(f"{path!r} is not a directory; pass run directories (what launch.train's --out-dir names)")
    if not run_dir.is_ours(run):
        raise ConfigError(f"{path!r} is not a run: it has no {run_dir.MARKER} written by launch.train or "
                          "posttrain.rl; pass a run directory such as runs/small-<time>")
    if not (run / "metrics.jsonl").is_file():
        raise ConfigError(f"{path!r} is a run without metrics.jsonl: it has not logged anything yet")
    try:
        return read_metrics(run / "metrics.jsonl")
    except MetricsError as err:
        raise ConfigError(str(err)) from None


def final_figures(run: Path, label: str, records: list[dict]) -> dict:
    """One row of the table (module docstring)."""
    x = dashboard.step_key(records)

    def last(key):
        values = dashboard.series(records, key, x)[1]
        return values[-1] if values else None

    tokens = dashboard.series(records, "tokens_per_s", x)[1]
    return {"run": label, "path": str(run), "optimizer": dashboard.run_config(run).get("optimizer"),
            "steps": max((r[x] for r in records if isinstance(r.get(x), int)), default=0),
            "final_train_loss": last("lm_loss"), "final_val_loss": last("val_loss"),
            "tokens_per_s": statistics.median(tokens) if tokens else None, "max_logit": last("max_logit")}


def labels(runs: list[Path]) -> list[str]:
    """Each run's directory name; its path where two runs share a name."""
    names = [run.name for run in runs]
    return [name if names.count(name) == 1 else str(run) for name, run in zip(names, runs)]


def cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict]) -> str:
    table = [[heading for _, heading in COLUMNS]] + [[cell(row[key]) for key, _ in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table)


def overlay_figure(runs: dict[str, list[dict]], rows: list[dict]):
    """runs: legend label -> records. One panel per figure, every run a line of its own colour."""
    plt = dashboard.pyplot()
    fig, axes = plt.subplots(3, 2, figsize=(13, 11), dpi=110)
    (train, val), (grad, logit), (speed, table) = axes
    panels = [(train, "lm_loss", "train loss (EMA 0.9)", "cross-entropy (nats/token)"),
              (val, "val_loss", "validation loss", "cross-entropy (nats/token)"),
              (grad, "grad_norm", "gradient norm", "global L2 norm, before clipping"),
              (logit, "max_logit", "max attention logit (QK-clip runs)", "max q.k logit over heads and layers"),
              (speed, "tokens_per_s", "throughput", "tokens/s (all processes)")]
    x_keys = {dashboard.step_key(records) for records in runs.values()}
    for ax, key, title, ylabel in panels:
        for i, (label, records) in enumerate(runs.items()):
            steps, values = dashboard.series(records, key, dashboard.step_key(records))
            if steps:
                values = ema(values, 0.9) if key == "lm_loss" else values
                ax.plot(steps, values, "o-" if key == "val_loss" else "-", color=f"C{i}", label=label, markersize=3)
        if not ax.has_data():
            dashboard.not_logged(ax, title, "not logged by any of these runs")
            continue
        ax.set(title=title, ylabel=ylabel, xlabel=" / ".join(dashboard.X_LABELS[k] for k in sorted(x_keys)))
        if key == "grad_norm":
            dashboard.log_scale_if_spiky(ax, [v for line in ax.get_lines() for v in line.get_ydata()])
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    table.axis("off")
    table.set_title("final figures")
    grid = table.table(cellText=[[cell(row[key]) for key, _ in COLUMNS] for row in rows],
                       colLabels=[heading for _, heading in COLUMNS], loc="center")
    grid.auto_set_font_size(False)
    grid.set_fontsize(8)
    fig.suptitle(f"{len(runs)} runs: " + ", ".join(runs))
    return fig


def refuse_foreign(path: Path) -> None:
    """ConfigError if `path` holds a file neither this tool nor the trainer wrote."""
    if not path.exists():
        return
    if path.suffix == ".png":
        ours = dashboard.is_ours(path)
    else:
        try:
            ours = json.loads(path.read_text()).get("kind") == KIND
        except (OSError, ValueError, AttributeError):
            ours = False
    if not ours:
        raise ConfigError(f"{str(path)!r} exists and was not written by launch.report or launch.train; "
                          "nothing was overwritten: pass another --out, or move that file")


def build_parser() -> ConfigArgumentParser:
    parser = ConfigArgumentParser(prog="python -m launch.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (launch.train's --out-dir)")
    parser.add_argument("--out", help="PNG to write (default: RUN/dashboard.png for one run, ./report.png for "
                                      "several; their table goes beside it as .json)")
    return parser


def report(argv: list[str] | None = None) -> list[dict]:
    """Write what the module docstring says; returns the table's rows."""
    args = build_parser().parse_args(argv)
    paths = list(dict.fromkeys(Path(p) for p in args.runs))  # a run named twice is one run
    records = [load_run(str(p)) for p in paths]
    out = Path(args.out) if args.out else paths[0] / "dashboard.png" if len(paths) == 1 else Path("report.png")
    if out.suffix != ".png":
        raise ConfigError(f"--out {str(out)!r} must name a .png file")
    table_path = out.with_suffix(".json") if len(paths) > 1 else None
    for path in (out, table_path):
        if path is not None:
            refuse_foreign(path)
    names = labels(paths)
    rows = [final_figures(p, name, r) for p, name, r in zip(paths, names, records)]
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(paths) == 1:
        dashboard.save(dashboard.figure(records[0], title=dashboard.run_title(paths[0])), out)
    else:
        legend = [f"{name} ({row['optimizer']})" if row["optimizer"] else name for name, row in zip(names, rows)]
        dashboard.save(overlay_figure(dict(zip(legend, records)), rows), out)
        table_path.write_text(json.dumps({"kind": KIND, "runs": rows}, indent=2) + "\n")
    print(format_table(rows))
    print(f"wrote {out}" + (f" and {table_path}" if table_path else ""), file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda: report(argv))  # a bad argument: one line and status 1, as every command here


if __name__ == "__main__":
    main()
