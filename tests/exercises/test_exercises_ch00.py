import torch

from qlora_lab.exercises import ch00

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


# ------------------------------------------------------- a learner's bug is feedback


def test_a_bug_in_the_learners_code_is_feedback_not_a_crash(smollm2, tiny, capsys):
    _, tokenizer = smollm2
    model = tiny
    assert_bugs_are_feedback(capsys, [
        (1, ch00.check_exercise_1, (tokenizer,)),
        (2, ch00.check_exercise_2, (model,)),
    ])
