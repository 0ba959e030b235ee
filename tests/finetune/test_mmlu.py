"""MMLU for a 7B adapter (qlora_lab.finetune.mmlu), offline: a few questions
written on disk in the schema and layout of ``cais/mmlu`` (``all/<split>-*.parquet``;
question, subject, choices, answer as a class label A-D)."""

import pytest
import torch

from qlora_lab.__main__ import main
from qlora_lab.finetune import mmlu
from qlora_lab.finetune.hub_data import DataSourceError


def row(subject, question, choices, answer):
    return {"question": question, "subject": subject, "choices": choices, "answer": answer}


TEST = [row("astronomy", "Which planet is closest to the Sun?", ["Venus", "Mercury", "Mars", "Earth"], 1),
        row("astronomy", "What is the Moon?", ["A star", "A planet", "A satellite", "A comet"], 2),
        row("high_school_mathematics", "What is 2 + 2?", ["3", "4", "5", "22"], 1),
        row("high_school_mathematics", "What is 3 x 3?", ["6", "9", "33", "12"], 1)]
DEV = [row("astronomy", f"Dev question {i}?", ["w", "x", "y", "z"], i % 4) for i in range(6)] + \
      [row("high_school_mathematics", f"Sum {i}?", ["a", "b", "c", "d"], (i + 1) % 4) for i in range(5)]


@pytest.fixture
def mmlu_dir(tmp_path):
    import datasets

    features = datasets.Features({"question": datasets.Value("string"), "subject": datasets.Value("string"),
                                  "choices": datasets.Sequence(datasets.Value("string")),
                                  "answer": datasets.ClassLabel(names=list(mmlu.LETTERS))})
    directory = tmp_path / "mmlu"
    (directory / "all").mkdir(parents=True)
    for split, rows in [("test", TEST), ("validation", TEST[:2]), ("dev", DEV)]:
        datasets.Dataset.from_list(rows, features=features).to_parquet(
            str(directory / "all" / f"{split}-00000-of-00001.parquet"))
    return directory


@pytest.fixture(scope="module")
def tiny():
    from qlora_lab.models import load_model

    return load_model("tiny-llama")  # SmolLM2's tokenizer: " A" ... " D" are one token each


def test_a_download_and_its_all_folder_read_alike_and_a_missing_split_is_named(mmlu_dir):
    splits = mmlu.load_mmlu(str(mmlu_dir))
    assert splits["test"] == TEST and splits["dev"] == DEV and len(splits["validation"]) == 2
    assert mmlu.load_mmlu(str(mmlu_dir / "all")) == splits
    (mmlu_dir / "all" / "dev-00000-of-00001.parquet").unlink()
    with pytest.raises(DataSourceError, match="no MMLU test and dev parquet files"):
        mmlu.load_mmlu(str(mmlu_dir))


def test_the_hub_name_offline_says_what_to_download(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataSourceError, match="hf download --repo-type dataset cais/mmlu --local-dir data/mmlu"):
        mmlu.load_mmlu("cais/mmlu")


def test_the_prompt_is_the_reference_format_and_drops_shots_to_fit(tiny):
    _, tokenizer = tiny
    text = mmlu.prompt(TEST[2], DEV[6:8], tokenizer)
    assert text == ("The following are multiple choice questions (with answers) about high school mathematics.\n\n"
                    "Sum 0?\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n"
                    "Sum 1?\nA. a\nB. b\nC. c\nD. d\nAnswer: C\n\n"
                    "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")
    one_shot = len(tokenizer(mmlu.prompt(TEST[2], DEV[6:7], tokenizer))["input_ids"])
    assert mmlu.prompt(TEST[2], DEV[6:8], tokenizer, max_length=one_shot) == mmlu.prompt(TEST[2], DEV[6:7], tokenizer)
    with pytest.raises(ValueError, match="has 4 choices, this one 3"):
        mmlu.format_question(row("x", "q", ["a", "b", "c"], 0), False)


def letter_log_likelihoods(model, tokenizer, text):
    """The definition, one full forward per letter: the summed log-probability of
    the tokens that " A" (...) adds after the prompt."""
    prompt_ids = tokenizer(text)["input_ids"]
    scores = []
    for letter in mmlu.LETTERS:
        ids = tokenizer(text + " " + letter)["input_ids"]
        shared = next(i for i, (a, b) in enumerate(zip(ids + [None], prompt_ids + [None])) if a != b)
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        scores.append(sum(log_probs[j - 1, ids[j]].item() for j in range(shared, len(ids))))
    return scores


def test_the_choice_is_the_letter_with_the_highest_log_likelihood(tiny, tmp_path):
    from qlora_lab.models.tiny import write_tiny_chat_model

    model, tokenizer = tiny
    text = mmlu.prompt(TEST[0], DEV[:2], tokenizer)
    choice, scores = mmlu.choose(model.eval(), tokenizer, text)  # one forward: every letter is one token
    assert scores == pytest.approx(letter_log_likelihoods(model, tokenizer, text), abs=1e-4)
    assert choice == max(range(4), key=lambda i: scores[i])
    # a tokenizer of 384 tokens, where " A" is two tokens: one forward per letter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = write_tiny_chat_model(tmp_path / "chat")
    small, small_tokenizer = AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)
    assert len(small_tokenizer(text + " A")["input_ids"]) > len(small_tokenizer(text)["input_ids"]) + 1
    _, scores = mmlu.choose(small, small_tokenizer, text)
    assert scores == pytest.approx(letter_log_likelihoods(small, small_tokenizer, text), abs=1e-4)


class AlwaysB(torch.nn.Module):
    """A model that puts all its probability on the token " B"."""

    def __init__(self, tokenizer):
        super().__init__()
        self.b = tokenizer(" B", add_special_tokens=False)["input_ids"][-1]
        self.vocab = len(tokenizer)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.b] = 10.0
        return type("Output", (), {"logits": logits})()


def test_the_score_counts_per_subject(tiny):
    _, tokenizer = tiny
    result = mmlu.score(AlwaysB(tokenizer), tokenizer, TEST, DEV)
    # answers B, C, B, B: three right
    assert (result.correct, result.total) == (3, 4) and result.accuracy == 0.75
    assert result.per_subject == {"astronomy": [1, 2], "high_school_mathematics": [2, 2]}
    assert str(result) == "MMLU 3/4 = 75.0% over 2 subjects"
    assert mmlu.score(AlwaysB(tokenizer), tokenizer, TEST, DEV, limit=1).total == 1


def test_the_command_scores_a_base_model_and_an_adapter(mmlu_dir, tmp_path, capsys):
    from qlora_lab.models.tiny import write_tiny_adapter, write_tiny_chat_model

    base = write_tiny_chat_model(tmp_path / "base")
    adapter = write_tiny_adapter(base, tmp_path / "adapter")
    assert main(["mmlu", "--model", str(base), "--data", str(mmlu_dir), "--limit", "3", "--shots", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("MMLU ") and "/3 = " in out and "(test split, 2-shot;" in out
    assert main(["mmlu", "--adapter", str(adapter), "--data", str(mmlu_dir), "--split", "validation"]) == 0
    assert "/2 = " in capsys.readouterr().out
    assert main(["mmlu", "--data", str(mmlu_dir)]) == 2
    assert "mmlu needs --adapter DIR" in capsys.readouterr().err
