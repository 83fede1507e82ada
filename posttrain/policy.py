"""The model side of the live tool loop: a Transformer and its tokenizer as an executor policy.

    policy = ModelPolicy(model, tokenizer, max_new_tokens=128)          # greedy unless temperature > 0
    episode = run_episode(policy, task)                                  # posttrain/executor.py, one turn per call
    report = evaluate(policy, tasks)                                     # the same, task after task
    report, episodes = evaluate_batched(policy, tasks, batch_size=32)    # lockstep: the same report, far faster

One turn: the conversation is rendered with a generation prompt (posttrain/chat.py), the model writes
until <|im_end|> (end of turn) or <|eod|> (what a pretrained-only model ends with), and the ids are
parsed back into an OpenAI assistant message. Nothing the model writes raises: an output cut by
max_new_tokens, or one holding a delimiter out of place, becomes a message with "parse_errors",
which the executor answers with an error and counts as an invalid call.

A conversation longer than max_seq_len - max_new_tokens cannot be continued: cutting it from the left
would drop the tool declarations and the request, so the policy raises executor.ContextFull and the
episode ends there, stopped "context", as a failure that the report counts.

On a CPU, decoding one sequence at a time is far below what a batch gets (README: the small preset
makes ~55 tokens/s at batch 1, ~600 at batch 32), so `play_episodes` plays many episodes in lockstep:
each round the prompts of all unfinished episodes go through `generate` batch_size at a time, and
each episode then takes its turn through executor.take_turn, the logic run_episode uses. With greedy
decoding a prompt gives the same tokens in a batch as alone (moe/generate.py), so the episodes, and
the report, are those of evaluate(policy, tasks); with sampling they are draws of the same law.
"""

from __future__ import annotations

import random

from moe.generate import Generation, generate
from moe.model import Transformer
from posttrain.chat import END, as_message, chat_ids, parse_assistant, render_generation_prompt
from posttrain.executor import ContextFull, check_max_turns, new_episode, summarize, take_turn


def chat_stops(tokenizer) -> tuple[int, int]:
    """The ids that end a generated assistant turn: <|im_end|>, and <|eod|> (a pretrained-only model's end).
    ValueError naming the tokenizer when it has no chat tokens."""
    return chat_ids(tokenizer)[END], tokenizer.eod_id


def check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size = {batch_size!r}; it must be a positive integer (prompts per generate call)")


def generate_batched(model: Transformer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 32,
                     stop_tokens=(), temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                     seed: int | None = None) -> Generation:
    """moe.generate.generate over any number of prompts, batch_size per call; results in the order of `prompts`.

    Prompts are grouped by length, so a call pads little: its prefill and cache cost the longest
    prompt of the group times the group's size. Call k is seeded with seed + k (None: fresh draws).
    Raises generate's ValueError (bad sampling settings, a prompt too long for the model).
    """
    check_batch_size(batch_size)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [None] * len(prompts)
    for k, start in enumerate(range(0, len(order), batch_size)):
        chunk = order[start : start + batch_size]
        result = generate(model, [prompts[i] for i in chunk], max_new_tokens, temperature, top_k, top_p,
                          stop_tokens, None if seed is None else seed + k)
        for j, i in enumerate(chunk):
            out[i] = (result.tokens[j], result.logprobs[j], result.model_logprobs[j], result.finish_reasons[j])
    tokens, logprobs, model_logprobs, reasons = (list(x) for x in zip(*out)) if out else ([], [], [], [])
    return Generation(tokens, logprobs, model_logprobs, reasons)


class ModelPolicy:
    """`policy(messages, tools) -> assistant message` for posttrain/executor.py, from a model and its tokenizer.

    `seed` fixes the draws of every call this policy makes (each call draws its own seed from it,
    so two turns do not replay one random stream); None draws fresh ones. Sampling settings are
    checked by moe.generate on the first call (ValueError).
    """

    def __init__(self, model: Transformer, tokenizer, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None):
        self.stop_tokens = chat_stops(tokenizer)
        limit = model.cfg.max_seq_len
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or not 1 <= max_new_tokens < limit:
            raise ValueError(f"max_new_tokens = {max_new_tokens!r}; it must be an int in [1, {limit}) "
                             f"(ModelConfig.max_seq_len = {limit} holds the prompt and the reply)")
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self._seeds = None if seed is None else random.Random(seed)

    def prompt(self, messages, tools) -> list[int]:
        """The ids the model continues; ContextFull when they leave no room for max_new_tokens."""
        ids = render_generation_prompt(self.tokenizer, messages, tools)
        limit = self.model.cfg.max_seq_len
        if len(ids) + self.max_new_tokens > limit:
            raise ContextFull(f"the conversation is {len(ids)} tokens; with max_new_tokens = {self.max_new_tokens} "
                              f"it does not fit ModelConfig.max_seq_len = {limit}")
        return ids

    def generate(self, prompts: list[list[int]], batch_size: int = 32) -> Generation:
        """The model's turns for `prompts` (from `prompt`), ending at <|im_end|> or <|eod|>."""
        seed = None if self._seeds is None else self._seeds.randrange(2**62)
        return generate_batched(self.model, prompts, self.max_new_tokens, batch_size, self.stop_tokens,
                                seed=seed, **self.sampling)

    def messages(self, generation: Generation) -> list[dict]:
        """Each generated turn as an assistant message; a truncated or malformed one carries parse_errors."""
        return [as_message(parse_assistant(tokens, self.tokenizer)) for tokens in generation.tokens]

    def __call__(self, messages, tools) -> dict:
        return self.messages(self.generate([self.prompt(messages, tools)], batch_size=1))[0]


def play_episodes(policy: ModelPolicy, tasks, max_turns: int = 4, batch_size: int = 32) -> list[dict]:
    """One episode per task, as executor.run_episode(policy, task, max_turns) returns it, played in lockstep:
    each round, one `generate` per batch_size unfinished episodes, then one executor.take_turn each."""
    check_max_turns(max_turns)
    check_batch_size(batch_size)
    episodes = [new_episode(task) for task in tasks]
    live = list(range(len(tasks)))
    while live:
        prompts = {}
        for i in live:
            try:
                prompts[i] = policy.prompt(episodes[i]["messages"], tasks[i]["tools"])
            except ContextFull:
                episodes[i]["stopped"] = "context"  # as run_episode does when its policy raises it
        if prompts:
            replies = policy.messages(policy.generate(list(prompts.values()), batch_size))
            for i, reply in zip(prompts, replies):
                take_turn(episodes[i], reply, max_turns)
        live = [i for i in live if episodes[i]["stopped"] is None]
    return episodes


def evaluate_batched(policy: ModelPolicy, tasks, max_turns: int = 4, batch_size: int = 32) -> tuple[dict, list[dict]]:
    """(report, episodes): the report executor.evaluate(policy, tasks, max_turns) gives (the same for
    greedy decoding), and the episodes it was scored on, in task order, for transcripts."""
    if not tasks:
        raise ValueError("evaluate_batched needs at least one task")
    episodes = play_episodes(policy, tasks, max_turns, batch_size)
    return summarize(tasks, episodes), episodes
