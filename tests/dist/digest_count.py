"""`python -m MODULE ARGS...` under torchrun, with every SHA-256 a rank computes of a file under
SOURCE logged, one line per file hashed, in COUNTS/rank<r>.txt: which ranks read a source whole to
check it. Usage: torchrun ... digest_count.py SOURCE COUNTS MODULE ARGS..."""

import os
import runpy
import sys
from pathlib import Path

from launch.checkpoint import store

source, counts, module = Path(sys.argv[1]).resolve(), Path(sys.argv[2]), sys.argv[3]
log = counts / f"rank{os.environ['RANK']}.txt"
hash_file = store._digest


def counted(path):
    if Path(path).resolve().is_relative_to(source):
        with log.open("a") as f:
            f.write(f"{Path(path).name}\n")
    return hash_file(path)


counts.mkdir(parents=True, exist_ok=True)
log.touch()
store._digest = counted
sys.argv = [module, *sys.argv[4:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
