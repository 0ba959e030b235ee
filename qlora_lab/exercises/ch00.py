"""Checkers for chapter 00 (welcome).

Exercise 1: write SmolLM2's chat template (ChatML) by hand.
Exercise 2: count a model's parameters by kind (embedding, linear, norm).
"""

from __future__ import annotations

from collections import Counter

import torch
from qlora_lab.exercises import call_learner, checker


@checker(1)
def check_exercise_1(format_chatml, tokenizer) -> bool:
    """``format_chatml(messages)`` must return exactly the string the tokenizer's
    chat template makes with ``add_generation_prompt=True``, for conversations
    with and without a system message, and with several turns."""
    conversations = [
        [{"role": "user", "content": "Hi!"}],
        [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello"}],
        [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3 + 3?\nThink first."},
        ],
    ]
    for conversation in conversations:
        expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        ok, got = call_learner(1, format_chatml, conversation)
        if not ok:
            return False
        if got != expected:
            print(f"Exercise 1: for {conversation!r}\n  expected {expected!r}\n  got      {got!r}")
            if "system" not in {m["role"] for m in conversation} and "system" not in str(got):
                print("  Hint: the template adds a default system message when the conversation has none.")
            return False
    print("Exercise 1: correct")
    return True


def parameter_counts_by_kind(model: torch.nn.Module) -> dict[str, int]:
    """Reference answer for exercise 2: parameters per kind of module, each
    tensor counted once (tied embeddings share one tensor)."""
    counts: Counter = Counter()
    seen = set()
    for module in model.modules():
        kind = type(module).__name__
        if isinstance(module, torch.nn.Embedding):
            kind = "embedding"
        elif isinstance(module, torch.nn.Linear):
            kind = "linear"
        elif "norm" in kind.lower():
            kind = "norm"
        else:
            kind = "other"
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                counts[kind] += p.numel()
    return {k: v for k, v in counts.items() if v}


@checker(2)
def check_exercise_2(count_by_kind, model) -> bool:
    """``count_by_kind(model)`` must return ``{"embedding": ..., "linear": ...,
    "norm": ...}`` with each parameter tensor counted once."""
    expected = parameter_counts_by_kind(model)
    ok, got = call_learner(2, count_by_kind, model)
    if not ok:
        return False
    if not isinstance(got, dict):
        print(f"Exercise 2: return a dict, got {type(got).__name__}")
        return False
    got = {k: int(v) for k, v in got.items() if v}
    if got != expected:
        print(f"Exercise 2: expected {expected}, got {got}")
        if got.get("linear", 0) - expected.get("linear", 0) == expected.get("embedding"):
            print("  Hint: SmolLM2 ties lm_head to the embedding: the same tensor must be counted once.")
        return False
    print("Exercise 2: correct")
    return True
