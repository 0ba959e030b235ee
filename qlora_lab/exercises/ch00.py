"""Checkers for chapter 00 (welcome).

Exercise 1: write SmolLM2's chat template (ChatML) by hand.
Exercise 2: count a model's parameters by kind (embedding, linear, norm).
Exercise 3: change the text, measure the perplexity: texts of the learner's
            choice, one of them a shuffled copy of another.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from qlora_lab.exercises import call_learner, checker
from qlora_lab.finetune.evaluate import perplexity
from qlora_lab.support.checks import summation_tolerance


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


def perplexity_tolerance(vocabulary: int, tokens: int, perplexity_value: float) -> float:
    """How far (relatively) a float32 perplexity may lie from the float64 one of
    :func:`qlora_lab.finetune.evaluate.perplexity` (chapter 00, section 4).

    Each token's loss is the log of a sum of ``vocabulary`` exponentials: a float
    sum of n terms may be off by n eps of its size, and the log turns that
    relative error into an absolute error of the loss. The mean over ``tokens``
    losses adds ``tokens`` eps times the mean loss. ``exp`` turns an absolute
    error d of the mean loss into a relative error of at most e^d - 1."""
    mean_loss = math.log(perplexity_value)
    loss_error = summation_tolerance(torch.float32, vocabulary, 1.0) + summation_tolerance(torch.float32, tokens,
                                                                                           mean_loss)
    return math.expm1(loss_error)


def _shuffled_pairs(texts) -> list[list[str]]:
    """Groups of texts made of the same words in another order."""
    groups: dict[tuple, list[str]] = {}
    for text in texts:
        groups.setdefault(tuple(sorted(text.split())), []).append(text)
    return [group for group in groups.values() if len(group) > 1]


@checker(3)
def check_exercise_3(measure_texts, model, tokenizer) -> bool:
    """``measure_texts(model, tokenizer)`` must return ``{text: perplexity}`` for at
    least three texts, two of them the same words in another order. Every
    perplexity is measured again with ``qlora_lab.finetune.evaluate.perplexity``
    and must agree to within float32 rounding (:func:`perplexity_tolerance`);
    the texts are then printed from the least to the most surprising."""
    ok, got = call_learner(3, measure_texts, model, tokenizer)
    if not ok:
        return False
    if not isinstance(got, dict) or len(got) < 3:
        size = f"a dict of {len(got)}" if isinstance(got, dict) else type(got).__name__
        print(f"Exercise 3: return a dict {{text: perplexity}} with at least three texts, got {size}.")
        return False
    vocabulary = model.get_output_embeddings().weight.shape[0]
    measured = {}
    for text, value in got.items():
        if not isinstance(text, str) or len(tokenizer(text, add_special_tokens=False).input_ids) < 2:
            print(f"Exercise 3: every key must be a text of at least two tokens (one to read, one to predict); "
                  f"{text!r} is not.")
            return False
        tokens = len(tokenizer(text, add_special_tokens=False).input_ids) - 1
        truth = perplexity(model, tokenizer, text)
        value = float(value)
        allowed = perplexity_tolerance(vocabulary, tokens, truth)
        if not abs(value - truth) <= allowed * truth:
            print(f"Exercise 3: for {text!r} the model's perplexity is {truth:.4f}, you have {value:.4f} "
                  f"(allowed: a relative difference of {allowed:.1e}, float32 rounding).")
            if abs(value - math.log(truth)) <= allowed * max(1.0, math.log(truth)):
                print("  Hint: that is the mean loss (the cross-entropy); the perplexity is its exp.")
            else:
                print("  Hint: tokenize without special tokens, predict every token after the first from the "
                      "tokens before it, average -log p over those tokens, then take exp.")
            return False
        measured[text] = truth
    pairs = _shuffled_pairs(measured)
    if not pairs:
        print("Exercise 3: add a sentence and the same words in another order (random.shuffle on "
              "text.split(), then ' '.join), so that you can see what word order is worth.")
        return False
    print("Exercise 3: correct. Your texts, from the least to the most surprising:")
    for text, value in sorted(measured.items(), key=lambda item: item[1]):
        shown = text if len(text) <= 60 else text[:57] + "..."
        print(f"  perplexity {value:10.2f}  {shown!r}")
    for group in pairs:
        values = sorted(measured[text] for text in group)
        print(f"  the same words in {len(group)} orders: perplexity {values[0]:.2f} to {values[-1]:.2f} "
              f"({values[-1] / values[0]:.1f} times)")
    return True
