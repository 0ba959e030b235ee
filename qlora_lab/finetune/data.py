"""Instruction data for finetuning, first step: load and check (chapter 07).

The data pipeline of QLoRA's finetuning experiments (Dettmers et al. 2023,
Sec. 5 and Appendix B: Guanaco is trained on OASST1 conversations), in three
modules read in this order:

1. **Load and validate** (this module: :func:`load_jsonl`, :func:`load_dataset`).
   One JSON object per line with a ``messages`` list in the chat format that
   ``tokenizer.apply_chat_template`` accepts. Every line is checked before any
   training starts; a bad line raises :class:`DataFormatError` naming the file,
   the line number and what is wrong.
2. **Format with the model's chat template, label the assistant's tokens and
   truncate** (:mod:`qlora_lab.finetune.chat_format`).
3. **Batch** (:mod:`qlora_lab.finetune.batching`): group-by-length batches,
   padding.

Scoring the model's replies (generation, exact match) is measurement and lives
in :mod:`qlora_lab.finetune.evaluate`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from qlora_lab.support.resources import COURSE_DATASET_DIR

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = frozenset({"role", "content"})
SCORED_TASKS = ("date_iso", "time_24h", "extract_fields", "sort_words")
"""Tasks whose assistant reply is a short answer, checked by exact match
(:func:`qlora_lab.finetune.evaluate.is_correct`); their records carry the ``answer``."""
CHAT_TASK = "chat"
SPLITS = ("train", "validation", "test")


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
