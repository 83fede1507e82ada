"""RL on the live tool loop (posttrain/rl/tasks/tool_loop.py): multi-turn rollouts, their training rows, and runs.

References: the chat renderer's whole-conversation rendering and loss mask (what SFT trains on) for
the ids a rollout appends; the executor's own score for the reward; the model's teacher-forced
forward for the recorded log-probs and experts; one uninterrupted rollout for a continued one.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from launch.checkpoint.pretrained import load_pretrained
from launch.train import run as train_run
from moe.config import ConfigError
from posttrain import sft
from posttrain.chat import continuation_ids, render_conversation, render_generation_prompt
from posttrain.executor import take_turn
from posttrain.policy import chat_stops
from posttrain.rl.tasks import tool_loop as tool_tasks
from posttrain.rl.batch import Rows, token_logprobs
from posttrain.rl.config import parse
from posttrain.rl.rollout import GrowSettings, Sample, grow, new_group
from posttrain.rl.tasks import build_task
from posttrain.rl.train import run
from posttrain.tasks import make_tasks, split_of, write_jsonl

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from harness import tiny_chat_base_flags  # noqa: E402


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """The tiny preset fine-tuned for seconds on tool trajectories: it writes calls, mostly malformed,
    so its episodes run several turns and get error results back (about 11 s on 2 CPU cores)."""
    root = tmp_path_factory.mktemp("rl-tools")
    train_run(sft.parse_args(tiny_chat_base_flags(root, root / "base")))
    write_jsonl(make_tasks(450, 0, "single", declare_tools=False) + make_tasks(150, 0, "multi", declare_tools=False),
                root / "sft.jsonl")
    train_run(sft.parse(["--init-from", str(root / "base"), "--data", str(root / "sft.jsonl"), "--steps", "40",
                         "--lr", "3e-3", "--seq-len", "256", "--eval-every", "40", "--eval-batches", "1",
                         "--out-dir", str(root / "sft")]))
    return root


@pytest.fixture(scope="module")
def loaded(policy):
    init = load_pretrained(str(policy / "sft"))
    return init.model.eval(), init.tokenizer


def _model_runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s: the turns the model writes."""
    runs, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_the_ground_truth_played_through_the_environment_is_what_sft_trains_on(loaded, kind):
    _, tok = loaded
    env = tool_tasks.ToolEnvironment(tok, max_turns=4)
    for problem in tool_tasks.make_problems(6, 3, kinds=[kind]):
        whole = render_conversation(tok, problem["trajectory"], problem["tools"])
        prompt = render_generation_prompt(tok, problem["messages"], problem["tools"])
        assert whole.ids[: len(prompt)] == prompt
        s = Sample(0, 0, prompt, episode=env.start(problem))
        turns = _model_runs(whole.mask)
        for k, (a, b) in enumerate(turns):
            s.tokens += whole.ids[a:b]
            s.from_model += [True] * (b - a)
            appended = env.respond(s, s.tokens[s.turn_start :])
            if k == len(turns) - 1:
                assert appended is None and s.episode["stopped"] == "answer"
            else:
                s.tokens += appended
                s.from_model += [False] * len(appended)
        # Token for token the SFT rendering, and the environment's ids are exactly its unmasked ones.
        assert prompt + s.tokens == whole.ids
        assert [int(m) for m in s.from_model] == whole.mask[len(prompt) :]
        assert tool_tasks.verify(problem, s.episode) == (1.0, "right calls, right answer")


def test_continuation_ids_follow_the_conversation_so_far_as_the_whole_prompt_does(loaded):
    _, tok = loaded
    problem = tool_tasks.make_problems(1, 0, kinds=["multi"], declare_tools=True)[0]
    messages, tools = problem["trajectory"][:3], problem["tools"]  # request, call, result
    so_far = render_conversation(tok, messages[:2], tools).ids
    assert so_far + continuation_ids(tok, messages, 2) == render_generation_prompt(tok, messages, tools)
    with pytest.raises(ValueError, match="start = 0"):
        continuation_ids(tok, messages, 0)


def test_the_verifier_scores_the_episode_and_says_why_it_failed(loaded):
    _, tok = loaded
    problem = tool_tasks.make_problems(1, 1, kinds=["multi"])[0]
    assert tool_tasks.verify(problem, None) == (0.0, "no episode was played")
    assert tool_tasks.verify(problem, "The answer is 5.")[0] == 0.0

    def played(edit):  # the ground truth's turns, edited, played through the executor
        trajectory = json.loads(json.dumps(problem["trajectory"]))
        edit(trajectory)
        episode = tool_tasks.ToolEnvironment(tok, max_turns=4).start(problem)
        for m in trajectory:
            if m["role"] == "assistant":
                take_turn(episode, m, 4)
        return tool_tasks.verify(problem, episode)

    assert played(lambda t: None) == (1.0, "right calls, right answer")

    def wrong_argument(t):
        call = t[1]["tool_calls"][0]["function"]
        args = json.loads(call["arguments"])
        key = sorted(args)[0]
        args[key] = "nonsense" if isinstance(args[key], str) else args[key] + 1
        call["arguments"] = json.dumps(args)

    assert played(wrong_argument)[0] == 0.0
    assert played(lambda t: t[-1].update(content="I do not know."))[1].startswith("the answer does not state")


def test_problems_come_from_their_split_with_a_difficulty_and_bad_arguments_are_named():
    train = tool_tasks.make_problems(40, 0)
    heldout = tool_tasks.make_problems(10, 7, split="heldout")
    assert [p["difficulty"] for p in train].count(1) == 20 and {p["difficulty"] for p in train} == {1, 2}
    assert all(split_of(p["prompt"]) == "train" for p in train)
    assert all(split_of(p["prompt"]) == "heldout" for p in heldout)
    assert tool_tasks.make_problems(5, 0) == tool_tasks.make_problems(5, 0)
    task = build_task("tools", {"kinds": ["single"]}, 8, 4, 0)
    assert task.environment is tool_tasks.ToolEnvironment and {p["difficulty"] for p in task.train} == {1}
    with pytest.raises(ConfigError, match="task_args: kinds = 'single'"):
        build_task("tools", {"kinds": "single"}, 8, 4, 0)
    with pytest.raises(ConfigError, match="task_args.max_turns"):
        build_task("tools", {"max_turns": 2}, 8, 4, 0)


def _settings(tok, segment, budget=96, record_routing=True):
    return GrowSettings(budget=budget, segment=segment, temperature=1.0, top_p=None, stop_tokens=chat_stops(tok),
                        loop_period=0, loop_repeats=4, record_routing=record_routing, batch_size=4,
                        environment=tool_tasks.ToolEnvironment(tok, max_turns=3))


def _groups(tok):
    env = tool_tasks.ToolEnvironment(tok, max_turns=3)
    problems = tool_tasks.make_problems(3, 0)
    return [new_group(i, render_generation_prompt(tok, p["messages"]), 3, seed=500 + 10 * i, episode=env.start(p))
            for i, p in enumerate(problems)]


def test_multi_turn_rows_take_no_loss_on_tool_results_and_match_a_teacher_forced_forward(loaded):
    model, tok = loaded
    groups = _groups(tok)
    samples = [s for g in groups for s in g.samples]
    grow(model, samples, _settings(tok, segment=96))
    assert all(s.finish is not None for s in samples)
    several = [s for s in samples if s.episode["turns"] > 1]
    assert several, "the fixture's policy should call tools in some episodes"
    for s in several:  # the environment's ids sit between the turns, each one the executor's answer
        assert not all(s.from_model) and s.model_tokens < len(s.tokens)
    rows = Rows(groups, "cpu")
    with torch.no_grad():
        logp_ST = token_logprobs(model, rows, replay=True)
    for i, s in enumerate(samples):
        n = len(s.tokens)
        assert rows.mask_ST[i, :n].tolist() == s.from_model
        assert rows.targets_1N[0, rows.index_ST[i, :n]].tolist() == s.tokens
        drawn = torch.tensor(s.from_model)
        assert torch.allclose(logp_ST[i, :n][drawn], torch.tensor(s.logprobs)[drawn], atol=1e-5)
        # The recorded experts cover every input, tool results included, as a forward routes them.
        with torch.no_grad():
            expected = model(torch.tensor([s.prompt + s.tokens[:-1]]), return_routing=True).routing[:, 0]
        assert torch.equal(rows.routing_L1NK[:, 0, rows.documents_1N[0] == i], expected)


def test_a_multi_turn_rollout_continued_over_iterations_equals_one_uninterrupted_rollout(loaded):
    model, tok = loaded
    whole, parts = _groups(tok), _groups(tok)
    grow(model, [s for g in whole for s in g.samples], _settings(tok, segment=96))
    samples = [s for g in parts for s in g.samples]
    for _ in range(12):
        grow(model, samples, _settings(tok, segment=9))
    for a, b in zip([s for g in whole for s in g.samples], samples):
        assert b.finish is not None
        assert (a.tokens, a.from_model, a.finish) == (b.tokens, b.from_model, b.finish)
        assert a.episode == b.episode
        assert max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs)), default=0.0) < 1e-5
        assert torch.equal(a.routing, b.routing)
    assert max(s.segments for s in samples) > 1


def _flags(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--init-from", str(root / "sft"), "--task", "tools", "--train-problems", "32", "--eval-problems", "8",
            "--prompts-per-iteration", "4", "--samples-per-prompt", "3", "--max-response-tokens", "96",
            "--max-turns", "3", "--length-penalty", "0.5", "--micro-batch-groups", "2", "--eval-every", "2",
            "--out-dir", str(out), *extra]


def _records(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("sample_s", "train_s")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_an_rl_run_on_the_tool_loop_trains_and_resumes_exactly_with_episodes_in_flight(policy, tmp_path):
    flags = ["--partial-rollout-tokens", "16", "--checkpoint-every", "2", "--iterations", "4"]
    whole = tmp_path / "whole"
    summary = run(parse(_flags(policy, whole, *flags)))
    records = _records(whole)
    trained = [r for r in records[1:] if r.get("groups_trained")]
    assert trained and any(r["waiting"] > 0 for r in records[1:])
    assert max(r["mismatch"] for r in trained) < 1e-4
    assert summary["final_heldout"]["heldout_accuracy"] == records[-1]["heldout_accuracy"]
    start = load_pretrained(str(policy / "sft")).model.state_dict()
    end = load_pretrained(str(whole)).model.state_dict()
    assert max((start[k] - end[k]).abs().max().item() for k in start) > 1e-5  # the policy moved
    cut = tmp_path / "cut"
    run(parse(_flags(policy, cut, *flags[:-2], "--iterations", "2")))
    run(parse(["--resume", "--out-dir", str(cut), "--iterations", "4"]))
    assert _records(cut) == records
    resumed = load_pretrained(str(cut)).model.state_dict()
    assert all(torch.equal(resumed[k], end[k]) for k in end)
