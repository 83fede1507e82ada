"""Two "nodes" on this machine: two torchrun agents of 2 processes each train as one world of 4.

Each agent is started the way docs/operators.md starts one per node (`--nnodes 2`), once with the
static rendezvous (`--node-rank` and the master address, what the deepspeed launcher sets up) and
once with the c10d rendezvous (no node rank). The run is tiny with EP 2 and ZeRO-1, so the experts,
the expert-data-parallel reduction and ZeRO's partitions all span both nodes. The control is one
agent of 4 processes on the same config: ranks, data shards and groups are the same, so every
logged loss must be too.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from harness import REPO, free_port, tiny_train_flags, torchrun  # noqa: E402

STEPS = 3


def train_flags(tmp_path: Path, out: Path) -> list[str]:
    return ["-m", "launch.train", *tiny_train_flags(tmp_path, out), "--steps", str(STEPS), "--eval-every", str(STEPS),
            "--eval-batches", "1", "--checkpoint-every", "0", "--tensorboard", "false",
            "--zero-stage", "1", "--ep-size", "2"]


def losses(out: Path) -> list[tuple]:
    """(step, name, value) of every loss rank 0 logged."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], k, r[k]) for r in records for k in ("lm_loss", "val_loss") if k in r]


def two_agents(rendezvous: str, args: list[str], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Start torchrun twice (node ranks 0 and 1, 2 processes each) on one port and wait for both.
    If either fails or hangs, the other is stopped too (it would wait for its peer until the timeout)."""
    port = free_port()
    if rendezvous == "static":
        join = lambda node: ["--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port)]
    else:
        join = lambda node: ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                                *join(node), *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
              for node in (0, 1)]
    done = []
    try:
        for agent in agents:
            stdout, stderr = agent.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr))
            if agent.returncode != 0:
                break
    except subprocess.TimeoutExpired:
        pass
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)  # the agent's own session: it and its 2 workers
                agent.wait()
    for node, proc in enumerate(done):
        assert proc.returncode == 0, f"node {node} exited with {proc.returncode}\n{proc.stderr[-6000:]}"
    assert len(done) == 2, f"a node did not finish within {timeout} s"
    return done


@pytest.fixture(scope="module")
def one_node(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("one_node")
    torchrun(train_flags(root, root / "run"), nproc=4)
    return root / "run"


@pytest.mark.distributed
@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_nodes_train_like_one_node_of_four(tmp_path, one_node, rendezvous):
    out = tmp_path / "run"  # one directory for both nodes, as a shared filesystem would be
    procs = two_agents(rendezvous, train_flags(tmp_path, out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["world_size"] == 4 and summary["steps"] == STEPS
    assert summary["skipped_steps"] == 0
    got, want = losses(out), losses(one_node)
    assert [(s, k) for s, k, _ in got] == [(s, k) for s, k, _ in want] and len(got) == STEPS + 2, (got, want)
    # Same ranks, tokens and gloo collectives: the losses agree to fp32 rounding (seen: exactly).
    for (step, name, a), (_, _, b) in zip(got, want):
        assert abs(a - b) <= 1e-6 * abs(b), (step, name, a, b)
    for node, proc in enumerate(procs):  # a clean exit: no worker died or was torn down
        assert "Traceback" not in proc.stderr and "SIGTERM" not in proc.stderr, (node, proc.stderr[-3000:])
