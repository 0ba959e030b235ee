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


# ---------------------------------------------------------------- exercise 3


def longest_max_length(model, card_gb):
    from qlora_lab import memory
    from qlora_lab.finetune import plan, train
    from qlora_lab.models import read_model_config

    context = read_model_config(model).max_position_embeddings
    best = None
    for length in (2**k for k in range(8, 20)):
        if length > context:
            break
        config = train.preset("llama-7b-gpu", model=model, max_length=length, memory_config=None)
        if plan.run_estimate(config).peak > memory.gpu_capacity_bytes(card_gb):
            break
        best = length
    return best


def test_exercise_3_reference():
    # Qwen2.5-7B's 152,064-token vocabulary makes every token's log-probabilities costly: on a 12 GB card
    # it stops at 2048 tokens where Mistral-7B (32,768 tokens) goes to 8192; LLaMA-1 stops at its context
    assert ch07.longest_max_length("Qwen/Qwen2.5-7B", 12) == 2048
    assert ch07.longest_max_length("mistralai/Mistral-7B-v0.3", 12) == 8192
    assert ch07.longest_max_length("huggyllama/llama-7b", 80) == 2048
    assert ch07.longest_max_length("Qwen/Qwen2.5-7B", 6) is None


def test_exercise_3_right(capsys):
    assert ch07.check_exercise_3(longest_max_length) is True
    assert "Exercise 3: correct" in capsys.readouterr().out


def test_exercise_3_wrong(capsys):
    def ignores_the_context(model, card_gb):
        return longest_max_length("mistralai/Mistral-7B-v0.3" if "llama-7b" in model else model, card_gb)

    def never_none(model, card_gb):
        return longest_max_length(model, card_gb) or 256

    def decimal_gigabytes(model, card_gb):
        from qlora_lab.finetune import plan, train

        best = None
        for length in (256, 512, 1024, 2048, 4096, 8192, 16384):
            config = train.preset("llama-7b-gpu", model=model, max_length=length, memory_config=None)
            if plan.run_estimate(config).peak > card_gb * 1e9:
                break
            best = length
        return best

    cases = [(ignores_the_context, "max_position_embeddings"), (never_none, "return None"),
             (lambda m, c: 3000, "powers of two"), (lambda m, c: "2048", "an int number of tokens"),
             (decimal_gigabytes, "you said")]
    for wrong, hint in cases:
        assert ch07.check_exercise_3(wrong) is False, hint
        assert hint in capsys.readouterr().out
    assert ch07.check_exercise_3(skeleton) is False
    assert "not attempted yet" in capsys.readouterr().out


# ------------------------------------------------------- a learner's bug is feedback


def test_a_bug_in_the_learners_code_is_feedback_not_a_crash(smollm2, capsys):
    _, tokenizer = smollm2
    assert_bugs_are_feedback(capsys, [
        (1, ch07.check_exercise_1, ()),
        (2, ch07.check_exercise_2, (tokenizer,)),
        (3, ch07.check_exercise_3, ()),
    ])
