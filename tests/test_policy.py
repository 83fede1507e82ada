"""The model side of the tool loop (posttrain/policy.py): ModelPolicy, lockstep play, batched evaluation.

    python -m pytest -q tests/test_policy.py

A random tiny model writes garbage, which is what the parser and the executor must survive; a
scripted `generate` (monkeypatched into posttrain.policy) writes chosen ids, so the messages that
come out can be checked exactly and an episode can succeed.
"""

import random

import pytest
import torch

import posttrain.policy as policy_module
from launch.data.tokenizer import CHAT_TOKENS, BytesTokenizer, train_bpe
from moe.config import preset
from moe.generate import Generation, generate
from moe.model import Transformer
from posttrain.chat import chat_ids, render_conversation, render_generation_prompt, render_text
from posttrain.conversations import check_conversation
from posttrain.executor import ContextFull, evaluate, run_episode
from posttrain.policy import ModelPolicy, evaluate_batched, generate_batched, play_episodes
from posttrain.tasks import make_tasks

MESSAGE_KEYS = {"role", "content", "tool_calls", "parse_errors"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared CPU two threads that wait on
    # each other made these tests 25x slower (3 s -> 180 s); restored for the modules after this one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    tasks = make_tasks(150, 0, "single") + make_tasks(150, 0, "multi")
    return train_bpe(iter([[render_text(t["trajectory"], t["tools"]) for t in tasks]]), 400)


def _model(tok, seed=0, **overrides):
    # init_std 0.1: logits of a few units, so greedy output varies with the prompt.
    torch.manual_seed(seed)
    return Transformer(preset("tiny", vocab_size=tok.vocab_size, init_std=0.1, **overrides)).eval()


@pytest.fixture(scope="module")
def model(tok):
    return _model(tok)


@pytest.fixture(scope="module")
def tasks():
    return make_tasks(3, 1, "single", "heldout") + make_tasks(3, 1, "multi", "heldout")


def _turn_ids(tok, task, k):
    """The ids of the k-th assistant turn of the task's ground truth, as the model would write them."""
    trajectory = task["trajectory"]
    i = [j for j, m in enumerate(trajectory) if m["role"] == "assistant"][k]
    prompt = render_generation_prompt(tok, trajectory[:i], task["tools"])
    whole = render_conversation(tok, trajectory[: i + 1], task["tools"]).ids
    assert whole[: len(prompt)] == prompt
    return whole[len(prompt):]


class Scripted:
    """A stand-in for moe.generate.generate: `outputs(prompt ids)` is what the model writes, cut at
    max_new_tokens and after the first stop token as generate cuts it. Records every call."""

    def __init__(self, outputs):
        self.outputs, self.calls = outputs, []

    def __call__(self, model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed):
        self.calls.append({"prompts": prompts, "max_new_tokens": max_new_tokens, "stop_tokens": set(stop_tokens)})
        tokens = []
        for prompt in prompts:
            out = list(self.outputs(prompt))[:max_new_tokens]
            tokens.append(out[: next((n + 1 for n, t in enumerate(out) if t in stop_tokens), len(out))])
        zeros = [[0.0] * len(t) for t in tokens]
        return Generation(tokens, zeros, zeros, ["stop" if t[-1] in stop_tokens else "length" for t in tokens])


def test_a_scripted_call_becomes_that_message_and_a_truncated_one_a_parse_error(tok, model, monkeypatch):
    task = next(t for t in make_tasks(20, 0) if t["family"] == "convert")
    call = _turn_ids(tok, task, 0)
    fake = Scripted(lambda prompt: call)
    monkeypatch.setattr(policy_module, "generate", fake)
    message = ModelPolicy(model, tok, max_new_tokens=64)(task["messages"], task["tools"])
    expected = task["trajectory"][1]["tool_calls"][0]["function"]  # name and arguments as the tasks write them
    assert message == {"role": "assistant", "content": None,
                       "tool_calls": [{"type": "function", "function": expected}]}
    ids = chat_ids(tok)
    assert fake.calls == [{"prompts": [render_generation_prompt(tok, task["messages"], task["tools"])],
                           "max_new_tokens": 64, "stop_tokens": {ids["<|im_end|>"], tok.eod_id}}]

    # max_new_tokens cuts the call inside its arguments: no <|tool_call_end|>, no <|im_end|>.
    cut = call.index(ids["<|im_middle|>"]) + 3
    message = ModelPolicy(model, tok, max_new_tokens=cut)(task["messages"], task["tools"])
    assert message == {"role": "assistant", "content": None, "parse_errors": [
        "the output ends inside a tool call ('convert_units') without <|im_end|>: truncated?"]}


def _script(tok, tasks):
    """Per task: a call cut short (an invalid call), then the ground truth's turns."""
    assistant = chat_ids(tok)["<|im_assistant|>"]
    turns = {}
    for task in tasks:
        first = _turn_ids(tok, task, 0)
        n_turns = sum(m["role"] == "assistant" for m in task["trajectory"])
        turns[task["messages"][0]["content"]] = [first[:-3]] + [_turn_ids(tok, task, k) for k in range(n_turns)]

    def outputs(prompt):
        request = next(r for r in turns if r in tok.decode(prompt))
        return turns[request][prompt.count(assistant) - 1]  # the prompt ends with <|im_assistant|>

    return outputs


def test_scripted_episodes_succeed_alike_in_lockstep_and_one_by_one(tok, model, tasks, monkeypatch):
    fake = Scripted(_script(tok, tasks))
    monkeypatch.setattr(policy_module, "generate", fake)
    policy = ModelPolicy(model, tok, max_new_tokens=256)
    sequential = [run_episode(policy, task) for task in tasks]
    assert [len(c["prompts"]) for c in fake.calls] == [1] * sum(e["turns"] for e in sequential)
    fake.calls.clear()
    report, episodes = evaluate_batched(policy, tasks, batch_size=4)
    # Rounds 1-3: all six episodes (chunks of 4 and 2); round 4: the three two-call tasks still play.
    assert [len(c["prompts"]) for c in fake.calls] == [4, 2, 4, 2, 4, 2, 3]
    assert episodes == sequential
    assert report == evaluate(policy, tasks)
    assert report["success_rate"] == 1.0 and report["invalid_calls"] == len(tasks)  # one cut call each
    assert report["valid_calls"] == 3 * 1 + 3 * 2 and report["stopped"] == {"answer": 6, "max_turns": 0, "context": 0}


GARBAGE = [  # (what the model writes, named by chat token, or ints as ids); every one must become a message
    ["<|im_user|>"], ["<|eod|>"], ["<|im_end|>"], ["<|tool_call_end|>", "<|im_end|>"],
    ["<|tool_call_begin|>", "<|im_end|>"], ["<|tool_call_begin|>", "<|im_middle|>", "<|tool_call_end|>"],
    ["<|tool_call_begin|>", 70, "<|im_middle|>", 80, "<|tool_call_end|>", "<|im_end|>"],  # arguments not JSON
    [70, 71, 72], ["<|im_middle|>", 300, "<|im_assistant|>"], ["<|tool_call_begin|>", 70, "<|tool_call_begin|>"],
]


def test_garbage_output_always_becomes_a_message_and_a_valid_conversation(tok, model, monkeypatch):
    ids = {**chat_ids(tok), "<|eod|>": tok.eod_id}
    rng = random.Random(0)
    special = [ids[t] for t in CHAT_TOKENS] + [tok.eod_id]
    fuzz = [[rng.choice(special) if rng.random() < 0.4 else rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 12))]
            for _ in range(40)]
    task = make_tasks(1, 0)[0]
    for output in [[ids.get(t, t) for t in g] for g in GARBAGE] + fuzz:
        monkeypatch.setattr(policy_module, "generate", Scripted(lambda prompt: output))
        policy = ModelPolicy(model, tok, max_new_tokens=32)
        message = policy(task["messages"], task["tools"])
        assert message["role"] == "assistant" and set(message) <= MESSAGE_KEYS
        episode = run_episode(policy, task, max_turns=2)  # the second turn renders the first: it must be valid
        assert check_conversation(episode["messages"], task["tools"]) == [], output
        if ids["<|im_end|>"] not in output:
            assert episode["stopped"] == "max_turns" and message["parse_errors"]  # never taken as an answer


def _prompt_lengths(tok, task, episode):
    return [len(render_generation_prompt(tok, episode["messages"][:i], task["tools"]))
            for i, m in enumerate(episode["messages"]) if m["role"] == "assistant"]


def test_batched_evaluation_equals_the_sequential_one_on_a_random_model(tok, model, tasks):
    # A context that the last turns of some episodes outgrow: they stop "context" mid-episode while
    # the others play on, so the lockstep rounds run with fewer and fewer episodes.
    n = 16  # max_new_tokens; with these seeds the episodes stop by all three reasons
    roomy = [run_episode(ModelPolicy(model, tok, max_new_tokens=n), task, max_turns=3) for task in tasks]
    last = sorted(_prompt_lengths(tok, t, e)[-1] for t, e in zip(tasks, roomy))
    limit = last[len(last) // 2] + n
    small = _model(tok, max_seq_len=limit)
    small.load_state_dict(model.state_dict())
    policy = ModelPolicy(small, tok, max_new_tokens=n)
    sequential = [run_episode(policy, task, max_turns=3) for task in tasks]
    report, episodes = evaluate_batched(policy, tasks, max_turns=3, batch_size=4)
    assert report == evaluate(policy, tasks, max_turns=3)
    assert episodes == sequential
    assert report["stopped"]["context"] == sum(length + n > limit for length in last) >= 1
    assert len({e["stopped"] for e in episodes}) >= 2 and report["invalid_calls"] > 0  # garbage, counted
    assert all(check_conversation(e["messages"], t["tools"]) == [] for t, e in zip(tasks, episodes))


def test_a_conversation_longer_than_the_context_ends_the_episode_as_a_counted_failure(tok, tasks):
    first = [len(render_generation_prompt(tok, t["messages"], t["tools"])) for t in tasks]
    limit = min(first) + 15  # one token short for the shortest
    policy = ModelPolicy(_model(tok, max_seq_len=limit), tok, max_new_tokens=16)
    with pytest.raises(ContextFull, match=rf"the conversation is {first[0]} tokens; with max_new_tokens = 16 it does "
                                          rf"not fit ModelConfig.max_seq_len = {limit}"):
        policy(tasks[0]["messages"], tasks[0]["tools"])
    episode = run_episode(policy, tasks[0])
    assert (episode["stopped"], episode["turns"], episode["final"], episode["calls"]) == ("context", 0, None, [])
    report, episodes = evaluate_batched(policy, tasks)
    assert report == evaluate(policy, tasks) and episodes == [episode] + episodes[1:]
    assert (report["success_rate"], report["invalid_calls"], report["stopped"]["context"]) == (0.0, 0, len(tasks))


def test_sampling_is_seeded_per_policy_and_drawn_afresh_per_call(tok, model, tasks):
    messages, tools = tasks[0]["messages"], tasks[0]["tools"]

    def replies(seed):
        policy = ModelPolicy(model, tok, max_new_tokens=12, temperature=1.0, seed=seed)
        return [policy(messages, tools) for _ in range(2)]

    first = replies(3)
    assert first == replies(3) and first != replies(4)
    assert first[0] != first[1]  # one seed per call, not one stream replayed


def test_generate_batched_keeps_the_order_and_equals_each_prompt_alone(model):
    rng = random.Random(0)
    prompts = [[rng.randrange(model.cfg.vocab_size) for _ in range(n)] for n in (9, 3, 17, 3, 1)]
    stop = generate(model, prompts[2:3], 8).tokens[0][3]  # ends one sequence early (others maybe too)
    out = generate_batched(model, prompts, 8, batch_size=2, stop_tokens=[stop])
    for b, prompt in enumerate(prompts):
        alone = generate(model, [prompt], 8, stop_tokens=[stop])
        assert (out.tokens[b], out.finish_reasons[b]) == (alone.tokens[0], alone.finish_reasons[0])
        assert out.model_logprobs[b] == pytest.approx(alone.model_logprobs[0], abs=1e-5)
    assert {len(t) for t in out.tokens} != {8} and "stop" in out.finish_reasons  # some stopped early


def test_bad_settings_are_refused_by_name(tok, model, tasks):
    with pytest.raises(ValueError, match="has no chat tokens"):
        ModelPolicy(model, BytesTokenizer())
    with pytest.raises(ValueError, match=r"max_new_tokens = 4096; it must be an int in \[1, 4096\)"):
        ModelPolicy(model, tok, max_new_tokens=4096)
    with pytest.raises(ValueError, match="batch_size = 0; it must be a positive integer"):
        play_episodes(ModelPolicy(model, tok), tasks, batch_size=0)
    with pytest.raises(ValueError, match="max_turns = 0"):
        play_episodes(ModelPolicy(model, tok), tasks, max_turns=0)
    with pytest.raises(ValueError, match="temperature = -1 must be >= 0"):
        ModelPolicy(model, tok, temperature=-1)(tasks[0]["messages"], tasks[0]["tools"])
