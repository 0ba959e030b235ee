"""Data from outside the course (qlora_lab.finetune.hub_data): there is no data
hub on the course's machines, so each test builds a small data set on disk in
the hub's exact schema (file names, split names and columns as the hub's copy
has them) and reads it the way a learner's download would be read."""

import json
import warnings

import pytest

from qlora_lab.__main__ import main
from qlora_lab.finetune import chat_format
from qlora_lab.finetune import hub_data as H
from qlora_lab.finetune.recipe import preset
from qlora_lab.finetune.step import MANY_EPOCHS, epochs_of

def oasst1_row(message_id, parent_id, role, text, tree, rank=None, deleted=False, review_result=True):
    """One message of OpenAssistant/oasst1, with every column of the hub's parquet files."""
    return {"message_id": message_id, "parent_id": parent_id, "user_id": "u-" + message_id,
            "created_date": "2023-02-05T14:23:50.983374+00:00", "text": text, "role": role, "lang": "en",
            "review_count": 3, "review_result": review_result, "deleted": deleted, "rank": rank,
            "synthetic": False, "model_name": None, "detoxify": None, "message_tree_id": tree,
            "tree_state": "ready_for_export", "emojis": None, "labels": None}


OASST1_TRAIN = [
    # tree a: a prompt, two ranked replies (the best is rank 0), a follow-up prompt without a reply
    oasst1_row("a0", None, "prompter", "How do I boil an egg?", "a"),
    oasst1_row("a1", "a0", "assistant", "Put it in boiling water for eight minutes.", "a", rank=0),
    oasst1_row("a2", "a0", "assistant", "Fry it.", "a", rank=1),
    oasst1_row("a3", "a1", "prompter", "And soft-boiled?", "a"),
    # tree b: the better-ranked reply is deleted, so the other one is followed
    oasst1_row("b0", None, "prompter", "Translate 'cat' to German.", "b"),
    oasst1_row("b1", "b0", "assistant", "Hund.", "b", rank=0, deleted=True),
    oasst1_row("b2", "b0", "assistant", "Katze.", "b", rank=1),
    # tree c: a prompt nobody answered: no conversation
    oasst1_row("c0", None, "prompter", "Hello?", "c"),
]
OASST1_VALIDATION = [oasst1_row("v0", None, "prompter", "Is water wet?", "v"),
                     oasst1_row("v1", "v0", "assistant", "It makes things wet.", "v", rank=0)]


@pytest.fixture
def oasst1_dir(tmp_path):
    """OpenAssistant/oasst1's parquet files as the hub's repository lays them out."""
    import datasets

    directory = tmp_path / "oasst1"
    (directory / "data").mkdir(parents=True)
    datasets.Dataset.from_list(OASST1_TRAIN).to_parquet(str(directory / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(OASST1_VALIDATION).to_parquet(
        str(directory / "data" / "validation-00000-of-00001.parquet"))
    return directory


ALPACA = [{"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i), "text": "..."} for i in range(40)]
ALPACA[0] = {"instruction": "Summarize the text.", "input": "The cat sat on the mat.", "output": "A cat sat.",
             "text": "..."}


@pytest.fixture
def alpaca_dir(tmp_path):
    """tatsu-lab/alpaca: one parquet file of the train split (instruction, input, output, text)."""
    import datasets

    directory = tmp_path / "alpaca"
    (directory / "data").mkdir(parents=True)
    datasets.Dataset.from_list(ALPACA).to_parquet(str(directory / "data" / "train-00000-of-00001.parquet"))
    return directory


# --------------------------------------------------------------------------- #
# each schema into the chat format
# --------------------------------------------------------------------------- #
def test_the_guanaco_set_reads_its_eval_file_as_the_held_out_split(guanaco_dir):
    loaded = H.load_hub_data(str(guanaco_dir))
    assert loaded.data_format == "guanaco"
    assert [len(loaded.splits["train"]), len(loaded.splits["validation"])] == [4, 1]
    assert loaded.splits["train"][1]["messages"] == [
        {"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "7 is prime."},
        {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "11."}]
    assert loaded.skipped == {"train": 1, "validation": 0}
    text = str(loaded)
    assert "read as guanaco (train 4, validation 1 conversations)" in text
    assert "train: skipped 1 rows that are not a valid conversation" in text and "no turn markers" in text


def test_oasst1_trees_become_their_best_ranked_paths(oasst1_dir):
    loaded = H.load_hub_data(str(oasst1_dir))
    assert loaded.data_format == "oasst1"
    conversations = [[m["content"] for m in r["messages"]] for r in loaded.splits["train"]]
    # a: the rank-0 reply, and the trailing prompt dropped; b: the deleted reply is not followed;
    # c: a prompt alone makes no conversation and is counted as skipped
    assert conversations == [["How do I boil an egg?", "Put it in boiling water for eight minutes."],
                             ["Translate 'cat' to German.", "Katze."]]
    assert loaded.skipped["train"] == 1
    assert [m["content"] for m in loaded.splits["validation"][0]["messages"]] == ["Is water wet?",
                                                                                 "It makes things wet."]


def test_alpaca_without_a_held_out_split_keeps_its_last_rows_for_validation(alpaca_dir):
    loaded = H.load_hub_data(str(alpaca_dir))
    assert loaded.data_format == "alpaca" and loaded.held_out_from_train
    assert [len(loaded.splits["train"]), len(loaded.splits["validation"])] == [38, 2]  # 5% of 40
    assert loaded.splits["train"][0]["messages"][0]["content"] == "Summarize the text.\n\nThe cat sat on the mat."
    assert loaded.splits["validation"][-1]["messages"][1]["content"] == "78"
    assert "validation = the last rows of train" in str(loaded)


def test_a_messages_file_and_a_saved_dataset_dict_read_alike(tmp_path, write_jsonl):
    import datasets

    rows = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": str(i)}]}
            for i in range(20)]
    from_file = H.load_hub_data(str(write_jsonl(tmp_path / "chats.jsonl", rows)))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:19]),
                          "test": datasets.Dataset.from_list(rows[19:])}).save_to_disk(str(tmp_path / "saved"))
    from_disk = H.load_hub_data(str(tmp_path / "saved"))
    assert from_file.data_format == from_disk.data_format == "messages"
    assert from_file.splits == from_disk.splits  # the file's last 5% (1 row) is the saved dict's test split
    assert from_disk.splits["validation"] == [rows[19]]


def test_the_course_layout_is_read_by_the_course_loader(small_data):
    splits, text = H.load_splits(str(small_data))
    assert [len(splits["train"]), len(splits["validation"])] == [48, 8]
    assert text == f"data: {small_data} (train 48, validation 8 conversations)"


# --------------------------------------------------------------------------- #
# bad sources are explained
# --------------------------------------------------------------------------- #
def test_a_hub_name_without_a_network_says_how_to_download_it(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(H.DataSourceError) as err:
        H.load_table("timdettmers/openassistant-guanaco")
    message = str(err.value)
    assert "could not read it from the Hugging Face hub" in message
    assert ("hf download --repo-type dataset timdettmers/openassistant-guanaco "
            "--local-dir data/openassistant-guanaco and pass --data data/openassistant-guanaco") in message


@pytest.mark.parametrize("make, message", [
    (lambda p, write: p / "missing" / "dir", "no such file or directory, and not a hub name"),
    (lambda p, write: write(p / "rows.csv", []), "a .csv file; give a .jsonl, .json, .parquet, .arrow file"),
    (lambda p, write: write(p / "rows.jsonl", [{"question": "q", "answer": "a"}] * 3),
     "match none of the known schemas"),
    (lambda p, write: write(p / "rows.jsonl", [{"text": "no markers"}] * 3),
     "no row of the train split is a valid conversation as guanaco"),
    (lambda p, write: write(p / "d" / "notes.txt", []).parent, "could not read the data files here"),
    (lambda p, write: (p / "rows.jsonl").write_text('{"text": "### Human: a### Assistant: b"}\n{"text": \n') and
     p / "rows.jsonl", "could not read the data files here"),
])
def test_bad_sources_say_what_is_wrong(tmp_path, write_jsonl, make, message):
    with pytest.raises(H.DataSourceError, match="--data") as err:
        H.load_hub_data(str(make(tmp_path, write_jsonl)))
    assert message in str(err.value)


def test_a_named_format_overrides_detection_and_an_unknown_one_is_refused(guanaco_dir):
    with pytest.raises(H.DataSourceError, match="no row of the train split is a valid conversation as alpaca"):
        H.load_hub_data(str(guanaco_dir), "alpaca")
    with pytest.raises(ValueError, match="data_format must be auto or one of guanaco, oasst1, alpaca, messages"):
        preset("smollm2-cpu", data_format="sharegpt")


# --------------------------------------------------------------------------- #
# what the loss covers, where a turn ends, how many epochs
# --------------------------------------------------------------------------- #
CONVERSATION = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]


def test_train_on_all_labels_every_token_and_assistant_only_the_reply():
    from qlora_lab.models.tiny import tiny_chat_tokenizer

    tokenizer = tiny_chat_tokenizer()
    reply = chat_format.tokenize_conversation(CONVERSATION, tokenizer, train_on="assistant")
    everything = chat_format.tokenize_conversation(CONVERSATION, tokenizer, train_on="all")
    assert reply["input_ids"] == everything["input_ids"] == everything["labels"]
    labelled = [t for t, label in zip(reply["input_ids"], reply["labels"]) if label != -100]
    assert tokenizer.decode(labelled) == "Hi!<|im_end|>"
    with pytest.raises(ValueError, match="train_on must be one of assistant, all"):
        chat_format.tokenize_conversation(CONVERSATION, tokenizer, train_on="human")


def test_the_end_of_turn_comes_from_the_template_when_eos_is_another_token():
    """Qwen2.5's base models: ChatML turns closed by <|im_end|>, but eos is <|endoftext|>."""
    from qlora_lab.models.tiny import tiny_chat_tokenizer

    tokenizer = tiny_chat_tokenizer()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert chat_format.end_of_turn_id(tokenizer) == im_end  # eos is <|im_end|> and the template writes it
    tokenizer.eos_token = "<|endoftext|>"
    assert chat_format.end_of_turn_id(tokenizer) == im_end
    assert chat_format.end_of_turn_id(tokenizer, "<|endoftext|>") == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="'<eot>' is not one token of this tokenizer's vocabulary"):
        chat_format.end_of_turn_id(tokenizer, "<eot>")


def test_many_epochs_warn_and_few_do_not():
    config = preset("smollm2-cpu", max_steps=30, batch_size=8)  # 240 examples seen
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert epochs_of(config, 240) == 1.0
    with pytest.warns(UserWarning, match=f"go 6.0 times through the 40 training examples: above {MANY_EPOCHS}"):
        assert epochs_of(config, 40) == 6.0


# --------------------------------------------------------------------------- #
# the command line, end to end
# --------------------------------------------------------------------------- #
def test_finetune_trains_on_a_downloaded_guanaco_set(guanaco_dir, tmp_path, capsys):
    code = main(["finetune", "--preset", "smollm2-cpu", "--model", "tiny-llama", "--data", str(guanaco_dir),
                 "--train-on", "all", "--max-steps", "2", "--set", "batch_size=2", "--set", "eval_every=2",
                 "--progress", "none", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"data: {guanaco_dir} read as guanaco (train 4, validation 1 conversations" in out
    assert "epochs: 2 steps x 2 examples = 1.00 passes over the training examples" in out
    assert "trained 2 steps with the qlora_lab backend" in out
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())["config"]
    assert saved["train_on"] == "all" and saved["data"] == str(guanaco_dir)


def test_another_model_drops_the_preset_s_stand_in_memory_config():
    from qlora_lab.__main__ import build_parser, resolve_config

    parse = build_parser().parse_args
    assert resolve_config(parse(["finetune", "--preset", "llama-7b-gpu"])).memory_config == "llama-7b"
    other = parse(["finetune", "--preset", "llama-7b-gpu", "--model", "mistralai/Mistral-7B-v0.3"])
    assert resolve_config(other).memory_config is None
    named = parse(["finetune", "--preset", "llama-7b-gpu", "--model", "x/y", "--set", "memory_config=llama-7b"])
    assert resolve_config(named).memory_config == "llama-7b"
    cleared = parse(["finetune", "--preset", "llama-7b-gpu", "--set", "memory_config=none"])
    assert resolve_config(cleared).memory_config is None


def sentencepiece_tokenizer(texts):
    """A tokenizer of LLaMA's and Mistral's kind, trained here: SentencePiece-style
    BPE (words marked with a leading "▁", bytes as <0x..> tokens for anything
    unseen), <s> before every text, </s> as the end of sequence, no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=[f"<0x{i:02X}>" for i in range(256)])
    backend.train_from_iterator(texts * 4, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_the_guanaco_template_labels_replies_with_a_sentencepiece_tokenizer(guanaco_dir):
    """A base model without a chat template gets the Guanaco format; with LLaMA's
    kind of tokenizer (a space is part of the next word's token) each reply and
    its </s> are labelled, nothing of the human turns. This vocabulary learned
    "\n###" as one token, so the newline after a reply's </s> merges with the next
    turn: the spans are checked for consistency up to the </s>, not beyond."""
    train = H.load_hub_data(str(guanaco_dir)).splits["train"]
    rows = (guanaco_dir / "openassistant_best_replies_train.jsonl").read_text().splitlines()
    tokenizer = sentencepiece_tokenizer([json.loads(row)["text"].replace("### ", "\n### ") for row in rows])
    assert chat_format.ensure_chat_template(tokenizer)
    assert chat_format.end_of_turn_id(tokenizer) == tokenizer.eos_token_id
    messages = train[1]["messages"]
    tokenized = chat_format.tokenize_conversation(messages, tokenizer)
    labelled = [t for t, label in zip(tokenized["input_ids"], tokenized["labels"]) if label != -100]
    assert tokenizer.decode(labelled) == "7 is prime.</s> 11.</s>"
    assert tokenizer.decode(tokenized["input_ids"]).startswith("<s>### Human: Name a prime number.\n### Assistant: 7")
    assert "\n###" in tokenizer.convert_ids_to_tokens(tokenized["input_ids"])


def test_a_gated_model_gets_a_one_line_hint(monkeypatch, capsys):
    """Llama 3.1 is gated: transformers raises an OSError naming the gated repo;
    the command says how to get access instead of a traceback."""
    import qlora_lab.finetune.train as train_module

    def gated(*args, **kwargs):
        raise OSError("You are trying to access a gated repo. Make sure to have access to it at "
                      "https://huggingface.co/meta-llama/Llama-3.1-8B.")

    monkeypatch.setattr(train_module, "train", gated)
    monkeypatch.setattr(train_module, "resolve_device", lambda config: __import__("torch").device("cpu"))
    assert main(["finetune", "--preset", "smollm2-cpu", "--model", "meta-llama/Llama-3.1-8B", "--out", "x"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: You are trying to access a gated repo")
    assert err[1] == ("hint: accept the model's licence on its hub page, then log in on this machine with "
                      "`hf auth login` (or set HF_TOKEN)")


def test_preflight_warns_about_stopping_dropped_examples_and_a_borrowed_template():
    """Each check of a run's tokenized examples, with a SentencePiece tokenizer
    that had no template (so the run borrows Guanaco's)."""
    from qlora_lab.finetune.step import preflight

    tokenizer = sentencepiece_tokenizer(["### Human: Say hi.\n### Assistant: Hi there, friend!"])
    chat_format.ensure_chat_template(tokenizer)
    eot = chat_format.end_of_turn_id(tokenizer)
    records = [{"messages": [{"role": "user", "content": "Say hi."},
                             {"role": "assistant", "content": "Hi there, friend! " * 3}]}] * 4
    config = preset("smollm2-cpu", max_steps=1, batch_size=4, max_length=14)
    examples, report = chat_format.tokenize_records(records, tokenizer, config.max_length, eot)
    with pytest.warns(UserWarning) as caught:
        assert preflight(config, examples, report, tokenizer, eot) == 1.0
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("only 0 of the 4 training examples have their end-of-turn token ('</s>')") for m in messages)
    assert any("trains it in Guanaco's '### Human: ... ### Assistant:' format" for m in messages)
    long_question = [{"messages": [{"role": "user", "content": "Say hi. " * 10},
                                   {"role": "assistant", "content": "Hi!"}]}] * 3
    examples, report = chat_format.tokenize_records(records + long_question, tokenizer, config.max_length, eot)
    with pytest.warns(UserWarning, match=r"3 examples have no reply within max_length=14 tokens and are left out"):
        preflight(config, examples, report, tokenizer, eot)
    long_enough = preset("smollm2-cpu", max_steps=1, batch_size=4, max_length=200)
    examples, report = chat_format.tokenize_records(records, tokenizer, long_enough.max_length, eot)
    tokenizer.chat_template = tokenizer.chat_template + " "  # a template of the model's own
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preflight(long_enough, examples, report, tokenizer, eot)
