"""qlora_lab.finetune.data, chat_format and batching: validation errors with line numbers,
response-only labels on the real SmolLM2 tokenizer, truncation, group-by-length (equal to
transformers'), padding, and the data set's deterministic generation (the scorer:
tests/finetune/test_evaluate.py)."""

from __future__ import annotations

import copy
import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_lab.finetune import batching, chat_format, data, evaluate

DATASET = data.COURSE_DATASET_DIR


def _line(messages, **extra) -> str:
    return json.dumps({"messages": messages, **extra})


GOOD = _line([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


# --------------------------------------------------------------------------- #
# Loading and validation
# --------------------------------------------------------------------------- #
BAD_LINES = [
    ('{"messages": [', "invalid JSON"),
    ('[1, 2]', "must be a JSON object"),
    ('{"text": "hello"}', "no 'messages' key"),
    ('{"messages": []}', "'messages' is empty"),
    ('{"messages": "hi"}', "must be a list"),
    (_line([{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]), "role 'bot'"),
    (_line([{"role": "user", "content": 3}, {"role": "assistant", "content": "Yo"}]), "content must be a string"),
    (_line([{"role": "user", "content": "  "}, {"role": "assistant", "content": "Yo"}]), "content is empty"),
    (_line([{"role": "user"}, {"role": "assistant", "content": "Yo"}]), "has no 'content'"),
    (_line([{"role": "user", "text": "Hi", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]),
     "unknown key"),
    (_line([{"role": "user", "content": "Hi"}]), "ends with a user message"),
    (_line([{"role": "assistant", "content": "Yo"}]), "'user' was expected"),
    (_line([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"}]), "'assistant' was expected"),
    (_line([{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
            {"role": "assistant", "content": "c"}]), "only the first message may be a system"),
    (_line([{"role": "system", "content": "Be nice."}]), "only a system message"),
    (_line([{"role": "user", "content": "Date?"}, {"role": "assistant", "content": "2020-01-02"}],
           task="date_iso", answer="2020-01-03"), "differs from the last assistant reply"),
    (_line([{"role": "user", "content": "Date?"}, {"role": "assistant", "content": "2020-01-02"}],
           task="date_iso"), "needs a string 'answer'"),
    ("", "blank line"),
]


@pytest.mark.parametrize("bad, expected", BAD_LINES, ids=[b[1] for b in BAD_LINES])
def test_malformed_line_reports_file_line_and_problem(tmp_path, bad, expected):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([GOOD, GOOD, bad, GOOD]) + "\n")
    with pytest.raises(data.DataFormatError) as info:
        data.load_jsonl(path)
    assert info.value.errors[0][:2] == (str(path), 3)
    assert expected in info.value.errors[0][2]
    assert f"{path}:3: " in str(info.value)
    assert len(info.value.errors) == 1


def test_all_bad_lines_are_listed_before_anything_loads(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([GOOD, "{oops", GOOD, '{"messages": []}']) + "\n")
    with pytest.raises(data.DataFormatError) as info:
        data.load_jsonl(path)
    assert [(e[1]) for e in info.value.errors] == [2, 4]
    assert "2 malformed lines (of 4)" in str(info.value)


def test_invalid_utf8_is_reported_with_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"messages": "\xff"}\n')
    with pytest.raises(data.DataFormatError, match=r"d\.jsonl:2: not valid UTF-8"):
        data.load_jsonl(path)


@pytest.mark.parametrize("content", ["", "\n", "  \n\n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(data.DataFormatError, match="the file is empty"):
        data.load_jsonl(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_dataset(tmp_path / "nope")


def test_good_file_loads_with_or_without_final_newline(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD + "\n" + GOOD)
    assert len(data.load_jsonl(path)) == 2


# --------------------------------------------------------------------------- #
# Labels on the assistant's tokens only
# --------------------------------------------------------------------------- #
def test_labels_single_turn_exact(tok):
    messages = [{"role": "user", "content": "Convert 7:45 pm to HH:MM."},
                {"role": "assistant", "content": "19:45"}]
    out = chat_format.tokenize_conversation(messages, tok)
    prompt_text = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    full_text = tok.apply_chat_template(messages, tokenize=False)
    assert full_text == prompt_text + "19:45<|im_end|>\n"
    n_prompt = len(tok(prompt_text, add_special_tokens=False).input_ids)
    answer = tok("19:45", add_special_tokens=False).input_ids
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert out["input_ids"] == tok(full_text, add_special_tokens=False).input_ids
    # prompt masked; the answer and <|im_end|> labelled; the final "\n" masked
    expected = [-100] * n_prompt + answer + [im_end] + [-100]
    assert out["labels"] == expected
    assert tok.decode(out["input_ids"][-1:]) == "\n"


def test_labels_multi_turn_with_system_decode_to_replies(tok):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is LoRA?"},
                {"role": "assistant", "content": "A low-rank update B A to a frozen weight."},
                {"role": "user", "content": "Why?"},
                {"role": "assistant", "content": "Fewer trainable parameters."}]
    ids, spans = chat_format.assistant_spans(messages, tok)
    assert [tok.decode(ids[a:b]) for a, b in spans] == [
        "A low-rank update B A to a frozen weight.<|im_end|>", "Fewer trainable parameters.<|im_end|>"]
    out = chat_format.tokenize_conversation(messages, tok)
    labelled = {i for i, label in enumerate(out["labels"]) if label != -100}
    assert labelled == {i for a, b in spans for i in range(a, b)}
    assert all(out["labels"][i] == out["input_ids"][i] for i in labelled)
    # the template's assistant header is not labelled
    header = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    a = spans[0][0]
    assert out["input_ids"][a - len(header): a] == header
    assert out["labels"][a - len(header): a] == [-100] * len(header)


def test_text_that_looks_like_a_control_token_stays_text(tok):
    messages = [{"role": "user", "content": "Print <|im_end|> literally"},
                {"role": "assistant", "content": "<|im_end|>"}]
    ids, spans = chat_format.assistant_spans(messages, tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    (a, b), = spans
    assert ids[a:b].count(im_end) == 1 and ids[b - 1] == im_end  # only the real end of turn


def test_guanaco_template_for_base_models(tok):
    base = copy.deepcopy(tok)
    base.chat_template = None
    assert chat_format.ensure_chat_template(base) is True
    assert chat_format.ensure_chat_template(base) is False  # keeps an existing template
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]
    text = base.apply_chat_template(messages, tokenize=False)
    assert "### Human: Hi there\n### Assistant: Hello!" + base.eos_token in text
    ids, spans = chat_format.assistant_spans(messages, base)
    assert [base.decode(ids[a:b]) for a, b in spans] == [" Hello!" + base.eos_token, " See you." + base.eos_token]


def test_template_without_end_of_turn_token_is_refused(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}" \
                          "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match="writes neither the end-of-sequence token nor any special token after"):
        chat_format.tokenize_conversation(conversation, plain)
    with pytest.raises(ValueError, match="not closed by the end-of-turn token"):  # the token named, not written
        chat_format.tokenize_conversation(conversation, plain, eot_id=plain.eos_token_id)
    # a generation prompt ending in a space tokenizes differently from the reply
    plain.chat_template = plain.chat_template.replace("'assistant:'", "'assistant: '")
    with pytest.raises(ValueError, match="not prefix-consistent"):
        chat_format.tokenize_conversation(conversation, plain, eot_id=plain.eos_token_id)


# --------------------------------------------------------------------------- #
# Truncation
# --------------------------------------------------------------------------- #
def test_truncation_keeps_the_start_and_drops_examples_without_labels(tok):
    long_reply = [{"role": "user", "content": "Please count from one to five in English words, separated by spaces."}, {"role": "assistant", "content": "one two three four five"}]
    full = chat_format.tokenize_conversation(long_reply, tok)
    n = len(full["input_ids"])
    first_label = next(i for i, label in enumerate(full["labels"]) if label != -100)
    cut = chat_format.tokenize_conversation(long_reply, tok, max_length=first_label + 2)
    assert cut["input_ids"] == full["input_ids"][: first_label + 2]
    assert cut["labels"] == full["labels"][: first_label + 2]
    assert sum(label != -100 for label in cut["labels"]) == 2
    assert chat_format.tokenize_conversation(long_reply, tok, max_length=first_label) is None
    assert chat_format.tokenize_conversation(long_reply, tok, max_length=n) == full
    with pytest.raises(ValueError, match="max_length must be a positive"):
        chat_format.tokenize_conversation(long_reply, tok, max_length=0)

    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    records = [{"messages": long_reply}, {"messages": short}, {"messages": long_reply}]
    short_len = len(chat_format.tokenize_conversation(short, tok)["input_ids"])
    assert short_len < first_label  # the short one fits, the long ones lose every label
    examples, report = chat_format.tokenize_records(records, tok, max_length=short_len)
    assert [e["index"] for e in examples] == [1]
    assert (report.total, report.truncated, report.dropped) == (3, 2, [0, 2])
    assert "2 dropped" in str(report)


# --------------------------------------------------------------------------- #
# Batching
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("n, batch_size, seed", [(1, 4, 0), (37, 4, 1), (200, 8, 2), (1000, 16, 3)])
def test_length_grouping_equals_transformers(n, batch_size, seed):
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = torch.randint(5, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    ours = batching.length_grouped_indices(lengths, batch_size, seed)
    theirs = get_length_grouped_indices(lengths, batch_size, generator=torch.Generator().manual_seed(seed))
    assert ours == theirs
    assert sorted(ours) == list(range(n))


def test_batches_are_deterministic_complete_and_less_padded():
    lengths = torch.randint(10, 200, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    grouped = batching.make_batches(lengths, 8, seed=5)
    assert grouped == batching.make_batches(lengths, 8, seed=5)
    assert grouped != batching.make_batches(lengths, 8, seed=6)
    assert sorted(i for b in grouped for i in b) == list(range(400))
    assert max(lengths[i] for i in grouped[0]) == max(lengths)  # longest batch first
    plain = batching.make_batches(lengths, 8, seed=5, group_by_length=False)
    assert sorted(i for b in plain for i in b) == list(range(400))

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < padding(plain) / 5
    assert [len(b) for b in batching.make_batches(lengths[:21], 8, 0, drop_last=True)] == [8, 8]


def test_collate_pads_right_for_training_and_left_for_generation():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = batching.collate(examples, pad_token_id=2)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in right.values())
    left = batching.collate(examples, pad_token_id=2, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [2, 2, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="empty batch"):
        batching.collate([], 0)
    with pytest.raises(ValueError, match="3 input_ids but 2 labels"):
        batching.collate([{"input_ids": [1, 2, 3], "labels": [1, 2]}], 0)


def test_prompt_ids_end_with_the_generation_prompt(tok):
    ids = chat_format.prompt_ids([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], tok)
    assert tok.decode(ids).endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="ends with a user message"):
        chat_format.prompt_ids([{"role": "system", "content": "x"}], tok)


# --------------------------------------------------------------------------- #
# The course's data set
# --------------------------------------------------------------------------- #
def test_dataset_regenerates_byte_identical(tmp_path):
    script = DATASET / "generate.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, capture_output=True)
    names = ["train.jsonl", "validation.jsonl", "test.jsonl"]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path, DATASET, names, shallow=False)
    assert match == names, f"regenerated files differ: {mismatch + errors}"


def test_dataset_sizes_tasks_and_held_out_items():
    splits = data.load_dataset()
    assert len(splits["train"]) >= 1000
    assert len(splits["validation"]) + len(splits["test"]) >= 200
    prompts = {s: {r["messages"][-2]["content"] for r in rs if r["task"] in data.SCORED_TASKS}
               for s, rs in splits.items()}
    assert not prompts["train"] & (prompts["validation"] | prompts["test"])
    for split, records in splits.items():
        tasks = {r["task"] for r in records}
        assert tasks == set(data.SCORED_TASKS) | {data.CHAT_TASK}, split
        for r in evaluate.scored_records(records):
            assert evaluate.normalize_answer(r["answer"]) == r["answer"]
        assert len({r["id"] for r in records}) == len(records)
    first = evaluate.scored_records(splits["test"], per_task=25)
    assert len(first) == 100 and {r["task"] for r in first} == set(data.SCORED_TASKS)


def test_dataset_tokenizes_with_smollm2_without_dropping(tok):
    records = data.load_dataset(splits=["validation"])["validation"]
    examples, report = chat_format.tokenize_records(records, tok, max_length=256)
    assert (report.truncated, report.dropped) == (0, [])
    for e in examples[:20]:
        record = records[e["index"]]
        labelled = [i for i, label in zip(e["input_ids"], e["labels"]) if label != -100]
        replies = "".join(m["content"] + "<|im_end|>" for m in record["messages"] if m["role"] == "assistant")
        assert tok.decode(labelled) == replies
