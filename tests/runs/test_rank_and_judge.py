"""`make rank-and-judge` (qlora_lab.runs.rank_and_judge): the questions it holds
out for the judge come from the test split, balanced across the scored tasks."""

from qlora_lab.finetune import data
from qlora_lab.runs.rank_and_judge import held_out_questions


def test_held_out_questions_are_balanced_and_from_the_test_split():
    test = data.load_dataset(splits=("test",))["test"]
    questions = held_out_questions(test, scored_per_task=2, chat=3)
    tasks = [q["task"] for q in questions]
    assert all(tasks.count(t) == 2 for t in data.SCORED_TASKS) and tasks.count(data.CHAT_TASK) == 3
    assert all(q["messages"][-1]["role"] == "assistant" for q in questions)
    assert all((q.get("answer") is None) == (q["task"] == data.CHAT_TASK) for q in questions)
