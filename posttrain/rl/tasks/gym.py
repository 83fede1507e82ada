"""Any procedural dataset of the `reasoning-gym` package as an RL task: its questions, its own scorer.

    --task reasoning_gym --task-args '{dataset: basic_arithmetic}'
    --task reasoning_gym --task-args '{dataset: spell_backward, config: {min_word_len: 3}, difficulty_key: word_len}'

reasoning-gym (pip install reasoning-gym; MIT) generates over a hundred verifiable task families from a
seed, with no download: arithmetic, algebra, logic puzzles, string manipulation, games. Each entry is
{"question", "answer", "metadata"}, and the package's score function for the dataset rates an answer
in [0, 1] (1 exact; some datasets give partial credit). We keep our chat convention: the model ends
its response with "The answer is X." and X, the text after the last "The answer is" up to the final
period, is what the dataset's scorer sees; a response without it scores 0, "no answer". The RL
reward counts a score of 1 as correct; partial credit is reported in the reason, not rewarded.

Splits: as for our own tasks, a question hashes to train or heldout (posttrain.tasks.split_of), so no
held-out question is trained on, whatever the seeds. The generator is asked for more entries, with
further seeds, until `n` of the split are found. `difficulty_key` names a metadata field (an integer,
such as basic_arithmetic's num_terms) to use as the curriculum's difficulty; without it every
problem has difficulty 1.

`sft_records` gives SFT conversations answering each problem correctly in that convention, to
fine-tune a model before RL (the reference answers are the package's).
"""

from __future__ import annotations

import re

from posttrain.rl.tasks.arithmetic import ANSWER, SPLITS, VERIFY_TAIL
from posttrain.tasks import split_of

MAX_ANSWER_CHARS = 400  # longer is reported, not scored (a scorer may be slow on megabytes)
_FINAL = re.compile(r"\bThe answer is\b[ \t]*")


def _gym():
    try:
        import reasoning_gym
    except ImportError:
        raise ValueError("the reasoning_gym task needs the reasoning-gym package: pip install reasoning-gym") from None
    return reasoning_gym


def make_problems(n: int, seed: int, dataset: str = "basic_arithmetic", config: dict | None = None,
                  difficulty_key: str | None = None, split: str = "train") -> list[dict]:
    """`n` problems of the reasoning-gym `dataset` (its `config` as keyword arguments) from `split`, each
    {"id", "prompt", "answer", "difficulty", "entry" (the package's entry, for its scorer), "dataset"}."""
    gym = _gym()
    if split not in SPLITS:
        raise ValueError(f"split = {split!r}; valid: {', '.join(SPLITS)}")
    if not isinstance(dataset, str) or dataset not in gym.factory.DATASETS:
        raise ValueError(f"dataset = {dataset!r} is not a reasoning-gym dataset; valid: "
                         f"{', '.join(sorted(gym.factory.DATASETS))}")
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise ValueError(f"config = {config!r}; it must be a mapping of {dataset}'s settings")
    problems, seen, attempt = [], set(), 0
    while len(problems) < n:
        if attempt == 20:
            raise ValueError(f"dataset {dataset!r} gave {len(problems)} distinct {split} questions of the {n} "
                             f"asked in 20 draws of {max(n, 50)}: ask for fewer, or widen its config")
        try:
            entries = gym.create_dataset(dataset, seed=seed * 1_000 + attempt, size=max(n, 50), **config)
        except (TypeError, ValueError, AssertionError) as err:  # the package checks its config with asserts
            raise ValueError(f"config = {config!r} for {dataset}: {err}") from None
        attempt += 1
        for entry in entries:
            question = entry["question"]
            if split_of(question) != split or question in seen:
                continue
            seen.add(question)
            difficulty = 1 if difficulty_key is None else entry["metadata"].get(difficulty_key)
            if not isinstance(difficulty, int) or isinstance(difficulty, bool):
                raise ValueError(f"difficulty_key = {difficulty_key!r}: {dataset}'s metadata gives "
                                 f"{difficulty!r}, not an integer; its keys: {', '.join(entry['metadata'])}")
            problems.append({"id": f"{dataset}-{split}-{seed}-{len(problems)}", "prompt": question,
                             "answer": str(entry["answer"]), "difficulty": difficulty, "entry": entry,
                             "dataset": dataset})
            if len(problems) == n:
                break
    return problems


def final_answer(text) -> str | None:
    """The text after the last "The answer is", without one final period; None when there is none."""
    if not isinstance(text, str):
        return None
    final = None
    for final in _FINAL.finditer(text[-VERIFY_TAIL:]):
        pass
    if final is None:
        return None
    answer = text[-VERIFY_TAIL:][final.end() :].strip()
    return answer[:-1] if answer.endswith(".") else answer


def verify(problem: dict, text) -> tuple[float, str]:
    """(score, why): the dataset's own scorer on the final answer; 0 with the reason when there is none,
    it is too long, or the scorer fails on it (model output never makes this raise)."""
    answer = final_answer(text)
    if answer is None:
        return 0.0, "no answer" if isinstance(text, str) else f"malformed: not text but {type(text).__name__}"
    if len(answer) > MAX_ANSWER_CHARS:
        return 0.0, f"malformed: answer of {len(answer)} characters"
    try:
        score = float(_gym().get_score_answer_fn(problem["dataset"])(answer, problem["entry"]))
    except Exception as err:  # noqa: BLE001 -- a third-party scorer on untrusted text: any failure scores 0
        return 0.0, f"malformed: the scorer failed: {type(err).__name__}"
    if score >= 1.0:
        return 1.0, "correct"
    return max(0.0, score), f"wrong: got {answer[:80]!r}" + (f" (partial credit {score:.2f})" if score > 0 else "")


def sft_records(problems) -> list[dict]:
    """One {"messages": [user, assistant]} record per problem, answering with the reference answer."""
    return [{"messages": [{"role": "user", "content": p["prompt"]},
                          {"role": "assistant", "content": ANSWER.format(p["answer"])}]} for p in problems]
