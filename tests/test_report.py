"""What a run leaves to look at: TensorBoard events equal to its metrics.jsonl, the per-layer figures of
its step records, its dashboard (QK-clip on and off), and launch.report over one run and several."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch.metrics import dashboard

from launch.checkpoint import run_dir
from launch.config.training import parse_args
from launch.metrics.log import read_metrics
from launch.report import main
from launch.train import run

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from harness import REPO, tiny_train_flags  # noqa: E402

TAU = 50.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 8-step tiny runs: MuonClip (QK-clip at TAU) and AdamW (no QK-clip)."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--steps", "8", "--eval-every", "4", "--eval-batches", "1", "--warmup-steps", "2"]
    clip = ["--optimizer", "muonclip", "--optimizer-args", f"{{qk_clip_tau: {TAU}}}"]
    run(parse_args([*tiny_train_flags(root, root / "clip", micro_batch_size=8), *common, *clip]))
    run(parse_args([*tiny_train_flags(root, root / "adamw", micro_batch_size=8), *common]))
    return root / "clip", root / "adamw"


def panel(fig, title):
    (ax,) = [ax for ax in fig.axes if ax.get_title() == title]
    return ax


def test_event_files_equal_metrics_jsonl(runs):
    clip, _ = runs
    expected = {}
    for record in read_metrics(clip / "metrics.jsonl"):
        for key, value in record.items():
            if key == "step":
                continue
            items = [(f"{key}/layer_{i}", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
            for tag, v in items:
                expected.setdefault(tag, []).append((record["step"], float(np.float32(v))))  # TensorBoard keeps float32
    reader = EventAccumulator(str(clip / "tensorboard"))
    reader.Reload()
    got = {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}
    assert got == expected
    assert {"lm_loss", "val_loss", "max_logit_by_layer/layer_1", "router_max_over_mean/layer_0", "qk_clip_tau"} <= set(got)


def test_step_records_carry_per_layer_max_logits_and_tau(runs):
    clip, adamw = runs
    num_layers = dashboard.run_config(clip)["resolved_model"]["num_layers"]
    steps = [r for r in read_metrics(clip / "metrics.jsonl") if "lm_loss" in r]
    assert len(steps) == 8
    for r in steps:
        assert len(r["max_logit_by_layer"]) == num_layers
        assert max(r["max_logit_by_layer"]) == r["max_logit"]
        assert r["qk_clip_tau"] == TAU
    assert not any("max_logit" in r or "qk_clip_tau" in r for r in read_metrics(adamw / "metrics.jsonl"))


def test_dashboard_of_a_qk_clip_run(runs):
    clip, _ = runs
    assert dashboard.is_ours(clip / "dashboard.png") and (clip / "loss.png").is_file()
    records = read_metrics(clip / "metrics.jsonl")
    steps = [r for r in records if "lm_loss" in r]
    fig = dashboard.figure(records)
    logits = panel(fig, "max attention logit (before QK-clip)")
    lines = {line.get_label(): line for line in logits.get_lines()}
    assert list(lines[f"QK-clip tau = {TAU:g}"].get_ydata()) == [TAU, TAU]
    for layer in range(len(steps[0]["max_logit_by_layer"])):
        assert list(lines[f"layer {layer}"].get_xdata()) == [r["step"] for r in steps]
        assert list(lines[f"layer {layer}"].get_ydata()) == [r["max_logit_by_layer"][layer] for r in steps]
    (mesh,) = panel(fig, "expert load per MoE layer").collections
    np.testing.assert_array_equal(np.asarray(mesh.get_array()).reshape(len(steps[0]["router_max_over_mean"]), -1),
                                  np.array([r["router_max_over_mean"] for r in steps]).T)
    val = [line for line in panel(fig, "loss").get_lines() if line.get_label() == "validation"][0]
    assert list(val.get_xdata()) == [0, 4, 8]


def test_dashboard_of_a_run_without_qk_clip(runs):
    _, adamw = runs
    assert dashboard.is_ours(adamw / "dashboard.png")
    fig = dashboard.figure(read_metrics(adamw / "metrics.jsonl"))
    logits = panel(fig, "max attention logit (before QK-clip)")
    assert not logits.has_data() and "not logged" in logits.texts[0].get_text()
    assert panel(fig, "throughput").has_data() and panel(fig, "learning rate").has_data()


def test_dashboard_marks_skipped_steps_and_absent_figures():
    records = [{"step": 0, "val_loss": 5.0}, {"step": 1, "lm_loss": 4.0, "grad_norm": 1.0},
               {"step": 2, "lm_loss": float("nan"), "grad_norm": float("nan"), "skipped": True},
               {"step": 3, "lm_loss": 3.5, "grad_norm": 0.5}]
    fig = dashboard.figure(records, title="synthetic")
    marks = [line for line in panel(fig, "loss").get_lines() if line.get_label() == "skipped step"]
    assert [list(m.get_xdata()) for m in marks] == [[2, 2]]
    assert "1 skipped step(s)" in fig._suptitle.get_text()
    for title in ("learning rate", "throughput", "expert load"):
        assert panel(fig, title).texts[0].get_text() == "not logged"


def test_report_over_two_runs_writes_figure_and_table(runs, tmp_path, monkeypatch, capsys):
    clip, adamw = runs
    monkeypatch.chdir(tmp_path)
    main([str(clip), str(adamw)])
    assert dashboard.is_ours(tmp_path / "report.png")
    table = json.loads((tmp_path / "report.json").read_text())
    assert [(r["run"], r["optimizer"]) for r in table["runs"]] == [("clip", "muonclip"), ("adamw", "adamw")]
    for row, path in zip(table["runs"], runs):
        records = read_metrics(path / "metrics.jsonl")
        assert row["final_train_loss"] == [r["lm_loss"] for r in records if "lm_loss" in r][-1]
        assert row["final_val_loss"] == [r["val_loss"] for r in records if "val_loss" in r][-1]
        assert row["steps"] == 8
        assert row["tokens_per_s"] == float(np.median([r["tokens_per_s"] for r in records if "tokens_per_s" in r]))
    assert table["runs"][0]["max_logit"] == [r["max_logit"] for r in read_metrics(clip / "metrics.jsonl")
                                             if "max_logit" in r][-1]
    assert table["runs"][1]["max_logit"] is None
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["run", "optimizer", "steps", "train", "loss", "val", "loss", "tokens/s", "max", "logit"]
    assert [line.split()[:3] for line in printed[1:]] == [["clip", "muonclip", "8"], ["adamw", "adamw", "8"]]
    main([str(clip), str(adamw)])  # its own report.png and report.json are replaced
    assert json.loads((tmp_path / "report.json").read_text()) == table


def test_report_of_one_run_redraws_its_dashboard(runs, tmp_path, capsys):
    clip, _ = runs
    main([str(clip)])
    assert dashboard.is_ours(clip / "dashboard.png")
    assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["clip", "muonclip"]
    main([str(clip), "--out", str(tmp_path / "elsewhere" / "clip.png")])
    assert dashboard.is_ours(tmp_path / "elsewhere" / "clip.png") and not (tmp_path / "elsewhere" / "clip.json").exists()


def refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert isinstance(stop.value.code, str)  # run_cli's one line; the interpreter prints it, status 1
    return stop.value.code


def test_report_refuses_what_is_not_a_run_and_files_not_its_own(runs, tmp_path, capsys):
    clip, _ = runs
    (tmp_path / "plain").mkdir()
    assert "'" + str(tmp_path / "plain") + "' is not a run: it has no run.json" in refused([str(tmp_path / "plain")], capsys)
    assert "is not a directory" in refused([str(tmp_path / "missing")], capsys)
    marked = tmp_path / "marked"
    marked.mkdir()
    run_dir.mark(marked)
    assert "is a run without metrics.jsonl" in refused([str(marked)], capsys)
    (marked / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lm\n{"step": 3}\n')
    assert f"{marked / 'metrics.jsonl'} line 2 is not a JSON record" in refused([str(marked)], capsys)
    foreign = tmp_path / "mine.png"
    foreign.write_bytes(b"somebody's picture")
    assert "was not written by launch.report" in refused([str(clip), "--out", str(foreign)], capsys)
    assert foreign.read_bytes() == b"somebody's picture"
    assert "must name a .png file" in refused([str(clip), "--out", str(tmp_path / "x.pdf")], capsys)


def test_cli_exit_status_and_message_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch.report", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"config error: {str(tmp_path)!r} is not a run: it has no run.json written by "
                                   "launch.train or posttrain.rl; pass a run directory such as runs/small-<time>")
