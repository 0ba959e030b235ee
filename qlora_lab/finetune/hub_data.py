"""Data from outside the course: the hub's instruction data sets in the
course's chat format (chapter 07, the 7B path).

The course's own data set is in the chat format already (:mod:`qlora_lab.finetune.data`);
the paper's data, or another public set, comes in its own schema. This module reads
one through Hugging Face ``datasets`` and turns each row into a record
``{"messages": [...]}`` that :func:`qlora_lab.finetune.data.validate_record` accepts.

**Where from** (:func:`load_table`): a hub name (``timdettmers/openassistant-guanaco``),
a directory as ``hf download --repo-type dataset NAME --local-dir DIR`` leaves
it, a directory written by ``DatasetDict.save_to_disk``, or one file (``.jsonl``,
``.json``, ``.parquet``, ``.arrow``).

**Which schema** (:data:`DATA_FORMATS`, found from the columns by
:func:`detect_format` or named with ``--data-format``):

- ``guanaco``: one ``text`` field with ``### Human: ...### Assistant: ...``
  turns (``timdettmers/openassistant-guanaco``, the data Guanaco was trained on);
- ``oasst1``: OpenAssistant's message table, one row per message
  (``OpenAssistant/oasst1``), turned into conversations by :func:`oasst1_conversations`;
- ``alpaca``: ``instruction``, ``input``, ``output`` (``tatsu-lab/alpaca``);
- ``messages``: a ``messages`` list of ``{"role", "content"}`` (the chat format
  of transformers and TRL).

**What the loss covers** is chosen separately, by ``train_on``
(:func:`qlora_lab.finetune.chat_format.tokenize_conversation`): ``assistant``
(the replies only, the course's default) or ``all`` (every token of the
conversation, which is what the released ``qlora.py`` did for Guanaco: it maps
each OASST1 text to ``{'input': '', 'output': text}`` and labels the output).

A row that is not a valid conversation (an empty reply, two turns of one speaker)
is skipped and counted in :class:`HubData`'s report; a split left empty is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from qlora_lab.finetune.data import validate_record

DATA_FORMATS = ("guanaco", "oasst1", "alpaca", "messages")
KNOWN_HUB_DATA = {
    "timdettmers/openassistant-guanaco": "guanaco",
    "OpenAssistant/oasst1": "oasst1",
    "tatsu-lab/alpaca": "alpaca",
    "yahma/alpaca-cleaned": "alpaca",
}
"""Hub data sets whose schema the course knows by name (the first is the paper's)."""

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
VALIDATION_SPLITS = ("validation", "test")
"""A data set's held-out split, by the first of these names it has (the Guanaco
set's ``openassistant_best_replies_eval.jsonl`` is read as ``test``)."""
HELD_OUT = 0.05
"""Without a held-out split, this fraction of the training rows (at most 1,000,
at least 1) is set aside for validation: the last rows, so the split never
depends on a random seed."""


class DataSourceError(ValueError):
    """A data source that cannot be read: says what was tried and what to do."""


# --------------------------------------------------------------------------- #
# 1. where from
# --------------------------------------------------------------------------- #
def load_table(source: str):
    """The rows of ``source`` as a ``datasets.DatasetDict`` (see the module
    docstring for what ``source`` may be). A name that is not a local path is
    read from the hub; without a network that fails with a
    :class:`DataSourceError` saying how to download it first."""
    import datasets

    path = Path(source).expanduser()
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise DataSourceError(f"--data {source}: a {path.suffix or 'suffix-less'} file; give a "
                                  f"{', '.join(FILE_BUILDERS)} file or a directory")
        return read_local(source, lambda: datasets.load_dataset(builder, data_files={"train": str(path)}))
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            return read_local(source, lambda: datasets.load_from_disk(str(path)))
        if (path / "state.json").is_file():  # one Dataset.save_to_disk
            return read_local(source, lambda: datasets.DatasetDict({"train": datasets.load_from_disk(str(path))}))
        return read_local(source, lambda: datasets.load_dataset(str(path)))
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise DataSourceError(f"--data {source}: no such file or directory, and not a hub name (owner/name)")
    try:
        return datasets.load_dataset(source)
    except Exception as err:  # noqa: BLE001  (offline, gated, a typo: datasets raises many kinds)
        raise DataSourceError(
            f"--data {source}: could not read it from the Hugging Face hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no message'}). On a machine with a network, download "
            f"it first: hf download --repo-type dataset {source} --local-dir data/{source.split('/')[1]} "
            f"and pass --data data/{source.split('/')[1]}") from None


def read_local(source: str, read):
    """``read()``, with what ``datasets`` says about a local file it cannot
    read (no data files, malformed JSON, a broken parquet file) as a :class:`DataSourceError`."""
    from datasets.exceptions import DatasetGenerationError

    try:
        return read()
    except (ValueError, FileNotFoundError, DatasetGenerationError) as err:
        cause = err.__cause__ if isinstance(err, DatasetGenerationError) and err.__cause__ else err
        raise DataSourceError(f"--data {source}: could not read the data files here ({type(cause).__name__}: "
                              f"{str(cause).splitlines()[0] if str(cause) else 'no message'})") from None


# --------------------------------------------------------------------------- #
# 2. which schema
# --------------------------------------------------------------------------- #
def detect_format(columns) -> str:
    """The schema of a table with these column names (one of :data:`DATA_FORMATS`)."""
    columns = set(columns)
    if "messages" in columns:
        return "messages"
    if {"message_id", "parent_id", "role", "text"} <= columns:
        return "oasst1"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if "text" in columns:
        return "guanaco"
    raise DataSourceError(f"columns {sorted(columns)} match none of the known schemas: guanaco (text), "
                          f"oasst1 (message_id, parent_id, role, text), alpaca (instruction, input, output), "
                          f"messages (messages); convert the data, or name the schema with --data-format")


TURN = re.compile(r"### (Human|Assistant):")


def guanaco_messages(text: str) -> list[dict]:
    """``### Human: a### Assistant: b### Human: c ...`` as chat messages (the turn
    markers follow each other without a newline in the Guanaco set; whitespace
    around a turn is dropped)."""
    pieces = TURN.split(text)
    if pieces[0].strip():
        raise ValueError(f"text before the first '### Human:' marker: {pieces[0][:40]!r}")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": content.strip()} for who, content in zip(pieces[1::2], pieces[2::2])]


def alpaca_messages(row: dict) -> list[dict]:
    """Instruction (and input, when there is one, after a blank line) from the
    user; output from the assistant."""
    prompt = row["instruction"].strip()
    if (row.get("input") or "").strip():
        prompt += "\n\n" + row["input"].strip()
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"].strip()}]


def oasst1_conversations(rows) -> list[list[dict]]:
    """OASST1's message trees as conversations: from each tree's first prompt,
    follow the best-ranked reply at every level (``rank`` 0 is the best; an
    unranked reply comes after the ranked ones, then by ``message_id``) until a
    message has no reply; a path that ends on a prompt loses that prompt.
    Deleted messages and ones that failed review (``review_result`` false) are
    not followed. This is the rule the Guanaco data card describes ("only the
    highest-rated paths in the conversation tree"); the script that built that
    set is not published, so this is the course's reading of it."""
    usable = [r for r in rows if not r.get("deleted") and r.get("review_result") is not False]
    children: dict[str, list[dict]] = {}
    for r in usable:
        if r["parent_id"] is not None:
            children.setdefault(r["parent_id"], []).append(r)

    def rank(r):
        return (r["rank"] is None, r["rank"] if r["rank"] is not None else 0, r["message_id"])

    conversations = []
    for root in sorted((r for r in usable if r["parent_id"] is None), key=lambda r: r["message_id"]):
        path, node = [root], root
        while children.get(node["message_id"]):
            node = min(children[node["message_id"]], key=rank)
            path.append(node)
        if path[-1]["role"] == "prompter":
            path.pop()
        roles = {"prompter": "user", "assistant": "assistant"}
        conversations.append([{"role": roles[m["role"]], "content": m["text"].strip()} for m in path])
    return conversations


# --------------------------------------------------------------------------- #
# 3. the splits, checked
# --------------------------------------------------------------------------- #
@dataclass
class HubData:
    """The converted splits and what the conversion did."""

    source: str
    data_format: str
    splits: dict[str, list[dict]]
    skipped: dict[str, int] = field(default_factory=dict)
    first_problem: dict[str, str] = field(default_factory=dict)
    held_out_from_train: bool = False

    def __str__(self) -> str:
        sizes = ", ".join(f"{name} {len(records):,}" for name, records in self.splits.items())
        text = f"data: {self.source} read as {self.data_format} ({sizes} conversations"
        text += "; validation = the last rows of train)" if self.held_out_from_train else ")"
        for name, count in self.skipped.items():
            if count:
                text += f"\n  {name}: skipped {count:,} rows that are not a valid conversation, " \
                        f"e.g. {self.first_problem[name]}"
        return text


def conversations_of(table, data_format: str) -> list[list[dict] | ValueError]:
    """Every row (every tree for ``oasst1``) of one split as a message list;
    a row that cannot be read at all gives the ``ValueError`` saying why in its place."""
    rows = table.to_list()
    if data_format == "oasst1":
        return oasst1_conversations(rows)
    out = []
    for row in rows:
        try:
            if data_format == "guanaco":
                out.append(guanaco_messages(row["text"]))
            elif data_format == "alpaca":
                out.append(alpaca_messages(row))
            else:
                out.append([{"role": m["role"], "content": m["content"]} for m in row["messages"]])
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            out.append(ValueError(str(err)))
    return out


def load_hub_data(source: str, data_format: str = "auto") -> HubData:
    """Read ``source`` (:func:`load_table`), convert every split to chat
    records, and return the ``train`` and ``validation`` splits (see
    :data:`VALIDATION_SPLITS` and :data:`HELD_OUT`)."""
    if data_format != "auto" and data_format not in DATA_FORMATS:
        raise DataSourceError(f"data_format must be auto or one of {', '.join(DATA_FORMATS)}, got {data_format!r}")
    tables = load_table(source)
    if "train" not in tables:
        raise DataSourceError(f"--data {source}: no train split (splits: {', '.join(tables) or 'none'})")
    if data_format == "auto":
        try:
            data_format = KNOWN_HUB_DATA.get(source) or detect_format(tables["train"].column_names)
        except DataSourceError as err:
            raise DataSourceError(f"--data {source}: {err}") from None
    result = HubData(source=source, data_format=data_format, splits={})
    held_out = next((name for name in VALIDATION_SPLITS if name in tables), None)
    for name, split in (("train", "train"), ("validation", held_out)):
        if split is None:
            continue
        records, skipped, problem = [], 0, None
        for messages in conversations_of(tables[split], data_format):
            try:
                if isinstance(messages, Exception):
                    raise messages
                record = {"messages": messages}
                validate_record(record)
            except ValueError as err:
                skipped += 1
                problem = problem or str(err)
                continue
            records.append(record)
        if not records:
            raise DataSourceError(f"--data {source}: no row of the {split} split is a valid conversation as "
                                  f"{data_format} (first problem: {problem}); is --data-format right?")
        result.splits[name], result.skipped[name] = records, skipped
        if problem:
            result.first_problem[name] = problem
    if "validation" not in result.splits:
        train = result.splits["train"]
        if len(train) < 2:
            raise DataSourceError(f"--data {source}: one conversation and no held-out split; a run needs "
                                  f"at least two (one to train on, one to validate)")
        n = min(1000, max(1, round(HELD_OUT * len(train))))
        result.splits = {"train": train[:-n], "validation": train[-n:]}
        result.held_out_from_train = True
    return result


def load_splits(source: str, data_format: str = "auto") -> tuple[dict[str, list[dict]], str]:
    """What a run trains and validates on, and one line (or a few) saying so.
    The course's own layout (a directory with ``train.jsonl`` and
    ``validation.jsonl``) is read by :func:`qlora_lab.finetune.data.load_dataset`,
    which names the file and line of every malformed record; anything else by
    :func:`load_hub_data`."""
    from qlora_lab.finetune.data import load_dataset

    directory = Path(source).expanduser()
    course_layout = all((directory / f"{split}.jsonl").is_file() for split in ("train", "validation"))
    if course_layout and data_format in ("auto", "messages"):
        splits = load_dataset(directory, splits=("train", "validation"))
        return splits, describe(source, splits)
    loaded = load_hub_data(source, data_format)
    return loaded.splits, str(loaded)


def describe(source: str, splits: dict[str, list]) -> str:
    """``data: SOURCE (train N, validation M conversations)``."""
    return f"data: {source} ({', '.join(f'{name} {len(records):,}' for name, records in splits.items())} conversations)"
