"""RMSNorm: the Triton kernel and its PyTorch reference (the model's definition, and the CPU path)."""
