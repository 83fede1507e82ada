"""`python -m posttrain.rl`: the RL trainer (posttrain/rl/train.py)."""

from posttrain.rl.train import main

main()
