"""The chapter 07 checkers accept right answers, reject typical wrong ones, and
treat a skeleton as "not attempted yet" without raising."""

import pytest

from qlora_lab.exercises import ch07
from qlora_lab.finetune import chat_format

from exercise_feedback import assert_bugs_are_feedback


def skeleton(*args):
    raise NotImplementedError("your turn")


# ---------------------------------------------------------------- exercise 1


def learning_rate_at(step, base_lr, warmup_steps):
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    return base_lr


def warmup_off_by_one(step, base_lr, warmup_steps):
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr


def no_warmup(step, base_lr, warmup_steps):
    return base_lr


def test_exercise_1_accepts_the_schedule(capsys):
    assert ch07.check_exercise_1(learning_rate_at) is True
    assert "Exercise 1: correct" in capsys.readouterr().out


@pytest.mark.parametrize("wrong", [warmup_off_by_one, no_warmup])
def test_exercise_1_rejects_wrong_schedules(wrong, capsys):
    assert ch07.check_exercise_1(wrong) is False
    out = capsys.readouterr().out
    assert "learning rate is" in out and "correct" not in out


def test_exercise_1_hint_for_a_warmup_that_starts_above_zero(capsys):
    ch07.check_exercise_1(warmup_off_by_one)
    assert "Hint" in capsys.readouterr().out


def test_exercise_1_skeleton_is_not_attempted(capsys):
    assert ch07.check_exercise_1(skeleton) is False
    assert "not attempted yet" in capsys.readouterr().out


# ---------------------------------------------------------------- exercise 2


def _span_labels(input_ids, spans):
    labels = [chat_format.IGNORE_INDEX] * len(input_ids)
    for start, end in spans:
        labels[start:end] = input_ids[start:end]
    return labels


def make_labels(input_ids, spans, max_length):
    got = never_none(input_ids, spans, max_length)
    return None if all(label == chat_format.IGNORE_INDEX for label in got[1]) else got


def never_none(input_ids, spans, max_length):
    labels = _span_labels(input_ids, spans)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return input_ids, labels


def labels_everywhere(input_ids, spans, max_length):
    ids = input_ids[:max_length] if max_length else input_ids
    return ids, list(ids)


def keeps_the_end(input_ids, spans, max_length):
    labels = _span_labels(input_ids, spans)
    if max_length is not None:
        input_ids, labels = input_ids[-max_length:], labels[-max_length:]
    return input_ids, labels


def test_exercise_2_accepts_train_on_target(smollm2, capsys):
    _, tokenizer = smollm2
    assert ch07.check_exercise_2(make_labels, tokenizer) is True
    assert "Exercise 2: correct" in capsys.readouterr().out


@pytest.mark.parametrize("wrong", [labels_everywhere, keeps_the_end, never_none])
def test_exercise_2_rejects_wrong_labels(smollm2, wrong, capsys):
    _, tokenizer = smollm2
    assert ch07.check_exercise_2(wrong, tokenizer) is False
    assert "Exercise 2:" in capsys.readouterr().out


def test_exercise_2_skeleton_is_not_attempted(smollm2, capsys):
    _, tokenizer = smollm2
    assert ch07.check_exercise_2(skeleton, tokenizer) is False
    assert "not attempted yet" in capsys.readouterr().out


# ------------------------------------------------------- a learner's bug is feedback


def test_a_bug_in_the_learners_code_is_feedback_not_a_crash(smollm2, capsys):
    _, tokenizer = smollm2
    assert_bugs_are_feedback(capsys, [
        (1, ch07.check_exercise_1, ()),
        (2, ch07.check_exercise_2, (tokenizer,)),
    ])
