"""The routed-expert FFN: routing metadata, the Triton grouped GEMMs (forward, SwiGLU backward, weight
gradients), the combine, their autograd Function, the per-stage choice against torch._grouped_mm, the CPU
grouped-GEMM path and the PyTorch reference (`reference.py`), the oracle of all of them."""
