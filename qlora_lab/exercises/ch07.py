"""Checkers for chapter 07 (finetuning).

Exercise 1: the learning rate of the recipe's schedule at any step.
Exercise 2: labels on the assistant's tokens only, with truncation.
"""

from __future__ import annotations

import torch

from qlora_lab.exercises import call_learner, checker
from qlora_lab.finetune import chat_format
from qlora_lab.finetune import data as data_lib
from qlora_lab.finetune.train import constant_schedule_with_warmup


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
