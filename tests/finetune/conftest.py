"""Fixtures of the finetune tests: a data set on disk in the schema of the
paper's data (``timdettmers/openassistant-guanaco``)."""

import json

import pytest

GUANACO_TRAIN = [
    "### Human: What is the capital of France?### Assistant: Paris is the capital of France.",
    "### Human: Name a prime number.### Assistant: 7 is prime.### Human: Another one?### Assistant: 11.",
    "### Human: Say hi.### Assistant: Hi!",
    "### Human: Two plus two?### Assistant: Four.",
    "no turn markers at all",  # not a conversation: skipped and counted
]
GUANACO_EVAL = ["### Human: What colour is the sky?### Assistant: Blue, on a clear day."]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(name="write_jsonl")
def write_jsonl_fixture():
    """``write_jsonl(path, rows)``: one JSON object a line; returns ``path``."""
    return write_jsonl


@pytest.fixture
def guanaco_dir(tmp_path):
    """timdettmers/openassistant-guanaco as `hf download` leaves it: two JSONL files with one `text` column."""
    directory = tmp_path / "openassistant-guanaco"
    write_jsonl(directory / "openassistant_best_replies_train.jsonl", [{"text": t} for t in GUANACO_TRAIN])
    write_jsonl(directory / "openassistant_best_replies_eval.jsonl", [{"text": t} for t in GUANACO_EVAL])
    return directory
