"""Instruction data, second step: the chat template and labels on the
answers only (chapter 07; QLoRA Sec. 5, "train on target").

A conversation that :mod:`qlora_lab.finetune.data` has checked becomes
training tokens:

1. **Format with the model's chat template and label the assistant's tokens**
   (:func:`tokenize_conversation`). See :func:`assistant_spans` for exactly which
   tokens are labelled. What the loss covers is a choice (``train_on``): the
   assistant's replies only (``"assistant"``, the course's default), or the
   whole conversation (``"all"``), which is what Guanaco was trained on: the
   released ``qlora.py`` labels everything but an example's source
   (``train_on_source=False``) and maps each OASST1 conversation to
   ``{'input': '', 'output': text}``, so the human turns are in the loss too.
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


def end_of_turn_id(tokenizer, token: str | None = None) -> int:
    """The token that closes an assistant turn, read from the chat template: the
    end-of-sequence token when the template writes it after a reply
    (``<|im_end|>`` for SmolLM2's ChatML template, ``</s>`` for LLaMA with
    :data:`GUANACO_CHAT_TEMPLATE`), else the first special token written there
    (Qwen2.5's base models: the end-of-sequence token is ``<|endoftext|>``, a
    turn ends with ``<|im_end|>``). A tokenizer without a chat template: its
    end-of-sequence token. ``token`` (``TrainConfig.end_of_turn``) names it
    instead, as one token of the vocabulary."""
    if token is not None:
        found = tokenizer.convert_tokens_to_ids(token)
        if found is None or (found == tokenizer.unk_token_id and token != tokenizer.unk_token):
            raise ValueError(f"end_of_turn={token!r} is not one token of this tokenizer's vocabulary; name "
                             f"the token that closes a reply as the tokenizer writes it, e.g. {tokenizer.eos_token!r}")
        return int(found)
    eos = tokenizer.eos_token_id
    probe = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    if getattr(tokenizer, "chat_template", None):
        before = _render_ids(tokenizer, probe[:1], add_generation_prompt=True)
        full = _render_ids(tokenizer, probe)
    if not getattr(tokenizer, "chat_template", None) or full[:len(before)] != before:
        # no template, or one whose prompt is not a prefix of the conversation (assistant_spans refuses it)
        if eos is None:
            raise ValueError("the tokenizer has no eos_token and no usable chat template; name the token that "
                             "ends a reply with --set end_of_turn=TOKEN")
        return int(eos)
    after = full[len(before):]
    special = set(tokenizer.all_special_ids)
    special |= {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
    if eos is not None and eos in after:
        return int(eos)
    for token in after:
        if token in special:
            return int(token)
    raise ValueError("the chat template writes neither the end-of-sequence token nor any special token after an "
                     "assistant reply, so a model could not learn where a reply stops; give the tokenizer a "
                     "template that closes turns with one, or name the token with --set end_of_turn=TOKEN")


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
    requires the template to be prefix-consistent (the tokens of a prefix, up to
    the end-of-turn token, are a prefix of the tokens of the whole), which is checked.
    """
    eot = end_of_turn_id(tokenizer) if eot_id is None else eot_id
    full = _render_ids(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render_ids(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render_ids(tokenizer, messages[: i + 1])
        start = len(before)
        closing = [k for k in range(start, len(through)) if through[k] == eot]
        # Up to the end-of-turn token only: what a template writes after it (a newline)
        # may merge with the next turn's first characters ("\n###" is one token of some vocabularies).
        end = closing[-1] + 1 if closing else len(through)
        if full[:start] != before or full[:end] != through[:end]:
            raise ValueError("the chat template is not prefix-consistent (rendering the first turns does not give "
                             "the first tokens of the whole conversation), so assistant tokens cannot be located")
        if not closing:
            raise ValueError(f"assistant turn {i} is not closed by the end-of-turn token id {eot}; the template "
                             f"must end assistant turns with it (or pass eot_id)")
        spans.append((start, end))
    return full, spans


TRAIN_ON = ("assistant", "all")
"""What the loss covers: the assistant's replies (the course's default) or the
whole conversation (the released ``qlora.py`` for Guanaco)."""


def tokenize_conversation(messages: list[dict], tokenizer, max_length: int | None = None,
                          eot_id: int | None = None, train_on: str = "assistant") -> dict[str, list[int]] | None:
    """``{"input_ids", "labels"}`` for one conversation (QLoRA Sec. 5, "train on
    target": labels are the input ids on the assistant spans of
    :func:`assistant_spans` and ``-100`` elsewhere).

    Truncation rule: with ``max_length``, the first ``max_length`` tokens are kept
    and the rest is cut (the end of a long conversation goes first, so a reply
    may lose its end-of-turn token). If no labelled token survives, None is
    returned: the caller drops the example (:func:`tokenize_records` counts it).

    ``train_on="all"`` labels every token (the first is never predicted: the
    loss shifts labels by one), as Guanaco was trained; the spans are still
    found, so a template that never closes a reply is refused either way.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    validate_messages(messages)
    ids, spans = assistant_spans(messages, tokenizer, eot_id)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans if train_on == "assistant" else [(0, len(ids))]:
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
                     eot_id: int | None = None, train_on: str = "assistant") -> tuple[list[dict], TokenizeReport]:
    """Tokenize records (:func:`tokenize_conversation`); returns the examples kept
    (each also carries ``index``, its position in ``records``) and a report."""
    examples, report = [], TokenizeReport()
    eot_id = end_of_turn_id(tokenizer) if eot_id is None else eot_id
    for index, record in enumerate(records):
        report.total += 1
        full = tokenize_conversation(record["messages"], tokenizer, None, eot_id, train_on)
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
