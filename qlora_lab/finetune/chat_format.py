"""Instruction data, second step: the chat template and labels on the
answers only (chapter 07; QLoRA Sec. 5, "train on target").

A conversation that :mod:`qlora_lab.finetune.data` has checked becomes
training tokens:

1. **Format with the model's chat template and label the assistant's tokens**
   (:func:`tokenize_conversation`). See :func:`assistant_spans` for exactly which
   tokens are labelled. One choice is the course's own: the loss is taken on
   the assistant's replies only. The released ``qlora.py`` labels everything
   but an example's source (``train_on_source=False``) and maps each OASST1
   conversation to ``{'input': '', 'output': text}``, so Guanaco's loss covers
   the whole conversation, the human turns included.
2. **Truncate** to a maximum length: keep the first ``max_length`` tokens, cut the
   end; an example left without any labelled token is dropped and counted
   (:func:`tokenize_records`).

:func:`prompt_ids` renders the prompt the model generates a reply from
(:mod:`qlora_lab.finetune.evaluate` scores the replies); the examples are put
into batches by :mod:`qlora_lab.finetune.batching`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from qlora_lab.finetune.data import validate_messages

IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` (and transformers'
causal-LM loss) skips: prompt tokens and padding get it."""

GUANACO_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Human: ' + message['content'] + '\n' }}"
    "{% else %}{{ '### Assistant: ' + message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:' }}{% endif %}"
)
"""The ``### Human: ... ### Assistant: ...`` format of the Guanaco models (the
QLoRA repository's OASST1 preprocessing), as a chat template, for base models
that ship without one (see :func:`ensure_chat_template`). Each assistant turn
ends with the tokenizer's end-of-sequence token, which is then labelled."""


def ensure_chat_template(tokenizer, template: str = GUANACO_CHAT_TEMPLATE) -> bool:
    """Give ``tokenizer`` a chat template if it has none (base models such as
    LLaMA-7B); returns True if one was set. Instruct models keep their own."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = template
    return True


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn: the tokenizer's end-of-sequence
    token (``<|im_end|>`` for SmolLM2's ChatML template, ``</s>`` for LLaMA)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; pass end_of_turn_id explicitly")
    return int(tokenizer.eos_token_id)


def _render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    # sanitize_control_tokens: a message that contains e.g. the text "<|im_end|>"
    # is tokenized as ordinary text, so data cannot forge turn boundaries.
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False,
                                        add_generation_prompt=add_generation_prompt,
                                        sanitize_control_tokens=True)
    return [int(i) for i in ids]


def assistant_spans(messages: list[dict], tokenizer,
                    eot_id: int | None = None) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the whole conversation and the ``[start, end)`` span of every
    assistant reply that is labelled.

    Exactly which tokens are labelled: for each assistant message, from the first
    token after the generation prompt (for SmolLM2: after
    ``<|im_start|>assistant\\n``) up to and including the end-of-turn token that
    closes the reply (:func:`end_of_turn_id`; ``<|im_end|>`` for SmolLM2), so the
    model learns to stop. Whatever the template writes after that token (SmolLM2:
    a newline) and all system, user and template tokens are not labelled.

    The spans come from rendering growing prefixes of the conversation; that
    requires the template to be prefix-consistent (the tokens of a prefix are a
    prefix of the tokens of the whole), which is checked.
    """
    eot = end_of_turn_id(tokenizer) if eot_id is None else eot_id
    full = _render_ids(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render_ids(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render_ids(tokenizer, messages[: i + 1])
        if full[: len(before)] != before or full[: len(through)] != through:
            raise ValueError("the chat template is not prefix-consistent (rendering the first turns does not give "
                             "the first tokens of the whole conversation), so assistant tokens cannot be located")
        start = len(before)
        closing = [k for k in range(start, len(through)) if full[k] == eot]
        if not closing:
            raise ValueError(f"assistant turn {i} is not closed by the end-of-turn token id {eot}; the template "
                             f"must end assistant turns with it (or pass eot_id)")
        spans.append((start, closing[-1] + 1))
    return full, spans


def tokenize_conversation(messages: list[dict], tokenizer, max_length: int | None = None,
                          eot_id: int | None = None) -> dict[str, list[int]] | None:
    """``{"input_ids", "labels"}`` for one conversation (QLoRA Sec. 5, "train on
    target": labels are the input ids on the assistant spans of
    :func:`assistant_spans` and ``-100`` elsewhere).

    Truncation rule: with ``max_length``, the first ``max_length`` tokens are kept
    and the rest is cut (the end of a long conversation goes first, so a reply
    may lose its end-of-turn token). If no labelled token survives, None is
    returned: the caller drops the example (:func:`tokenize_records` counts it).
    """
    validate_messages(messages)
    ids, spans = assistant_spans(messages, tokenizer, eot_id)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    if max_length is not None:
        if max_length < 1:
            raise ValueError(f"max_length must be a positive number of tokens, got {max_length}")
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def prompt_ids(messages: list[dict], tokenizer) -> list[int]:
    """Token ids that ask the model for the next assistant reply: the
    conversation without its final assistant message, rendered with
    ``add_generation_prompt=True`` (SmolLM2: ending in ``<|im_start|>assistant\\n``)."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a generation prompt needs a conversation that ends with a user message")
    return _render_ids(tokenizer, messages, add_generation_prompt=True)


@dataclass
class TokenizeReport:
    """What :func:`tokenize_records` did: how many records it got, how many were
    cut to ``max_length``, and which were dropped for having no labelled token
    left (their indices in the input)."""

    total: int = 0
    truncated: int = 0
    dropped: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.total} examples, {self.truncated} truncated, {len(self.dropped)} dropped "
                f"(no assistant token left after truncation)")


def tokenize_records(records: Iterable[dict], tokenizer, max_length: int | None = None,
                     eot_id: int | None = None) -> tuple[list[dict], TokenizeReport]:
    """Tokenize records (:func:`tokenize_conversation`); returns the examples kept
    (each also carries ``index``, its position in ``records``) and a report."""
    examples, report = [], TokenizeReport()
    for index, record in enumerate(records):
        report.total += 1
        full = tokenize_conversation(record["messages"], tokenizer, None, eot_id)
        if full is not None and max_length is not None and len(full["input_ids"]) > max_length:
            report.truncated += 1
            full = {k: v[:max_length] for k, v in full.items()}
            if all(label == IGNORE_INDEX for label in full["labels"]):
                full = None
        if full is None:
            report.dropped.append(index)
            continue
        examples.append({**full, "index": index})
    return examples, report
