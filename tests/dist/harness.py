"""Launch a script under `torchrun` on CPU (gloo) from a test, on a free port, and read its results.

Scripts in tests/dist/ write one JSON file per rank into the directory passed as their first argument;
`torchrun_json` returns those records, rank-ordered.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def tiny_train_flags(tmp_path: Path, out: Path, micro_batch_size: int = 4) -> list[str]:
    """`launch.train` flags for a seconds-long run: the tiny preset on 400 kB of stdlib bytes, 64-token sequences."""
    return ["--model", "tiny", "--data.tokenizer", "bytes", "--data.max_bytes", "400000",
            "--data.cache_dir", str(tmp_path / "cache"), "--seq-len", "64",
            "--micro-batch-size", str(micro_batch_size), "--out-dir", str(out)]


def tiny_chat_base_flags(root: Path, out: Path) -> list[str]:
    """`launch.train` flags for a seconds-long pretraining run of the tiny preset whose BPE has the chat tokens."""
    return ["--model", "tiny", "--data.vocab_size", "400", "--data.max_bytes", "300000",
            "--data.cache_dir", str(root / "cache"), "--seq-len", "64", "--micro-batch-size", "8",
            "--steps", "10", "--eval-every", "10", "--eval-batches", "1", "--out-dir", str(out)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, timeout: float = 300, env: dict | None = None, check: bool = True):
    """Run `torchrun --nproc_per_node nproc ARGS...` from the repository root; returns CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-8000:]}")
    return proc


def torchrun_json(script: str, out_dir: Path, *args: str, nproc: int = 2, timeout: float = 300) -> list[dict]:
    """Run tests/dist/SCRIPT OUT_DIR ARGS... and return the per-rank JSON records it wrote."""
    torchrun([str(REPO / "tests" / "dist" / script), str(out_dir), *args], nproc=nproc, timeout=timeout)
    return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(nproc)]


def write_result(out_dir: str, rank: int, record: dict) -> None:
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
