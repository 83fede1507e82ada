"""The activation-recompute modes (`--recompute`), named without importing torch: launch.plan checks
a layout's mode with them and stays a torch-free command; launch/parallel/recompute.py applies them."""

MODES = ("none", "selective", "full")
