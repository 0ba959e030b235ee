"""Checkers for chapter 07 (finetuning).

Exercise 1: the learning rate of the recipe's schedule at any step.
Exercise 2: labels on the assistant's tokens only, with truncation.
Exercise 3: an experiment with the dry-run plan: the longest sequence a card
            allows for a model.
"""

from __future__ import annotations

import torch

from qlora_lab.exercises import call_learner, checker
from qlora_lab.finetune import chat_format
from qlora_lab.finetune import data as data_lib
from qlora_lab.finetune.plan import run_estimate
from qlora_lab.finetune.train import constant_schedule_with_warmup, preset
from qlora_lab.memory import gpu_capacity_bytes
from qlora_lab.support.model_config import read_model_config


@checker(1)
def check_exercise_1(learning_rate_at) -> bool:
    """``learning_rate_at(step, base_lr, warmup_steps)`` must give the learning
    rate the optimizer uses at optimizer step ``step`` (0-based) under a
    constant schedule with linear warmup (``constant_schedule_with_warmup``)."""
    for base_lr, warmup in [(2e-4, 57), (1e-3, 5), (1e-3, 0), (3e-4, 1)]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
        scheduler = constant_schedule_with_warmup(optimizer, warmup)
        for step in range(warmup + 5):
            expected = optimizer.param_groups[0]["lr"]
            ok, got = call_learner(1, learning_rate_at, step, base_lr, warmup)
            if not ok:
                return False
            if not isinstance(got, (int, float)) or abs(got - expected) > 1e-12 * max(1.0, base_lr):
                print(f"Exercise 1: at step {step} with base lr {base_lr} and {warmup} warmup steps the "
                      f"learning rate is {expected:.6g}, you said {got!r}.")
                if step == 0 and warmup > 0 and isinstance(got, (int, float)) and got > 0:
                    print("  Hint: the first step of a linear warmup from 0 uses a learning rate of 0.")
                return False
            optimizer.step()
            scheduler.step()
    print("Exercise 1: correct")
    return True


@checker(2)
def check_exercise_2(make_labels, tokenizer) -> bool:
    """``make_labels(input_ids, spans, max_length)`` gets a conversation's token
    ids and the ``[start, end)`` spans of the assistant's tokens
    (``qlora_lab.finetune.chat_format.assistant_spans``) and must return ``(input_ids, labels)``
    as ``qlora_lab.finetune.chat_format.tokenize_conversation`` does: labels equal to the ids
    on the spans and -100 elsewhere, both cut to ``max_length``; or None when
    no labelled token is left."""
    records = data_lib.load_jsonl(data_lib.COURSE_DATASET_DIR / "validation.jsonl")
    chosen = records[:6]
    cases = [(r["messages"], limit) for r in chosen for limit in (None, 12, 40)]
    for messages, limit in cases:
        ids, spans = chat_format.assistant_spans(messages, tokenizer)
        expected = chat_format.tokenize_conversation(messages, tokenizer, max_length=limit)
        ok, got = call_learner(2, make_labels, list(ids), [tuple(s) for s in spans], limit)
        if not ok:
            return False
        if expected is None:
            if got is not None:
                print(f"Exercise 2: with max_length={limit} no assistant token survives; return None.")
                return False
            continue
        if got is None or len(got) != 2:
            print(f"Exercise 2: return (input_ids, labels); got {got!r}")
            return False
        got_ids, got_labels = list(got[0]), list(got[1])
        if got_ids != expected["input_ids"] or got_labels != expected["labels"]:
            print(f"Exercise 2: wrong for a conversation of {len(ids)} tokens with max_length={limit}.")
            if len(got_labels) == len(expected["labels"]):
                wrong = [i for i, (a, b) in enumerate(zip(got_labels, expected["labels"])) if a != b]
                print(f"  first differing position: {wrong[0]} (expected {expected['labels'][wrong[0]]}, "
                      f"got {got_labels[wrong[0]]})")
            return False
    print("Exercise 2: correct")
    return True


def longest_max_length(model: str, card_gb: int) -> int | None:
    """The largest power of two from 256 up to ``model``'s context for which the
    ``llama-7b-gpu`` preset with that model and ``max_length`` has an estimated
    step peak (:func:`qlora_lab.finetune.plan.run_estimate`) within a card of
    ``card_gb`` GB (GiB, :func:`qlora_lab.memory.gpu_capacity_bytes`); None if
    256 tokens do not fit. The peak grows with the length: the search stops at
    the first length that does not fit."""
    context = read_model_config(model).max_position_embeddings
    best, length = None, 256
    while length <= context:
        config = preset("llama-7b-gpu", model=model, max_length=length, memory_config=None)
        if run_estimate(config).peak > gpu_capacity_bytes(card_gb):
            break
        best, length = length, 2 * length
    return best


# a card that cuts the length short, one that allows long sequences, one where the
# model's context is the limit, and one where nothing fits
_EXERCISE_3_CASES = [("Qwen/Qwen2.5-7B", 12), ("mistralai/Mistral-7B-v0.3", 24), ("huggyllama/llama-7b", 48),
                     ("Qwen/Qwen2.5-7B", 6)]


def _exercise_3_hint(got, expected, model: str) -> str:
    context = read_model_config(model).max_position_embeddings
    if isinstance(got, int) and got > context:
        return f"{model} reads at most {context:,} tokens (max_position_embeddings): no longer than that."
    if isinstance(got, int) and (got < 256 or got & (got - 1)):
        return "try the powers of two 256, 512, 1024, ... and return the largest that fits."
    if expected is None:
        return "when even 256 tokens do not fit, return None."
    if isinstance(got, int) and got == expected // 2:
        return ("a card sold as N GB holds N GiB = N * 2**30 bytes (memory.gpu_capacity_bytes), and a length "
                "fits when the estimated peak is at most that.")
    return ("for each length compare plan.run_estimate(train.preset('llama-7b-gpu', model=..., max_length=..., "
            "memory_config=None)).peak with memory.gpu_capacity_bytes(card_gb).")


@checker(3)
def check_exercise_3(learner_longest_max_length) -> bool:
    """``longest_max_length(model, card_gb)`` must return the longest
    ``max_length`` (a power of two from 256 up to the model's context) that the
    dry-run plan fits on the card, or None (:func:`longest_max_length`)."""
    for model, card_gb in _EXERCISE_3_CASES:
        expected = longest_max_length(model, card_gb)
        ok, got = call_learner(3, learner_longest_max_length, model, card_gb)
        if not ok:
            return False
        if got is not None and (isinstance(got, bool) or not isinstance(got, int)):
            print(f"Exercise 3: return an int number of tokens or None, got {type(got).__name__} {got!r}")
            return False
        if got != expected:
            print(f"Exercise 3: {model} on a {card_gb} GB card: the plan allows "
                  f"{'no length at all' if expected is None else f'{expected:,} tokens'}, you said {got!r}.")
            print(f"  Hint: {_exercise_3_hint(got, expected, model)}")
            return False
    print("Exercise 3: correct")
    return True
