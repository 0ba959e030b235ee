import hashlib
import math

import pytest
import torch

from qlora_lab.evaluate import course_eval_text, negative_log_likelihood, perplexity

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
