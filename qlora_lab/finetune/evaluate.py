"""Measuring a language model: perplexity, evaluation loss, exact match.

Three measures, each a few lines once the pieces are there:

* **Perplexity** on a fixed text: ``exp`` of the mean negative log-likelihood
  the model assigns to each token given the tokens before it; lower is
  better, and a model that guessed uniformly among V tokens would score V.
  QLoRA compares data types this way (Sec. 4, "4-bit NormalFloat yields
  better performance than 4-bit Floating Point", Table 2: perplexity of
  quantized models on Pile Common Crawl). The course's fixed text is
  ``datasets/eval_text/`` (written for the course, see its
  datasheet); :func:`course_eval_text` reads it, :func:`course_eval_texts`
  reads its five essays one by one (to see how much a comparison depends on
  the text).
* **Evaluation loss** of a finetuning run: the mean loss per labelled token
  (the assistant's replies only, QLoRA Sec. 5) on held-out conversations
  (:func:`evaluation_loss`), what the training loop reports.
* **Exact match** on the course's automatically checked tasks
  (:data:`qlora_lab.finetune.data.SCORED_TASKS`): batched greedy generation with left
  padding (:func:`generate`), then exact match after one documented
  normalisation (:func:`normalize_answer`, :func:`is_correct`, :func:`score`).
  The data set's generator checks every gold answer with :func:`is_correct`,
  so generator and scorer cannot disagree.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from qlora_lab.fast.loss import causal_lm_loss
from qlora_lab.finetune import batching, chat_format, data
from qlora_lab.models.generation import greedy
from qlora_lab.support.resources import EVAL_TEXT_DIR


# --------------------------------------------------------------------------- #
# Perplexity on a fixed text
# --------------------------------------------------------------------------- #
def course_eval_texts() -> dict[str, str]:
    """The essays of ``datasets/eval_text/`` one by one: ``{file stem: text}``
    (``"01_lighthouse"`` ...), in name order, each stripped of surrounding
    whitespace."""
    files = sorted(EVAL_TEXT_DIR.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no .txt files in {EVAL_TEXT_DIR}; the course's evaluation text ships as package "
                                f"data (datasets/eval_text/): reinstall qlora-lab (pip install .)")
    return {f.stem: f.read_text(encoding="utf-8").strip() for f in files}


def course_eval_text() -> str:
    """The course's evaluation text: the essays of :func:`course_eval_texts`
    joined in name order, separated by blank lines."""
    return "\n\n".join(course_eval_texts().values())


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


# --------------------------------------------------------------------------- #
# Evaluation loss of a finetuning run
# --------------------------------------------------------------------------- #
def labelled_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry a loss in a causal LM: labels shift by one, so the
    first position of each row never does."""
    return int((labels[:, 1:] != chat_format.IGNORE_INDEX).sum())


@torch.no_grad()
def evaluation_loss(model, examples: list[dict], pad_token_id: int, batch_size: int) -> float:
    """Mean loss per labelled token over ``examples`` (eval mode, no dropout)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = batching.collate(examples[start: start + batch_size], pad_token_id)
            n = labelled_tokens(batch["labels"])
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = causal_lm_loss(model, **batch, num_items_in_batch=n)
            total += loss.item() * n
            count += n
    finally:
        model.train(was_training)
    return total / count


# --------------------------------------------------------------------------- #
# Generation and exact match on the scored tasks
# --------------------------------------------------------------------------- #
_QUOTES = ('"', "'", "`")


def normalize_answer(text: str) -> str:
    """The one normalisation applied before exact match, to gold answers and
    predictions alike:

    1. strip whitespace at both ends;
    2. remove one pair of matching quotes or backticks around the whole answer;
    3. remove one trailing full stop;
    4. write every run of whitespace as one space, and ``,`` ``;`` ``=`` with
       canonical spacing (``a, b``, ``a; b``, ``a=b``).

    Nothing else: case, digits, leading zeros and word order must be right.
    """
    s = text.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in _QUOTES:
        s = s[1:-1].strip()
    if s.endswith("."):
        s = s[:-1]
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"\s*,\s*", ", ", s)
    s = re.sub(r"\s*;\s*", "; ", s)
    s = re.sub(r"\s*=\s*", "=", s)
    return s.strip()


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match after :func:`normalize_answer` on both sides."""
    if not isinstance(prediction, str) or not isinstance(answer, str):
        raise TypeError("is_correct compares two strings (the model's reply and the gold answer)")
    return normalize_answer(prediction) == normalize_answer(answer)


def scored_records(records: Iterable[dict], tasks: Sequence[str] = data.SCORED_TASKS,
                   per_task: int | None = None) -> list[dict]:
    """The records of the scored tasks, in file order; with ``per_task``, only the
    first ``per_task`` of each task (a fixed, balanced evaluation subset)."""
    unknown = set(tasks) - set(data.SCORED_TASKS)
    if unknown:
        raise ValueError(f"unknown scored task(s) {sorted(unknown)}; choose from {data.SCORED_TASKS}")
    counts: Counter = Counter()
    out = []
    for r in records:
        task = r.get("task")
        if task in tasks and (per_task is None or counts[task] < per_task):
            counts[task] += 1
            out.append(r)
    return out


@torch.no_grad()
def generate(model, tokenizer, conversations: Sequence[list[dict]], max_new_tokens: int = 32,
             batch_size: int = 64, eot_id: int | None = None) -> list[str]:
    """Greedy replies to each conversation (a list of messages; a trailing
    assistant message is ignored), decoded up to the end-of-turn token.

    Prompts are sorted by length and batched with left padding (so every row's
    last prompt token is at the same position and generation continues from
    there); the model is put in eval mode and restored afterwards. Batches are
    large by default: every generated token runs the whole model once per
    batch, and with 4-bit layers that means dequantizing every weight again.
    """
    eot = chat_format.end_of_turn_id(tokenizer) if eot_id is None else eot_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    prompts = [chat_format.prompt_ids(c, tokenizer) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(order), batch_size):
            chunk = order[b: b + batch_size]
            batch = batching.collate([{"input_ids": prompts[i]} for i in chunk], pad, padding_side="left")
            new = greedy(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                         stop_id=eot, pad_id=pad)
            for i, tokens in zip(chunk, new):
                replies[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return replies


@dataclass
class ScoreReport:
    """Exact-match results: overall and per task, with every prediction."""

    correct: int
    total: int
    per_task: dict[str, tuple[int, int]]
    predictions: list[str]
    answers: list[str]
    tasks: list[str]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def __str__(self) -> str:
        parts = [f"exact match {self.correct}/{self.total} = {self.accuracy:.1%}"]
        parts += [f"{t}: {c}/{n}" for t, (c, n) in self.per_task.items()]
        return "; ".join(parts)


def score(model, tokenizer, records: Sequence[dict], max_new_tokens: int = 32,
          batch_size: int = 64) -> ScoreReport:
    """Generate a reply for every scored record (:func:`generate`) and check it
    against its ``answer`` (:func:`is_correct`)."""
    records = list(records)
    if not records:
        raise ValueError("score got no records")
    for r in records:
        if r.get("task") not in data.SCORED_TASKS or "answer" not in r:
            raise ValueError(f"record {r.get('id', '?')} is not a scored task record (task {r.get('task')!r}); "
                             f"select them with scored_records()")
    predictions = generate(model, tokenizer, [r["messages"] for r in records], max_new_tokens, batch_size)
    per_task: dict[str, list[int]] = {}
    correct = 0
    for r, p in zip(records, predictions):
        ok = is_correct(p, r["answer"])
        correct += ok
        c_n = per_task.setdefault(r["task"], [0, 0])
        c_n[0] += ok
        c_n[1] += 1
    return ScoreReport(correct, len(records), {t: (c, n) for t, (c, n) in sorted(per_task.items())},
                       predictions, [r["answer"] for r in records], [r["task"] for r in records])
