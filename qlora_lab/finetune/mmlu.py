"""MMLU: the multiple-choice benchmark QLoRA reports (Sec. 4-5, Tables 3 and 4), for a 7B adapter.

The course's exact-match tasks measure a small model on what it was taught;
a 7B model finetuned on the paper's data is measured as the paper measured it:
MMLU (Hendrycks et al., 2021), 57 subjects of four-choice questions, 5-shot.

1. **The prompt** (:func:`prompt`), in the format of MMLU's reference code:
   ``The following are multiple choice questions (with answers) about
   <subject>.``, then five solved questions of the same subject from the
   ``dev`` split, then the question, its choices ``A.`` to ``D.`` and
   ``Answer:``. A prompt longer than ``max_length`` tokens loses shots from the
   end until it fits, as the reference code does.
2. **The answer** (:func:`choose`): no text is generated. The model's
   log-likelihood of each letter as the next token after ``Answer:`` decides;
   the most likely letter is the model's answer. A letter that is not one
   token after the prompt (a tokenizer that merges it with the space) is
   scored by the sum of its tokens' log-likelihoods.
3. **The score** (:func:`score`): accuracy over the questions, and per subject.

The data is ``cais/mmlu`` (configuration ``all``: splits ``test``, ``validation``,
``dev``; columns ``question``, ``subject``, ``choices``, ``answer`` with 0-3 for
A-D), read through ``datasets`` from the hub, or from a download
(``hf download --repo-type dataset cais/mmlu --local-dir data/mmlu``), whose
``all/`` folder holds one parquet file per split (:func:`load_mmlu`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

LETTERS = ("A", "B", "C", "D")
MMLU_HUB_NAME = "cais/mmlu"
SPLITS = ("test", "validation", "dev")


def load_mmlu(source: str = MMLU_HUB_NAME) -> dict[str, list[dict]]:
    """``{"test": rows, "validation": rows, "dev": rows}`` of MMLU's ``all``
    configuration, from the hub or from a downloaded copy (its directory, or
    its ``all/`` folder). Offline, a hub name fails with what to download."""
    import datasets

    from qlora_lab.finetune.hub_data import DataSourceError, read_local

    path = Path(source).expanduser()
    if path.is_dir():
        folder = path / "all" if (path / "all").is_dir() else path
        files = {s: sorted(str(f) for f in folder.glob(f"{s}-*.parquet")) for s in SPLITS}
        files = {s: f for s, f in files.items() if f}
        if "test" not in files or "dev" not in files:
            raise DataSourceError(f"--data {source}: no MMLU test and dev parquet files in {folder} (a download of "
                                  f"{MMLU_HUB_NAME} has all/test-*.parquet and all/dev-*.parquet)")
        tables = read_local(source, lambda: datasets.load_dataset("parquet", data_files=files))
    else:
        try:
            tables = datasets.load_dataset(source, "all")
        except Exception as err:  # noqa: BLE001  (offline, a typo: datasets raises many kinds)
            raise DataSourceError(f"--data {source}: could not read MMLU from the hub ({type(err).__name__}). On a "
                                  f"machine with a network, download it first: hf download --repo-type dataset "
                                  f"{MMLU_HUB_NAME} --local-dir data/mmlu and pass --data data/mmlu") from None
    return {name: tables[name].to_list() for name in tables}


def format_question(row: dict, with_answer: bool) -> str:
    """One question as MMLU's reference code writes it."""
    if len(row["choices"]) != len(LETTERS):
        raise ValueError(f"an MMLU question has {len(LETTERS)} choices, this one {len(row['choices'])}: "
                         f"{row['question'][:60]!r}")
    text = row["question"].strip() + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, row["choices"]))
    return text + "\nAnswer:" + (f" {LETTERS[row['answer']]}\n\n" if with_answer else "")


def prompt(row: dict, shots: list[dict], tokenizer, max_length: int = 2048) -> str:
    """The k-shot prompt for ``row``: the header naming its subject, the
    ``shots`` (solved questions of the same subject), the question. Shots are
    dropped from the end while the prompt is longer than ``max_length`` tokens."""
    header = f"The following are multiple choice questions (with answers) about {row['subject'].replace('_', ' ')}.\n\n"
    for k in range(len(shots), -1, -1):
        text = header + "".join(format_question(s, True) for s in shots[:k]) + format_question(row, False)
        if k == 0 or len(tokenizer(text)["input_ids"]) <= max_length:
            return text
    raise AssertionError("unreachable")


@torch.no_grad()
def choose(model, tokenizer, text: str) -> tuple[int, list[float]]:
    """The index of the letter the model finds most likely after ``text``, and
    the log-likelihood of each letter (see the module docstring, point 2)."""
    device = next(model.parameters()).device
    prompt_ids = tokenizer(text)["input_ids"]
    options = [tokenizer(text + " " + letter)["input_ids"] for letter in LETTERS]
    if all(o[:len(prompt_ids)] == prompt_ids and len(o) == len(prompt_ids) + 1 for o in options):
        logits = model(torch.tensor([prompt_ids], device=device)).logits[0, -1].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        scores = [float(log_probs[o[-1]]) for o in options]
    else:
        scores = []
        for o in options:
            shared = 0  # the tokens this option shares with the prompt alone
            while shared < min(len(o), len(prompt_ids)) and o[shared] == prompt_ids[shared]:
                shared += 1
            log_probs = torch.log_softmax(model(torch.tensor([o], device=device)).logits[0].float(), dim=-1)
            scores.append(sum(float(log_probs[j - 1, o[j]]) for j in range(max(shared, 1), len(o))))
    return max(range(len(LETTERS)), key=lambda i: scores[i]), scores


@dataclass
class MMLUResult:
    correct: int = 0
    total: int = 0
    per_subject: dict[str, list[int]] = field(default_factory=dict)  # subject -> [correct, total]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"MMLU {self.correct}/{self.total} = {self.accuracy:.1%} over {len(self.per_subject)} subjects"


def score(model, tokenizer, questions: list[dict], dev: list[dict], shots: int = 5,
             max_length: int = 2048, limit: int | None = None) -> MMLUResult:
    """Accuracy on ``questions`` (the first ``limit`` of them), each with the
    first ``shots`` questions of its subject in ``dev`` as solved examples."""
    by_subject: dict[str, list[dict]] = {}
    for row in dev:
        by_subject.setdefault(row["subject"], []).append(row)
    result = MMLUResult()
    model.eval()
    for row in questions[:limit]:
        choice, _ = choose(model, tokenizer, prompt(row, by_subject.get(row["subject"], [])[:shots], tokenizer,
                                                    max_length))
        hit = int(choice == row["answer"])
        result.correct += hit
        result.total += 1
        counts = result.per_subject.setdefault(row["subject"], [0, 0])
        counts[0] += hit
        counts[1] += 1
    return result
