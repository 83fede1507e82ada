"""benchmarks/gpu_session.sh is what a lent GPU runs, once, in a few scarce minutes; what can go wrong
with it without a GPU is checked here: a misspelt step must fail before anything runs, the budget
must skip what no longer fits and say so, and with $OUT set everything must come back as one archive
plus a readable summary (the device tool returns 8 files at most)."""

import os
import re
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


def run(tmp_path, *steps, budget=None):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path)}
    if budget is not None:
        env["GPU_SESSION_BUDGET_S"] = str(budget)
    return subprocess.run(["bash", str(SCRIPT), *steps], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_unknown_step_fails_before_anything_runs(tmp_path):
    result = run(tmp_path, "imports", "tset")
    assert result.returncode == 2
    assert "unknown step 'tset'" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_no_budget_left_skips_steps_and_still_packs(tmp_path):
    result = run(tmp_path, "imports", "trm", budget=0)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["gpu-session.tar.gz", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert "== imports: skipped" in summary and "== trm: skipped" in summary
    assert re.search(r"torch \S+ triton \S+", summary), summary
    with tarfile.open(out / "gpu-session.tar.gz") as archive:
        names = {Path(n).name for n in archive.getnames()}
    assert {"gpu.txt", "summary.txt"} <= names
    assert not list(tmp_path.glob("gpu-session.*")), "the staging folder is left behind"

