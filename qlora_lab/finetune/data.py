"""Instruction data for finetuning: load, check, tokenize with labels, batch.

The data pipeline of QLoRA's finetuning experiments (Dettmers et al. 2023,
Sec. 5 and Appendix B: Guanaco is trained on OASST1 conversations), in four
steps. One choice is the course's own: the loss is taken on the assistant's
replies only. The released ``qlora.py`` labels everything but an example's
source (``train_on_source=False``) and maps each OASST1 conversation to
``{'input': '', 'output': text}``, so Guanaco's loss covers the whole
conversation, the human turns included.

1. **Load and validate** (:func:`load_jsonl`, :func:`load_dataset`). One JSON object
   per line with a ``messages`` list in the chat format that
   ``tokenizer.apply_chat_template`` accepts. Every line is checked before any
   training starts; a bad line raises :class:`DataFormatError` naming the file,
   the line number and what is wrong.
2. **Format with the model's chat template and label the assistant's tokens**
   (:func:`tokenize_conversation`). See :func:`assistant_spans` for exactly which
   tokens are labelled.
3. **Truncate** to a maximum length: keep the first ``max_length`` tokens, cut the
   end; an example left without any labelled token is dropped and counted
   (:func:`tokenize_records`).
4. **Batch** (:func:`make_batches`, :func:`collate`): group-by-length batching that
   reproduces Hugging Face's ``get_length_grouped_indices`` exactly (the Guanaco
   recipe trains with ``group_by_length=True``), right padding, ``-100`` labels on
   padding.

Scoring the model's replies (generation, exact match) is measurement and lives
in :mod:`qlora_lab.finetune.evaluate`; :func:`prompt_ids` here renders the prompt it
generates from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from qlora_lab.support.resources import COURSE_DATASET_DIR

IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` (and transformers'
causal-LM loss) skips: prompt tokens and padding get it."""

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = frozenset({"role", "content"})
SCORED_TASKS = ("date_iso", "time_24h", "extract_fields", "sort_words")
"""Tasks whose assistant reply is a short answer, checked by exact match
(:func:`qlora_lab.finetune.evaluate.is_correct`); their records carry the ``answer``."""
CHAT_TASK = "chat"
SPLITS = ("train", "validation", "test")

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


class DataFormatError(ValueError):
    """A data file has malformed lines. ``errors`` holds ``(path, line, problem)``
    for each bad line (1-based line numbers); the message lists the first ones."""

    def __init__(self, errors: list[tuple[str, int, str]], total_lines: int | None = None):
        self.errors = errors
        shown = [f"{path}:{line}: {problem}" for path, line, problem in errors[:10]]
        more = len(errors) - len(shown)
        head = f"{len(errors)} malformed line{'s' if len(errors) != 1 else ''}"
        if total_lines is not None:
            head += f" (of {total_lines})"
        msg = head + "; fix them (or regenerate the file) before training:\n  " + "\n  ".join(shown)
        if more:
            msg += f"\n  ... and {more} more"
        super().__init__(msg)


# --------------------------------------------------------------------------- #
# 1. Loading and validation
# --------------------------------------------------------------------------- #
def validate_messages(messages: Any) -> None:
    """Check one conversation; raise ``ValueError`` saying what is wrong.

    Rules: a non-empty list of objects with exactly the keys ``role`` and
    ``content``; role one of ``system``, ``user``, ``assistant``; content a
    non-blank string; at most one system message and only first; then user and
    assistant alternate, starting with user and ending with assistant (the reply
    that is trained on).
    """
    if not isinstance(messages, list):
        raise ValueError(f"'messages' must be a list of {{'role', 'content'}} objects, got {type(messages).__name__}")
    if not messages:
        raise ValueError("'messages' is empty; a conversation needs at least a user and an assistant message")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with 'role' and 'content', got {type(message).__name__}")
        missing = sorted(MESSAGE_KEYS - message.keys())
        if missing:
            raise ValueError(f"{where} has no {' or '.join(repr(k) for k in missing)}")
        extra = sorted(message.keys() - MESSAGE_KEYS)
        if extra:
            raise ValueError(f"{where} has unknown key(s) {extra}; only 'role' and 'content' are allowed")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"{where} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where} ({role}) content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise ValueError(f"{where} ({role}) content is empty")
        if role == "system" and i != 0:
            raise ValueError(f"{where} is a system message; only the first message may be a system message")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        raise ValueError("the conversation has only a system message; add a user and an assistant message")
    for j, message in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if message["role"] != expected:
            i = j + (len(messages) - len(turns))
            raise ValueError(f"messages[{i}] has role {message['role']!r} but {expected!r} was expected "
                             f"(after an optional system message, user and assistant must alternate, "
                             f"starting with user)")
    if turns[-1]["role"] != "assistant":
        raise ValueError("the conversation ends with a user message; it must end with an assistant reply")


def validate_record(record: Any) -> None:
    """Check one data set record (one JSONL line, already parsed).

    A JSON object with a valid ``messages`` list (:func:`validate_messages`).
    Optional ``task``: a string; for a scored task (:data:`SCORED_TASKS`) the
    record must also have a string ``answer`` equal to the last assistant reply.
    """
    if not isinstance(record, dict):
        raise ValueError(f"each line must be a JSON object with a 'messages' list, got {type(record).__name__}")
    if "messages" not in record:
        raise ValueError(f"the object has no 'messages' key (keys: {sorted(record)})")
    validate_messages(record["messages"])
    task = record.get("task")
    if task is not None and not isinstance(task, str):
        raise ValueError(f"'task' must be a string, got {type(task).__name__}")
    if task in SCORED_TASKS:
        answer = record.get("answer")
        if not isinstance(answer, str):
            raise ValueError(f"a {task!r} record needs a string 'answer' (the gold reply)")
        if record["messages"][-1]["content"] != answer:
            raise ValueError(f"'answer' {answer!r} differs from the last assistant reply "
                             f"{record['messages'][-1]['content']!r}")


def load_jsonl(path: str | Path) -> list[dict]:
    """Read and validate a JSONL data file; return its records.

    Every line is parsed and checked with :func:`validate_record`. Blank lines are
    errors (a trailing newline at the end of the file is fine). If any line is
    bad, :class:`DataFormatError` is raised listing ``file:line: problem`` for
    each bad line, so nothing trains on a partly broken file. An empty file is an
    error too.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataFormatError([(str(path), 1, "the file is empty; it must hold one JSON object per line")], 0)
    lines = raw.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    records, errors = [], []
    for number, line in enumerate(lines, start=1):
        try:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not text.strip():
                raise ValueError("blank line; remove it (JSONL has one JSON object on every line)")
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"invalid JSON: {err.msg} at column {err.colno}") from None
            validate_record(record)
        except (ValueError, RecursionError) as err:  # RecursionError: JSON nested deeper than Python's stack
            errors.append((str(path), number, str(err)))
            continue
        records.append(record)
    if errors:
        raise DataFormatError(errors, len(lines))
    return records


def load_dataset(directory: str | Path = COURSE_DATASET_DIR,
                 splits: Sequence[str] = SPLITS) -> dict[str, list[dict]]:
    """Load ``<split>.jsonl`` for each split from ``directory`` (default: the
    course's data set, :data:`COURSE_DATASET_DIR`), all validated before returning."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"data directory {directory} does not exist")
    return {split: load_jsonl(directory / f"{split}.jsonl") for split in splits}


# --------------------------------------------------------------------------- #
# 2. Chat template and labels
# --------------------------------------------------------------------------- #
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


# --------------------------------------------------------------------------- #
# 3. Batching
# --------------------------------------------------------------------------- #
def length_grouped_indices(lengths: Sequence[int], batch_size: int, seed: int,
                           mega_batch_mult: int | None = None) -> list[int]:
    """An order of the examples in which consecutive runs of ``batch_size`` have
    similar lengths (so little padding), yet random: identical to
    ``transformers.trainer_pt_utils.get_length_grouped_indices`` with a
    ``torch.Generator`` seeded with ``seed``.

    Randomly permute; cut into mega-batches of ``mega_batch_mult * batch_size``
    (default: ``min(len // (4 * batch_size), 50)``, at least 1); sort each by
    length, longest first; move the overall longest example to the very front
    (so running out of memory happens on step one, not hours later).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if mega_batch_mult is None:
        mega_batch_mult = max(min(len(lengths) // (batch_size * 4), 50), 1)
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(lengths), generator=generator)
    size = mega_batch_mult * batch_size
    megabatches = [indices[i: i + size].tolist() for i in range(0, len(lengths), size)]
    megabatches = [sorted(mb, key=lambda i: lengths[i], reverse=True) for mb in megabatches]
    maxima = [lengths[mb[0]] for mb in megabatches]
    longest = int(torch.argmax(torch.tensor(maxima)).item())
    megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return [i for mb in megabatches for i in mb]


def make_batches(lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool = True,
                 drop_last: bool = False) -> list[list[int]]:
    """Split example indices into batches for one epoch, deterministic for a seed
    (use ``seed + epoch`` for later epochs): grouped by length
    (:func:`length_grouped_indices`) or a plain random permutation."""
    if not lengths:
        raise ValueError("no examples to batch")
    if group_by_length:
        order = length_grouped_indices(lengths, batch_size, seed)
    else:
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def collate(examples: Sequence[dict], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example: ``input_ids`` padded with
    ``pad_token_id``, ``attention_mask`` 1 on real tokens and 0 on padding,
    ``labels`` ``-100`` on padding. Right padding for training (positions then
    start at 0 in every row); left padding is for generation."""
    if not examples:
        raise ValueError("collate got an empty batch")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max(len(e["input_ids"]) for e in examples)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        n = len(e["input_ids"])
        labels = e.get("labels", e["input_ids"])
        if len(labels) != n:
            raise ValueError(f"an example has {n} input_ids but {len(labels)} labels")
        pad = width - n
        rows = (list(e["input_ids"]), [1] * n, list(labels))
        fills = (pad_token_id, 0, IGNORE_INDEX)
        for key, row, fill in zip(out, rows, fills):
            out[key].append(row + [fill] * pad if padding_side == "right" else [fill] * pad + row)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
