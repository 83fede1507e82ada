"""Rollouts: k responses per prompt from the policy's own sampler, grown across iterations if need be.

Shape legend: L MoE layers, P prompt tokens, n response tokens, K experts per token.

A `Sample` is one response in the making. Each iteration `grow` extends every unfinished sample by
up to `segment` tokens (moe.generate, batched, through MLA's compressed cache) and ends it when it
writes a stop token ("stop"), reaches the response budget ("length": K2's truncated responses),
or falls into a loop ("repeat": the same block of at most `loop_period` tokens `loop_repeats` times
in a row, found by rewards.loop_period and cut there). With segment < budget these are k1.5's
partial rollouts (§2.6.2): a long response does not hold up an iteration; it waits in the buffer
and continues in the next one from where it stopped.

Every sample draws with its own seed through `sequence_seeds`, so its token at position p depends on
(seed, p) and the model alone: a response continued over two iterations is, token for token, the
one an uninterrupted call gives with the same weights, and a sample's tokens do not depend on
which batch or which process drew it (a 2-process run samples what a 1-process run samples).

Multi-turn tasks (a tool loop) give GrowSettings an `environment`: when a sample ends a turn
(writes a stop token), `environment.respond(sample, turn)` either ends the episode (None: the
sample is finished, "stop") or returns the ids to append, e.g. the results of the tools the turn
called and the next turn's <|im_assistant|> header, and the sample goes on writing in the same
call's loop. Those ids are the environment's, not the model's: `from_model` marks them False, the
objective takes no loss on them, and lengths count the model's tokens only. The budget counts
every token after the prompt (they all fill the context); a turn whose results would reach it
ends the sample, "length". The segment counts the model's tokens: what decoding costs.

Kept per token, for training: the sampling model's log-probability (temperature 1) and, for routing
replay, the experts each position was routed to when it was fed, [L, P + n - 1, K] (the inputs of a
teacher-forced forward over prompt + response[:-1]). A continued sample's routing joins the two
calls: the first call's positions, then the second's from the first position the first one did
not feed (its last drawn token, then any ids an environment appended).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Protocol

import torch

from moe.generate import generate
from moe.model import Transformer
from posttrain.rl.rewards import loop_period

FINISHED = ("stop", "length", "repeat")


@dataclass
class Sample:
    problem: int  # index of the problem in the task's training pool
    seed: int  # of its draws (moe.generate sequence_seeds)
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # the sampling model's log p of each token (temperature 1)
    routing: torch.Tensor | None = None  # int64 [L, P + n - 1, K], when recorded
    finish: str | None = None  # None until finished; then one of FINISHED
    segments: int = 0  # iterations that sampled it
    from_model: list[bool] = field(default_factory=list)  # per token: drawn by the model (False: an environment's)
    episode: dict | None = None  # a multi-turn task's state (posttrain/executor.py's episode), plain data

    @property
    def model_tokens(self) -> int:
        """How many of the tokens the model drew: the response length rewards and figures count."""
        return sum(self.from_model)

    @property
    def turn_start(self) -> int:
        """Index in `tokens` of the first token of the turn being written (after the environment's last ids)."""
        i = len(self.tokens)
        while i > 0 and self.from_model[i - 1]:
            i -= 1
        return i

    def state(self) -> dict:
        """The sample as checkpoint state (tensors and plain data only)."""
        return {"problem": self.problem, "seed": self.seed, "prompt": self.prompt, "tokens": self.tokens,
                "logprobs": self.logprobs, "routing": self.routing, "finish": self.finish, "segments": self.segments,
                "from_model": self.from_model, "episode": self.episode}

    @classmethod
    def from_state(cls, state: dict) -> "Sample":
        state = dict(state)
        state.setdefault("from_model", [True] * len(state["tokens"]))  # checkpoints of single-turn runs before it
        return cls(**state)


@dataclass
class Group:
    """A prompt's k samples: trained on together once all are finished (their rewards share a mean)."""

    problem: int
    samples: list[Sample]

    @property
    def finished(self) -> bool:
        return all(s.finish is not None for s in self.samples)

    def state(self) -> dict:
        return {"problem": self.problem, "samples": [s.state() for s in self.samples]}

    @classmethod
    def from_state(cls, state: dict) -> "Group":
        return cls(state["problem"], [Sample.from_state(s) for s in state["samples"]])


def new_group(problem: int, prompt: list[int], k: int, seed: int, episode: dict | None = None) -> Group:
    """k fresh samples of one prompt; sample j draws with seed + j; each gets its own copy of `episode`."""
    return Group(problem, [Sample(problem, seed + j, list(prompt), episode=copy.deepcopy(episode)) for j in range(k)])


class Environment(Protocol):
    def respond(self, sample: Sample, turn: list[int]) -> list[int] | None:
        """After the model's turn `turn` (ending in a stop token): None ends the episode, else the ids
        to append before the model writes again. May update sample.episode."""


@dataclass
class GrowSettings:
    budget: int  # max response tokens
    segment: int  # tokens a sample may grow by in one call (budget: whole responses)
    temperature: float
    top_p: float | None
    stop_tokens: tuple[int, ...]
    loop_period: int  # 0: no loop detection
    loop_repeats: int
    record_routing: bool
    batch_size: int
    environment: Environment | None = None  # multi-turn tasks: what answers the end of a turn


def grow(model: Transformer, samples: list[Sample], settings: GrowSettings) -> int:
    """Extend every unfinished sample by up to settings.segment tokens of its own; returns the tokens drawn.

    Samples are batched by how many tokens they may still take (equal for all but the last
    segment), then by prompt length, batch_size per generate call. A multi-turn sample whose turn
    ended and whose environment answered goes round again, until it finishes or uses its segment.
    """
    grown = {id(s): 0 for s in samples}
    live = [s for s in samples if s.finish is None]
    drawn = 0
    while live:
        by_room: dict[int, list[Sample]] = {}
        for s in live:
            by_room.setdefault(min(settings.segment - grown[id(s)], settings.budget - len(s.tokens)), []).append(s)
        for room, group in by_room.items():
            group.sort(key=lambda s: len(s.prompt) + len(s.tokens))
            for start in range(0, len(group), settings.batch_size):
                batch = group[start : start + settings.batch_size]
                out = generate(model, [s.prompt + s.tokens for s in batch], room, settings.temperature,
                               top_p=settings.top_p, stop_tokens=settings.stop_tokens,
                               return_routing=settings.record_routing, sequence_seeds=[s.seed for s in batch])
                for b, s in enumerate(batch):
                    drawn += len(out.tokens[b])
                    grown[id(s)] += len(out.tokens[b])
                    _extend(s, out.tokens[b], out.model_logprobs[b], None if out.routing is None else out.routing[b],
                            out.finish_reasons[b], settings)
                    if s.finish == "stop" and settings.environment is not None:
                        _respond(s, settings)
        live = [s for s in live if s.finish is None and grown[id(s)] < settings.segment]
    for s in samples:
        s.segments += grown[id(s)] > 0
    return drawn


def _extend(s: Sample, tokens: list[int], logprobs: list[float], routing, reason: str, settings: GrowSettings) -> None:
    start = len(s.tokens)
    if routing is not None:
        # Positions the earlier calls fed, then this call's from the first one they did not.
        s.routing = routing if s.routing is None else torch.cat([s.routing, routing[:, s.routing.shape[1]:]], dim=1)
    s.tokens += tokens
    s.logprobs += logprobs
    s.from_model += [True] * len(tokens)
    if settings.loop_period:
        for end in range(start + 1, len(s.tokens) + 1):
            if loop_period(s.tokens[:end], settings.loop_period, settings.loop_repeats) is not None:
                _cut(s, end)
                s.finish = "repeat"
                return
    if reason == "stop":
        s.finish = "stop"
    elif len(s.tokens) >= settings.budget:
        s.finish = "length"


def _respond(s: Sample, settings: GrowSettings) -> None:
    """The environment's answer to a finished turn: the episode ends ("stop" stays), or its ids are
    appended and the sample writes on; ids that would reach the budget end it, "length"."""
    ids = settings.environment.respond(s, s.tokens[s.turn_start :])
    if ids is None:
        return
    if len(s.tokens) + len(ids) >= settings.budget:
        s.finish = "length"
        return
    s.tokens += ids
    s.logprobs += [0.0] * len(ids)
    s.from_model += [False] * len(ids)
    s.finish = None


def _cut(s: Sample, n: int) -> None:
    s.tokens, s.logprobs, s.from_model = s.tokens[:n], s.logprobs[:n], s.from_model[:n]
    if s.routing is not None:
        s.routing = s.routing[:, : len(s.prompt) + n - 1]
