"""The reasoning_gym RL task (posttrain/rl/tasks/gym.py): problems from the package, scored by its own scorer.

Reference: reasoning-gym's dataset entries and score functions, which we did not write.
"""

import pytest
import reasoning_gym

from moe.config import ConfigError
from posttrain.rl.tasks import gym as gym_tasks  # "gym" alone reads as another package here
from posttrain.rl.tasks import build_task
from posttrain.tasks import split_of


def test_problems_are_the_packages_entries_split_by_hash_with_a_difficulty():
    train = gym_tasks.make_problems(30, 0, dataset="basic_arithmetic", difficulty_key="num_terms")
    heldout = gym_tasks.make_problems(10, 7, dataset="basic_arithmetic", split="heldout")
    assert len(train) == 30 and len({p["prompt"] for p in train}) == 30
    assert all(split_of(p["prompt"]) == "train" for p in train)
    assert all(split_of(p["prompt"]) == "heldout" for p in heldout)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in heldout}
    assert {p["difficulty"] for p in train} == {p["entry"]["metadata"]["num_terms"] for p in train}
    assert {p["difficulty"] for p in heldout} == {1}
    assert train == gym_tasks.make_problems(30, 0, dataset="basic_arithmetic", difficulty_key="num_terms")
    entry = train[0]["entry"]
    assert train[0]["prompt"] == entry["question"] and train[0]["answer"] == str(entry["answer"])


@pytest.mark.parametrize("dataset", ["basic_arithmetic", "chain_sum", "word_sorting"])
def test_the_reference_answer_scores_1_and_anything_else_what_the_package_says(dataset):
    for p in gym_tasks.make_problems(5, 1, dataset=dataset):
        score_fn = reasoning_gym.get_score_answer_fn(dataset)
        assert gym_tasks.verify(p, f"Let me think. The answer is {p['answer']}.") == (1.0, "correct")
        wrong = "zq"  # spell_backward's scorer, for one, gives full credit to the answer with a letter added
        reward, reason = gym_tasks.verify(p, f"The answer is {wrong}.")
        assert reward == max(0.0, float(score_fn(wrong, p["entry"]))) < 1.0 and reason.startswith("wrong")


def test_malformed_output_scores_0_with_its_reason():
    p = gym_tasks.make_problems(1, 2)[0]
    assert gym_tasks.verify(p, "I think it is 5") == (0.0, "no answer")
    assert gym_tasks.verify(p, None)[1] == "malformed: not text but NoneType"
    assert gym_tasks.verify(p, "The answer is " + "9" * 1000)[1] == "malformed: answer of 1000 characters"
    assert gym_tasks.final_answer("The answer is 3. No. The answer is 3.5.") == "3.5"


def test_sft_records_answer_in_the_convention_verify_reads():
    problems = gym_tasks.make_problems(4, 3, dataset="spell_backward")
    for record, p in zip(gym_tasks.sft_records(problems), problems):
        assert record["messages"][0] == {"role": "user", "content": p["prompt"]}
        assert gym_tasks.verify(p, record["messages"][1]["content"]) == (1.0, "correct")


def test_bad_task_arguments_name_the_field():
    with pytest.raises(ConfigError, match="dataset = 'no_such_thing' is not a reasoning-gym dataset"):
        build_task("reasoning_gym", {"dataset": "no_such_thing"}, 4, 4, 0)
    with pytest.raises(ConfigError, match="difficulty_key = 'nope'"):
        build_task("reasoning_gym", {"difficulty_key": "nope"}, 4, 4, 0)
    with pytest.raises(ConfigError, match="task_args.datset"):
        build_task("reasoning_gym", {"datset": "x"}, 4, 4, 0)
    with pytest.raises(ConfigError, match="config = "):
        build_task("reasoning_gym", {"dataset": "basic_arithmetic", "config": {"min_terms": "many"}}, 4, 4, 0)
