"""The live tool loop as an RL task: the policy's calls run, their results come back, it answers.

The requests are posttrain/tasks.py's (the ones the tool-use SFT demo trains on): difficulty 1 is
a single call (calculator, unit conversion, city lookup, date arithmetic), difficulty 2 two calls,
the second built from the first one's result. A sample is a whole episode (posttrain/executor.py):
each time the model ends a turn, `ToolEnvironment` parses it, runs its calls through the executor
(malformed ones get an error result, as in evaluation) and appends the results, rendered in the
chat format, after the model's own tokens; the model then writes its next turn, up to max_turns.

The reward is the executor's verdict after the tools ran: 1 when the episode made the task's calls,
in order, with the right arguments, and its final answer states the result; 0 otherwise, with the
reason. The tool results and turn headers are the environment's tokens: no loss is taken on them.

The model keeps the ids it wrote (not a re-rendering of what was parsed from them): the objective
needs the log-probabilities of what was sampled, and a re-rendering may differ in spacing.
"""

from __future__ import annotations

from collections.abc import Sequence

from posttrain.chat import as_message, continuation_ids, parse_assistant
from posttrain.executor import check_max_turns, new_episode, score, take_turn
from posttrain.tasks import FAMILIES, make_tasks

DIFFICULTY = {"single": 1, "multi": 2}


def make_problems(n: int, seed: int, kinds: Sequence[str] = ("single", "multi"), declare_tools: bool = False,
                  split: str = "train") -> list[dict]:
    """`n` tool tasks from `split`, shared about evenly among `kinds` ("single", "multi"), each a
    posttrain.tasks task ({"id", "family", "messages": the request, "tools", "answer", "trajectory"})
    with "difficulty" (1 single, 2 multi) and "prompt" (the request's text). declare_tools: put the
    five tool schemas in every prompt (~830 tokens; match what the SFT model was trained with)."""
    if isinstance(kinds, str) or not kinds or any(k not in FAMILIES for k in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds = {kinds!r}; it must be a list of distinct kinds from {', '.join(FAMILIES)}")
    if not isinstance(declare_tools, bool):
        raise ValueError(f"declare_tools = {declare_tools!r}; it must be true or false")
    problems = []
    for j, kind in enumerate(kinds):
        count = n // len(kinds) + (j < n % len(kinds))
        for task in make_tasks(count, seed, kind, split, declare_tools):
            problems.append({**task, "difficulty": DIFFICULTY[kind], "prompt": task["messages"][0]["content"]})
    return problems


def verify(problem: dict, episode) -> tuple[float, str]:
    """(1.0, why) when the episode ran the task's calls with the right arguments and answered with the
    result; (0.0, what went wrong) otherwise. Never raises on what the model did."""
    if not isinstance(episode, dict) or "calls" not in episode:
        return 0.0, "no episode was played"
    s = score(problem, episode)
    if s["success"]:
        return 1.0, "right calls, right answer"
    if episode["final"] is None:
        return 0.0, f"never answered (stopped: {episode['stopped']}, {s['invalid_calls']} invalid calls)"
    if not s["called_right_tool"]:
        return 0.0, "did not call the right tools in order"
    if not s["right_arguments"]:
        return 0.0, "called the right tools with wrong arguments"
    return 0.0, f"the answer does not state {problem['answer']}"


class ToolEnvironment:
    """Answers the end of a turn in a multi-turn rollout (posttrain/rl/rollout.py's Environment)."""

    def __init__(self, tokenizer, max_turns: int):
        check_max_turns(max_turns)
        self.tokenizer, self.max_turns = tokenizer, max_turns

    def start(self, problem: dict) -> dict:
        """A fresh episode of `problem`, the state each of its samples carries."""
        return new_episode(problem)

    def respond(self, sample, turn: list[int]) -> list[int] | None:
        episode = sample.episode
        before = len(episode["messages"])
        take_turn(episode, as_message(parse_assistant(turn, self.tokenizer)), self.max_turns)
        if episode["stopped"] is not None:
            return None
        # The tool messages take_turn appended after the assistant turn, then <|im_assistant|>.
        return continuation_ids(self.tokenizer, episode["messages"], before + 1)


ENVIRONMENT = ToolEnvironment  # posttrain/rl/tasks/__init__.py: the task is multi-turn, played with this
