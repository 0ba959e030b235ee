"""Measuring a language model: perplexity on a fixed text.

Perplexity is ``exp`` of the mean negative log-likelihood the model assigns to
each token of a text given the tokens before it; lower is better, and a model
that guessed uniformly among V tokens would score V. QLoRA compares data types
this way (Sec. 4, "4-bit NormalFloat yields better performance than 4-bit
Floating Point", Table 2: perplexity of quantized models on Pile Common Crawl).

The course's fixed text is ``datasets/eval_text/`` (written for the course,
see its datasheet); :func:`course_eval_text` reads it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

EVAL_TEXT_DIR = Path(__file__).resolve().parent.parent / "datasets" / "eval_text"


def course_eval_text() -> str:
    """The course's evaluation text (all ``*.txt`` files of
    ``datasets/eval_text/`` in name order, separated by blank lines)."""
    files = sorted(EVAL_TEXT_DIR.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no .txt files in {EVAL_TEXT_DIR}; the course's evaluation text ships with the "
                                f"repository (datasets/eval_text/), so run from a full checkout")
    return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)


@torch.no_grad()
def negative_log_likelihood(model, tokenizer, text: str, window: int = 2048,
                            stride: int | None = None) -> tuple[float, int]:
    """``(total negative log-likelihood in nats, number of predicted tokens)``
    of ``text`` under ``model``.

    The text is tokenized once (no special tokens added). Every token after the
    first is predicted exactly once. A text longer than ``window`` tokens is
    read in windows: each predicts the next ``stride`` tokens (at most
    ``window - 1``, the default) and fills the rest of its ``window`` tokens
    with the text just before them as context. The sum is kept in float64.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("perplexity needs a non-empty text")
    if not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an integer of at least 2 tokens, got {window!r}")
    stride = window - 1 if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= window - 1:
        raise ValueError(f"stride must be between 1 and window - 1 ({window - 1}) tokens, got {stride!r}")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < 2:
        raise ValueError("the text must have at least two tokens to predict one")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, counted = 0.0, 0
    try:
        first_target = 1  # token 0 has no context and is never predicted
        while first_target < ids.numel():
            end = min(first_target + stride, ids.numel())
            start = max(0, end - window)
            chunk = ids[start:end].to(device)
            logits = model(chunk.unsqueeze(0)).logits[0, :-1].double()  # row j predicts token start + j + 1
            losses = torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="none")
            new = losses[first_target - start - 1:]
            total += new.sum().item()
            counted += new.numel()
            first_target = end
    finally:
        model.train(was_training)
    return total, counted


def perplexity(model, tokenizer, text: str, window: int = 2048, stride: int | None = None) -> float:
    """Perplexity of ``model`` on ``text``: ``exp(mean negative log-likelihood
    per predicted token)`` (see :func:`negative_log_likelihood` for windows)."""
    total, counted = negative_log_likelihood(model, tokenizer, text, window=window, stride=stride)
    return math.exp(total / counted)
