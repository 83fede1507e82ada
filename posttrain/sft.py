"""Supervised fine-tuning: `python -m posttrain.sft --init-from SOURCE --data CONVERSATIONS.jsonl`
(console script `kimi-sft`).

SOURCE is a run directory, one of its checkpoints, or a Hugging Face directory with its tokenizer
(launch/checkpoint/pretrained.py); CONVERSATIONS is JSONL in the OpenAI messages layout (posttrain/conversations.py).
This is launch.train with other defaults, so everything the trainer does holds: one process,
torchrun or the deepspeed launcher, ZeRO 1/2/3, expert parallelism, metrics.jsonl and loss.png,
crash-safe checkpoints, `--resume --out-dir RUN`, export. What SFT sets:

- data.format = "chat": conversations rendered in our chat format, the loss on the assistant's
  tokens only (its text, tool calls and closing <|im_end|>), packed several to a row with
  per-document attention (posttrain/sft_data.py);
- MuonClip by default, as Kimi K2 (any optimizer of the registry with --optimizer);
- a shorter warmup and a lower peak lr than pretraining: the weights are already trained.

Every other field and flag is launch.train's (`--help`), e.g. `--steps 300 --seq-len 512`.
"""

from __future__ import annotations

from launch import train
from launch.config.training import parse_args
from moe.config import ConfigError

DEFAULTS = {
    "data": {"format": "chat"},
    "optimizer": "muonclip",
    "lr": 1e-3,
    "warmup_steps": 10,
    "weight_decay": 0.0,
    "steps": 300,
    "micro_batch_size": 8,
    "seq_len": 512,
    "eval_every": 50,
    "checkpoint_every": 100,
}
HELP = ("python -m posttrain.sft", "Fine-tune a trained model on conversations (assistant-only loss, packed "
        "rows with per-document attention, MuonClip). Needs --init-from SOURCE and --data FILE.jsonl.")


def parse(argv: list[str] | None = None):
    cfg = parse_args(argv, DEFAULTS, HELP)
    if cfg.init_from is None:
        raise ConfigError("--init-from is required: the run directory, checkpoint or Hugging Face directory to fine-tune")
    return cfg


def main(argv: list[str] | None = None) -> None:
    train.main(argv, parse)


if __name__ == "__main__":
    main()
