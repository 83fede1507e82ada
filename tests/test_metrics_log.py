"""MetricsLog, the one metrics writer: metrics.jsonl and TensorBoard events hold the same figures, read
back with TensorBoard's own reader; a damaged metrics.jsonl is read as far as a crash explains it."""

import json
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch.metrics.log import MetricsError, MetricsLog, read_metrics
from moe.config import ConfigError


def events(run_dir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard itself reads <run>/tensorboard."""
    reader = EventAccumulator(str(run_dir / "tensorboard"))
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def f32(value: float) -> float:
    return float(np.float32(value))  # TensorBoard keeps scalars as float32


# Records shaped like launch.train's: per-layer lists, a skipped step (bool), and RL's nested dicts, a
# None and a string that have no scalar.
RECORDS = [
    {"step": 0, "val_loss": 5.5},
    {"step": 1, "lm_loss": 5.25, "router_max_over_mean": [1.5, 2.75], "max_logit_by_layer": [3.0, 7.5],
     "grad_norm": 0.1234567891},
    {"step": 2, "lm_loss": float("nan"), "grad_norm": float("inf"), "skipped": True},
    {"step": 3, "lm_loss": 4.0, "router_max_over_mean": [1.25, 2.0], "heldout_by_difficulty": {"1": 0.5, "2": 0.25},
     "heldout_correct_tokens": None, "note": "text"},
]
EXPECTED = {
    "val_loss": [(0, 5.5)],
    "lm_loss": [(1, 5.25), (2, float("nan")), (3, 4.0)],
    "router_max_over_mean/layer_0": [(1, 1.5), (3, 1.25)],
    "router_max_over_mean/layer_1": [(1, 2.75), (3, 2.0)],
    "max_logit_by_layer/layer_0": [(1, 3.0)],
    "max_logit_by_layer/layer_1": [(1, 7.5)],
    "grad_norm": [(1, f32(0.1234567891)), (2, float("inf"))],
    "skipped": [(2, 1.0)],
    "heldout_by_difficulty/1": [(3, 0.5)],
    "heldout_by_difficulty/2": [(3, 0.25)],
}


def test_events_hold_the_jsonl_figures(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for record in RECORDS:
        log.write(record)
    log.close()
    got = events(tmp_path)
    assert got.keys() == EXPECTED.keys()
    for tag, points in EXPECTED.items():
        np.testing.assert_array_equal(np.array(got[tag]), np.array(points), err_msg=tag)
    # metrics.jsonl keeps the records as they were given, lists and dicts included
    back = read_metrics(tmp_path / "metrics.jsonl")
    assert json.dumps(back) == json.dumps(RECORDS)


def test_rl_records_use_iteration_as_x(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", step_key="iteration")
    log.write({"iteration": 0, "heldout_accuracy": 0.25})
    log.write({"iteration": 1, "reward": 0.5, "heldout_accuracy": 0.75})
    log.close()
    assert events(tmp_path) == {"heldout_accuracy": [(0, 0.25), (1, 0.75)], "reward": [(1, 0.5)]}
    with pytest.raises(ValueError, match="integer 'iteration'"):
        MetricsLog(tmp_path / "other.jsonl", step_key="iteration").write({"step": 3, "reward": 1.0})


def test_tensorboard_off_writes_only_jsonl(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=False)
    log.write({"step": 1, "lm_loss": 2.0})
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_resume_hides_the_redone_steps_of_the_killed_attempt(tmp_path):
    first = MetricsLog(tmp_path / "metrics.jsonl", first_step=0)
    for step in range(6):
        first.write({"step": step, "lm_loss": 10.0 + step})
    first.close()
    # resumed from the checkpoint at step 4: step 5 is trained again, with another loss (TensorBoard's own
    # out-of-order purge would not catch it: the steps never go backwards)
    again = MetricsLog(tmp_path / "metrics.jsonl", first_step=5)
    for step in range(5, 9):
        again.write({"step": step, "lm_loss": 20.0 + step})
    again.close()
    assert events(tmp_path)["lm_loss"] == [(s, 10.0 + s) for s in range(5)] + [(s, 20.0 + s) for s in range(5, 9)]


def test_wandb_asked_for_but_missing_is_a_clear_error_before_any_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError, as when not installed
    with pytest.raises(ConfigError, match=r"wandb = true, but the wandb package is not installed: `pip install wandb`"):
        MetricsLog(tmp_path / "metrics.jsonl", wandb=True)
    assert list(tmp_path.iterdir()) == []


def test_wandb_offline_run_gets_the_scalars(tmp_path):
    wandb = pytest.importorskip("wandb")
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=False, wandb=True)
    log.write({"step": 1, "lm_loss": 5.25, "router_max_over_mean": [1.5, 2.75]})
    log.close()
    wandb.teardown()  # the W&B service writes the run file in its own process; at exit it has written it
    (stored,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    data = stored.read_bytes()  # protobuf records: keys and JSON values are stored as plain text
    for text in (b"lm_loss", b"5.25", b"router_max_over_mean/layer_1", b"2.75"):
        assert text in data, text


def test_truncated_last_line_is_skipped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "lm_loss": 3.0}\n{"step": 2, "lm_loss": 2.5}\n{"step": 3, "lm_lo')
    assert read_metrics(path) == [{"step": 1, "lm_loss": 3.0}, {"step": 2, "lm_loss": 2.5}]
    warning = capsys.readouterr().err
    assert f"{path} line 3 is not a complete record" in warning
    # a last line damaged into something that is not a record (a bare number), then blank lines
    path.write_text('{"step": 1}\n17\n\n')
    assert read_metrics(path) == [{"step": 1}]
    assert f"{path} line 2" in capsys.readouterr().err


def test_damaged_line_before_the_last_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2, "lm_l\x00\x00\n{"step": 3}\n')
    with pytest.raises(MetricsError, match=rf"{path} line 3 is not a JSON record"):
        read_metrics(path)
