import hashlib
import math

import pytest
import torch

from qlora_lab.finetune import evaluate
from qlora_lab.finetune.evaluate import course_eval_text, course_eval_texts, negative_log_likelihood, perplexity

EVAL_TEXT_SHA256 = "27ddc4d7761fc22fb63aea88c49a2d0425dbd4d351481cbe363ad72261756790"


class ByteTokenizer:
    """Bytes as tokens (ids 0..255), enough to drive the tiny Llama."""

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        class Encoding:
            input_ids = torch.tensor([list(text.encode("utf-8"))])

        return Encoding()


def reference_nll(model, ids):
    with torch.no_grad():
        logits = model(ids.unsqueeze(0)).logits[0, :-1].double()
    return torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()


def test_course_text_is_unchanged():
    text = course_eval_text()
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == EVAL_TEXT_SHA256
    assert len(text.split()) == 1470


def test_course_texts_are_the_five_essays_of_the_joined_text():
    texts = course_eval_texts()
    assert list(texts) == ["01_lighthouse", "02_bread", "03_rivers", "04_numbers", "05_garden"]
    assert [len(t.split()) for t in texts.values()] == [320, 301, 312, 318, 219]  # the datasheet's word counts
    assert "\n\n".join(texts.values()) == course_eval_text()


def test_single_window_equals_direct_computation(tiny):
    text = "The lighthouse keeper climbed the stairs every evening."
    ids = ByteTokenizer()(text).input_ids[0]
    total, counted = negative_log_likelihood(tiny, ByteTokenizer(), text, window=512)
    assert counted == ids.numel() - 1
    assert total == pytest.approx(reference_nll(tiny, ids), rel=1e-6)
    assert perplexity(tiny, ByteTokenizer(), text) == pytest.approx(math.exp(total / counted), rel=1e-12)


def test_windows_predict_every_token_once(tiny):
    text = "abcdefghij" * 13  # 130 tokens
    for window, stride in [(40, 39), (40, 10), (5, 4), (130, 129), (200, None)]:
        total, counted = negative_log_likelihood(tiny, ByteTokenizer(), text, window=window, stride=stride)
        assert counted == 129
    # with full context in every window the sum equals the one-window sum
    one_window, _ = negative_log_likelihood(tiny, ByteTokenizer(), text, window=512)
    assert negative_log_likelihood(tiny, ByteTokenizer(), text, window=131)[0] == pytest.approx(one_window, rel=1e-9)


def test_model_mode_is_restored(tiny):
    tiny.train()
    perplexity(tiny, ByteTokenizer(), "hello world")
    assert tiny.training


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="non-empty"):
        perplexity(tiny, ByteTokenizer(), "  ")
    with pytest.raises(ValueError, match="window"):
        perplexity(tiny, ByteTokenizer(), "hello", window=1)
    with pytest.raises(ValueError, match="stride"):
        perplexity(tiny, ByteTokenizer(), "hello", window=8, stride=8)
    with pytest.raises(ValueError, match="two tokens"):
        perplexity(tiny, ByteTokenizer(), "a")


def test_smollm2_perplexity_matches_transformers_loss(smollm2):
    model, tokenizer = smollm2
    text = course_eval_text()[:1500]
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()  # transformers' mean next-token cross-entropy
    assert perplexity(model, tokenizer, text) == pytest.approx(math.exp(loss), rel=1e-4)


# --------------------------------------------------------------------------- #
# Exact match on the scored tasks 
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("prediction, answer, ok", [
    ("2021-03-05", "2021-03-05", True),
    ("  2021-03-05.\n", "2021-03-05", True),
    ("`19:45`", "19:45", True),
    ('"apple,bread ,  candle"', "apple, bread, candle", True),
    ("name = Anna Berg ;age=41;  city=Oslo", "name=Anna Berg; age=41; city=Oslo", True),
    ("2021-3-5", "2021-03-05", False),
    ("7:45", "07:45", False),
    ("The date is 2021-03-05", "2021-03-05", False),
    ("2021-03-05\nThat is March 5.", "2021-03-05", False),
    ("bread, apple, candle", "apple, bread, candle", False),
    ("name=anna berg; age=41; city=Oslo", "name=Anna Berg; age=41; city=Oslo", False),
    ("", "19:45", False),
])
def test_is_correct(prediction, answer, ok):
    assert evaluate.is_correct(prediction, answer) is ok


def test_is_correct_rejects_non_strings():
    with pytest.raises(TypeError):
        evaluate.is_correct(None, "x")


def test_score_counts_per_task(monkeypatch):
    records = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "07:45"}],
         "task": "time_24h", "answer": "07:45"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "2020-01-02"}],
         "task": "date_iso", "answer": "2020-01-02"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "12:00"}],
         "task": "time_24h", "answer": "12:00"},
    ]
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: ["07:45", "2020-1-2", " 12:00."])
    report = evaluate.score(None, None, records)
    assert (report.correct, report.total) == (2, 3)
    assert report.per_task == {"date_iso": (0, 1), "time_24h": (2, 2)}
    assert "2/3" in str(report)
    with pytest.raises(ValueError, match="not a scored task"):
        evaluate.score(None, None, [{"messages": records[0]["messages"], "task": "chat"}])


@torch.no_grad()
def test_batched_left_padded_generation_equals_one_by_one(smollm2):
    model, tok = smollm2
    conversations = [
        [{"role": "user", "content": "Say hi."}],
        [{"role": "user", "content": "Convert 7:45 pm to a 24-hour time. Reply with the time only."}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
         {"role": "assistant", "content": "Blue."}],
    ]
    batched = evaluate.generate(model, tok, conversations, max_new_tokens=6, batch_size=3)
    single = [evaluate.generate(model, tok, [c], max_new_tokens=6)[0] for c in conversations]
    assert batched == single
    assert all(isinstance(s, str) and s for s in batched)
    assert not model.training


# --------------------------------------------------------------------------- #
# Evaluation loss of a finetuning run
# --------------------------------------------------------------------------- #
def test_evaluation_loss_is_the_mean_over_labelled_tokens_whatever_the_batches():
    from qlora_lab.models import tiny_llama

    model = tiny_llama(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1).train()
    generator = torch.Generator().manual_seed(3)
    examples = []
    for n in (5, 9, 3, 12, 7):
        ids = torch.randint(3, 64, (n,), generator=generator).tolist()
        labels = [-100] * (n // 2) + ids[n // 2:]
        examples.append({"input_ids": ids, "labels": labels})
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:  # one example at a time, no padding: the definition
            logits = model(torch.tensor([e["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(e["labels"][1:])
            keep = targets != -100
            total += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    for batch_size in (1, 2, 5):
        got = evaluate.evaluation_loss(model, examples, pad_token_id=0, batch_size=batch_size)
        assert math.isclose(got, total / count, rel_tol=1e-5)
    assert model.training  # restored
    assert evaluate.labelled_tokens(torch.tensor([[5, 6, -100], [-100, -100, 7]])) == 2


def test_train_and_experiments_measure_with_this_module_and_nothing_shadows_it():
    """One evaluate module: train and experiments import it, and no function,
    class, argument or variable in the package is named ``evaluate``."""
    import ast
    from pathlib import Path

    package = Path(evaluate.__file__).parents[1]
    for module in ("finetune/train.py", "runs/experiments.py"):
        tree = ast.parse((package / module).read_text())
        imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    and n.module == "qlora_lab.finetune" for a in n.names}
        assert "evaluate" in imported, module
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.append(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.append(node.id)
            elif isinstance(node, ast.arg):
                names.append(node.arg)
            assert "evaluate" not in names, f"{path.relative_to(package)}:{getattr(node, 'lineno', '?')}"
