import math
import random

import torch

from qlora_lab.exercises import ch00
from qlora_lab.finetune import evaluate

from exercise_feedback import assert_bugs_are_feedback

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def right_chatml(messages):
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}] + list(messages)
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def chatml_without_default_system(messages):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def not_attempted(*args):
    raise NotImplementedError("your turn")


def test_exercise_1(smollm2, capsys):
    _, tokenizer = smollm2
    assert ch00.check_exercise_1(right_chatml, tokenizer)
    assert not ch00.check_exercise_1(chatml_without_default_system, tokenizer)
    assert "default system message" in capsys.readouterr().out
    assert not ch00.check_exercise_1(lambda m: right_chatml(m).replace("assistant\n", "assistant"), tokenizer)
    assert not ch00.check_exercise_1(not_attempted, tokenizer)
    assert "not attempted" in capsys.readouterr().out


def test_exercise_2(tiny, capsys):
    tiny.lm_head.weight = tiny.model.embed_tokens.weight  # tie, as SmolLM2 does
    right = ch00.parameter_counts_by_kind(tiny)
    assert set(right) == {"embedding", "linear", "norm"}
    assert sum(right.values()) == sum(p.numel() for p in tiny.parameters())
    assert ch00.check_exercise_2(lambda m: dict(right), tiny)

    def double_counts_tied(model):
        counts = {"embedding": 0, "linear": 0, "norm": 0}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if isinstance(module, torch.nn.Embedding):
                    counts["embedding"] += p.numel()
                elif isinstance(module, torch.nn.Linear):
                    counts["linear"] += p.numel()
                elif "Norm" in type(module).__name__:
                    counts["norm"] += p.numel()
        return counts

    assert not ch00.check_exercise_2(double_counts_tied, tiny)
    assert "counted once" in capsys.readouterr().out
    assert not ch00.check_exercise_2(lambda m: [1, 2, 3], tiny)
    assert not ch00.check_exercise_2(not_attempted, tiny)


SENTENCE = "The cat sat on the mat and looked out of the window at the birds."


def shuffled(text, seed=0):
    words = text.split()
    random.Random(seed).shuffle(words)
    return " ".join(words)


def texts_by_package(model, tokenizer):
    texts = [SENTENCE, shuffled(SENTENCE), "for i in range(10):\n    print(i * i)"]
    return {text: evaluate.perplexity(model, tokenizer, text) for text in texts}


def texts_by_hand_in_float32(model, tokenizer):
    """The recipe of chapter 00, section 4, in float32: within the checker's tolerance."""
    result = {}
    for text in (SENTENCE, shuffled(SENTENCE), "Le chat regarde les oiseaux par la fenêtre."):
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        with torch.no_grad():
            logits = model(ids.unsqueeze(0)).logits[0, :-1]
        result[text] = math.exp(torch.nn.functional.cross_entropy(logits, ids[1:]).item())
    return result


def test_exercise_3_accepts_measured_perplexities(smollm2, capsys):
    model, tokenizer = smollm2
    assert ch00.check_exercise_3(texts_by_package, model, tokenizer)
    out = capsys.readouterr().out
    assert "Exercise 3: correct" in out and "the same words in 2 orders" in out
    assert ch00.check_exercise_3(texts_by_hand_in_float32, model, tokenizer)


def test_exercise_3_rejects_wrong_measurements(smollm2, capsys):
    model, tokenizer = smollm2

    def mean_loss(m, t):
        return {text: math.log(value) for text, value in texts_by_package(m, t).items()}

    def half_again_too_high(m, t):
        return {text: value * 1.5 for text, value in texts_by_package(m, t).items()}

    def no_shuffled_copy(m, t):
        texts = [SENTENCE, "Paris is the capital of France.", "1 2 3 4 5 6 7 8 9"]
        return {text: evaluate.perplexity(m, t, text) for text in texts}

    for wrong, hint in [(mean_loss, "the mean loss"), (half_again_too_high, "every token after"),
                        (no_shuffled_copy, "another order"),
                        (lambda m, t: dict(list(texts_by_package(m, t).items())[:2]), "at least three texts"),
                        (lambda m, t: [1.0, 2.0, 3.0], "return a dict")]:
        assert ch00.check_exercise_3(wrong, model, tokenizer) is False
        assert hint in capsys.readouterr().out
    assert ch00.check_exercise_3(not_attempted, model, tokenizer) is False
    assert "not attempted" in capsys.readouterr().out


def test_perplexity_tolerance_is_float32_rounding():
    """V eps of the log-sum-exp plus T eps of the mean loss, through exp."""
    eps = torch.finfo(torch.float32).eps
    tol = ch00.perplexity_tolerance(49152, 25, math.e)
    assert tol == math.expm1((49152 + 25) * eps)
    assert 5e-3 < tol < 6e-3


# ------------------------------------------------------- a learner's bug is feedback


def test_a_bug_in_the_learners_code_is_feedback_not_a_crash(smollm2, tiny, capsys):
    _, tokenizer = smollm2
    model = tiny
    assert_bugs_are_feedback(capsys, [
        (1, ch00.check_exercise_1, (tokenizer,)),
        (2, ch00.check_exercise_2, (model,)),
        (3, ch00.check_exercise_3, smollm2),
    ])
