"""Session-wide test setup.

Without CUDA the Triton kernels run through the Triton interpreter, which must be switched on before
anything imports triton: DeepSpeed, transformers and torch's own modules may do so while other test
modules are collected, and kernels then come out compiled for a GPU we do not have.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
