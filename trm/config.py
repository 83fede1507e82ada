"""The Tiny Recursive Model's typed config and its presets.

Defaults are the paper's (arXiv 2510.04871 §4-5): one network of 2 layers, hidden 512, 8 heads,
applied recursively, T = 3 recursions of n = 6 latent steps each, up to N_sup = 16 supervision
steps with a halting head, stable-max cross-entropy, weight EMA 0.999. Presets set what a task
needs; `tiny-*` presets are sized for a CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moe.config import ConfigError, check_field_types, doc_field

MIXERS = ("attention", "mlp")
LOSSES = ("stablemax", "softmax")


@dataclass
class TRMConfig:
    """Dimension letters in trm/: B batch, L sequence (puzzle cells, plus prefix positions), D hidden, V vocab."""

    vocab_size: int = doc_field(10, "input/output tokens (set by the data: blank and digits, or colours and pad)")
    seq_len: int = doc_field(81, "cells per puzzle (set by the data: 81 for Sudoku 9x9, 900 for 30x30 grids)")
    hidden_size: int = doc_field(512, "width D of the network")
    num_layers: int = doc_field(2, "layers of the one network f")
    num_heads: int = doc_field(8, "attention heads (mixer = attention)")
    intermediate_size: int = doc_field(1536, "SwiGLU width of each layer's feed-forward")
    mixer: str = doc_field("attention", "how positions mix: attention (self-attention, RoPE) or mlp (an MLP over "
                                        "the sequence, TRM-MLP: best for Sudoku's fixed 81 cells)")
    rope_theta: float = doc_field(10000.0, "RoPE base (mixer = attention)")
    norm_eps: float = doc_field(1e-5, "RMSNorm epsilon")
    T: int = doc_field(3, "recursions per supervision step; the first T - 1 run without gradient")
    n: int = doc_field(6, "latent steps z <- f(x + y + z) per recursion, each followed by y <- f(y + z)")
    n_sup: int = doc_field(16, "supervision steps per example (deep supervision); evaluation runs all of them")
    halting: bool = doc_field(True, "adaptive halting in training: an example leaves the batch when its halting "
                                    "head says its answer is right (false: every example takes n_sup steps)")
    halt_exploration: float = doc_field(0.1, "probability that an example must take a random minimum number of "
                                             "steps before it may halt (exploration, as the reference code)")
    q_loss_weight: float = doc_field(0.5, "weight of the halting head's binary cross-entropy")
    loss: str = doc_field("stablemax", "output loss: stablemax (stable-max cross-entropy, as the reference code) "
                                       "or softmax")
    ignore_token: int = doc_field(-1, "target token that takes no loss and is not scored (set by the data: ARC's pad); "
                                      "-1: none")
    puzzle_ids: int = doc_field(0, "distinct puzzle identifiers with an embedding each (ARC); 0: none")
    puzzle_emb_len: int = doc_field(0, "prefix positions the puzzle embedding fills (ARC: 16); 0: none")
    preset: str | None = doc_field(None, "the preset these values came from (a label)")

    def __post_init__(self):
        check_field_types(self)
        for name in ("vocab_size", "seq_len", "hidden_size", "num_layers", "num_heads", "intermediate_size", "T", "n",
                     "n_sup"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TRMConfig.{name} = {getattr(self, name)} must be >= 1")
        if self.mixer not in MIXERS:
            raise ConfigError(f"TRMConfig.mixer = {self.mixer!r}; valid: {', '.join(MIXERS)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"TRMConfig.loss = {self.loss!r}; valid: {', '.join(LOSSES)}")
        if self.mixer == "attention" and (self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2):
            raise ConfigError(f"TRMConfig.hidden_size = {self.hidden_size} must split into num_heads = "
                              f"{self.num_heads} heads of an even width (RoPE rotates pairs)")
        if not 0 <= self.halt_exploration <= 1:
            raise ConfigError(f"TRMConfig.halt_exploration = {self.halt_exploration} must be in [0, 1]")
        if self.q_loss_weight < 0 or self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ConfigError("TRMConfig.q_loss_weight must be >= 0 and rope_theta, norm_eps > 0")
        if self.puzzle_ids < 0 or self.puzzle_emb_len < 0 or (self.puzzle_ids > 0) != (self.puzzle_emb_len > 0):
            raise ConfigError(f"TRMConfig.puzzle_ids = {self.puzzle_ids} and puzzle_emb_len = {self.puzzle_emb_len}: "
                              "both 0 (no puzzle embedding) or both >= 1")

    @property
    def positions(self) -> int:
        """L: the prefix of puzzle-embedding positions, then the cells."""
        return self.puzzle_emb_len + self.seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    # The paper's: TRM-MLP on Sudoku-Extreme (87.4%), self-attention on Maze-Hard (85.3%) and ARC.
    "trm-sudoku-mlp": {"mixer": "mlp", "vocab_size": 10, "seq_len": 81},
    "trm-maze-att": {"mixer": "attention", "vocab_size": 6, "seq_len": 900},
    "trm-arc-att": {"mixer": "attention", "vocab_size": 12, "seq_len": 900, "puzzle_ids": 1, "puzzle_emb_len": 16},
    # CPU: narrow, fewer supervision steps; the recursion (T, n) is the paper's.
    "tiny-sudoku-mlp": {"mixer": "mlp", "vocab_size": 7, "seq_len": 36, "hidden_size": 128, "intermediate_size": 384,
                        "num_heads": 4, "n_sup": 8},
    "tiny-sudoku-att": {"mixer": "attention", "vocab_size": 7, "seq_len": 36, "hidden_size": 128,
                        "intermediate_size": 384, "num_heads": 4, "n_sup": 8},
}


def preset(name: str, **overrides) -> TRMConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset = {name!r}; valid: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TRMConfig)}
    if unknown := sorted(set(overrides) - fields):
        raise ConfigError(f"unknown TRMConfig field {unknown[0]!r}; valid: {', '.join(sorted(fields))}")
    return TRMConfig(**{**PRESETS[name], **overrides, "preset": name})
