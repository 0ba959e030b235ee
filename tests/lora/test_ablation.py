"""qlora_lab.lora.ablation: the loop, the cached tail, and the placement study of chapter 04.

The study runs on tiny-llama (a random Llama with SmolLM2's tokenizer), so that these tests
need no real weights; the chapter runs it on SmolLM2 itself. Exercise 4's checker is
tested here too, on the same small study.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qlora_lab  # noqa: F401
from qlora_lab.exercises import ch04
from qlora_lab.lora import ablation, lora_modules
from qlora_lab.models import load_model
from qlora_lab.support.checks import assert_close_to_rounding


@pytest.fixture(scope="module")
def tiny_with_tokenizer():
    model, tokenizer = load_model("tiny-llama")
    return model.requires_grad_(False), tokenizer


@pytest.fixture(scope="module")
def study(tiny_with_tokenizer):
    model, tokenizer = tiny_with_tokenizer
    return ablation.PlacementStudy.build(model, tokenizer, n_blocks=1, train_per_category=3, steps=10, lr=1e-3)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- #
# fit
# --------------------------------------------------------------------------- #
def test_fit_is_full_batch_adamw_step_for_step():
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(16, 10, generator=g), torch.randint(0, 4, (16,), generator=g)
    ours, reference = nn.Linear(10, 4), nn.Linear(10, 4)
    reference.load_state_dict(ours.state_dict())
    ablation.fit(list(ours.parameters()), lambda: ours(x), labels, steps=7, lr=1e-2)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(7):
        loss = F.cross_entropy(reference(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(ours.weight, reference.weight) and torch.equal(ours.bias, reference.bias)


@pytest.mark.parametrize("parameters, steps, lr, match", [
    ([], 5, 1e-3, "non-empty list"),
    ([torch.zeros(3)], 5, 1e-3, "frozen"),
    ([torch.zeros(3, requires_grad=True)], 0, 1e-3, "steps must be a positive integer"),
    ([torch.zeros(3, requires_grad=True)], 5, float("nan"), "lr must be a positive finite number"),
    ([torch.zeros(3, requires_grad=True)], 5, -1.0, "lr must be a positive finite number"),
])
def test_fit_refuses_bad_input(parameters, steps, lr, match):
    with pytest.raises(ValueError, match=match):
        ablation.fit(parameters, lambda: torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), steps=steps, lr=lr)


# --------------------------------------------------------------------------- #
# The cached tail
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("n_blocks", [1, 2])
def test_the_tail_from_its_cached_input_gives_the_models_logits(tiny_with_tokenizer, n_blocks):
    model, tokenizer = tiny_with_tokenizer
    batch = tokenizer([ablation.PROMPT.format(word=w) for w in ("apple", "tiger", "Spain")], return_tensors="pt")
    inputs = ablation.capture_tail_inputs(model, batch, n_blocks)
    assert inputs.hidden.shape == inputs.output.shape == (3, batch["input_ids"].shape[1], model.config.hidden_size)
    blocks = ablation.last_blocks(model, n_blocks)
    with torch.no_grad():
        full = model(**batch).logits[:, -1]
        # the same block operations on the same inputs in the same process: the same bits
        assert torch.equal(ablation.run_tail(blocks, inputs), inputs.output)
        logits = ablation.tail_logits(model, blocks, inputs)
        candidates = torch.tensor([5, 17, 300])
        some = ablation.tail_logits(model, blocks, inputs, candidates)
    # the output head multiplies one position here, every position in the model: the sums of
    # hidden_size products may be grouped differently, so equal up to their rounding
    head = model.get_output_embeddings().weight
    normed = model.model.norm(inputs.output[:, -1])
    assert_close_to_rounding(logits, full, terms=model.config.hidden_size, why="the head on one position or on all",
                             magnitude=normed.abs() @ head.abs().T)
    assert torch.equal(some, logits[:, candidates])
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in model.model.layers), "the hooks must go"


def test_tail_copies_the_blocks_with_adapters_or_all_trainable(tiny_with_tokenizer):
    model, _ = tiny_with_tokenizer
    before = state(model)
    adapted = ablation.tail(model, 1, ["q_proj", "v_proj"], r=4)
    assert sorted(lora_modules(adapted)) == ["0.self_attn.q_proj", "0.self_attn.v_proj"]
    assert all(layer.r == 4 and layer.alpha == 16.0 for layer in lora_modules(adapted).values())
    every = ablation.tail(model, 1, "all-linear", r=2, alpha=4.0)
    assert len(lora_modules(every)) == 7
    full = ablation.tail(model, 2, None)
    assert len(full) == 2 and all(p.requires_grad for p in full.parameters()) and not lora_modules(full)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(1.0)
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "tail must copy, not change, the model's blocks"
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("n_blocks, targets, r, match", [
    (0, None, None, "n_blocks must be an integer from 1 to 2"),
    (3, "all-linear", 4, "n_blocks must be an integer from 1 to 2"),
    (1, None, 4, "full finetuning .* has no rank"),
    (1, ["q_proj"], None, "need a rank r"),
    (1, ["query"], 4, "matched no module"),
])
def test_tail_refuses_bad_input(tiny_with_tokenizer, n_blocks, targets, r, match):
    model, _ = tiny_with_tokenizer
    with pytest.raises(ValueError, match=match):
        ablation.tail(model, n_blocks, targets, r)


def test_a_model_without_llama_blocks_is_refused():
    with pytest.raises(ValueError, match="LLaMA-style causal language model"):
        ablation.last_blocks(nn.Linear(3, 3), 1)


# --------------------------------------------------------------------------- #
# The placement study
# --------------------------------------------------------------------------- #
def test_split_words_holds_out_the_rest_of_every_category():
    train, train_labels, held_out, held_out_labels = ablation.split_words(6, seed=0)
    assert len(train) == len(held_out) == 48 and not set(train) & set(held_out)
    for words, labels in ((train, train_labels), (held_out, held_out_labels)):
        for word, label in zip(words, labels):
            assert word in list(ablation.CATEGORIES.values())[label]
        assert sorted(labels) == sorted(list(range(8)) * 6)
    assert ablation.split_words(6, seed=0) == (train, train_labels, held_out, held_out_labels)
    assert ablation.split_words(6, seed=1)[0] != train
    assert len(ablation.CODE_WORDS) == len(ablation.CATEGORIES)


@pytest.mark.parametrize("bad", [0, 12, 2.5, True])
def test_split_words_keeps_a_held_out_word_in_every_category(bad):
    with pytest.raises(ValueError, match="train_per_category must be an integer from 1 to 11"):
        ablation.split_words(bad)


def test_every_word_of_the_study_is_one_smollm2_token(study):
    # build checks it; tiny-llama carries SmolLM2's tokenizer
    assert study.candidates.shape == (8,) and len(set(study.candidates.tolist())) == 8
    assert (len(study.train_words), len(study.heldout_words)) == (24, 72)


def test_a_run_trains_measures_and_leaves_the_notebook_alone(study):
    model_before = state(study.model)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    first = study.run("all-linear", 4)
    assert torch.equal(torch.rand(3), expected_next), "a run must not move the caller's random stream"
    assert torch.get_num_threads() == threads
    assert study.run("all-linear", 4) == first, "the same seed must give the same run"
    untrained = study.before()
    assert untrained.trainable == 0 and first.train_loss < untrained.train_loss
    config = study.model.config
    per_block = 4 * (2 * config.hidden_size * 2 + 2 * (config.hidden_size + 64)  # q, o; k, v (2 kv heads of 32)
                     + 3 * (config.hidden_size + config.intermediate_size))
    assert first.trainable == per_block
    assert study.run(["q_proj", "v_proj"], 4).trainable == 4 * ((128 + 128) + (128 + 64))
    assert 0.0 <= first.heldout_accuracy <= 1.0
    after = state(study.model)
    assert all(torch.equal(model_before[k], after[k]) for k in model_before)


def test_build_refuses_bad_settings_and_words(tiny_with_tokenizer, monkeypatch):
    model, tokenizer = tiny_with_tokenizer
    with pytest.raises(ValueError, match="unknown setting"):
        ablation.PlacementStudy.build(model, tokenizer, step=3)
    with pytest.raises(ValueError, match="threads must be a positive integer or None"):
        ablation.PlacementStudy.build(model, tokenizer, threads=0)
    monkeypatch.setattr(ablation, "CODE_WORDS", (*ablation.CODE_WORDS[:7], "antidisestablishmentarianism"))
    with pytest.raises(ValueError, match="'antidisestablishmentarianism' is .* tokens"):
        ablation.PlacementStudy.build(model, tokenizer)


# --------------------------------------------------------------------------- #
# Exercise 4: one matrix at a time
# --------------------------------------------------------------------------- #
def right_answer(study, r):
    return {name: study.run([name], r).heldout_loss for name in ch04.LINEAR_LAYERS}


def test_exercise_4_accepts_the_measurements_and_prints_the_ranking(study, capsys):
    assert ch04.check_exercise_4(right_answer, study, r=2)
    out = capsys.readouterr().out
    assert "Exercise 4: correct" in out and all(name in out for name in ch04.LINEAR_LAYERS)


def test_exercise_4_catches_a_wrong_measurement(study, capsys):
    def train_losses(study, r):
        return {name: study.run([name], r).train_loss for name in ch04.LINEAR_LAYERS}

    assert ch04.check_exercise_4(train_losses, study, r=2) is False
    assert "the loss on the training words" in capsys.readouterr().out

    def other_rank(study, r):
        return right_answer(study, 1)

    assert ch04.check_exercise_4(other_rank, study, r=2) is False
    assert "study.run([name], r)" in capsys.readouterr().out

    def missing(study, r):
        answer = right_answer(study, r)
        del answer["down_proj"]
        return answer

    assert ch04.check_exercise_4(missing, study, r=2) is False
    assert "one entry per linear layer" in capsys.readouterr().out

    def text_values(study, r):
        return {name: "low" for name in ch04.LINEAR_LAYERS}

    assert ch04.check_exercise_4(text_values, study, r=2) is False
    assert "must be a non-negative number" in capsys.readouterr().out


def test_exercise_4_skeleton_crash_and_wrong_study(study, capsys):
    def skeleton(study, r):
        raise NotImplementedError("your turn")

    assert ch04.check_exercise_4(skeleton, study) is False
    assert "not attempted yet" in capsys.readouterr().out
    assert ch04.check_exercise_4(lambda study, r: 1 / 0, study) is False
    assert "ZeroDivisionError" in capsys.readouterr().out
    assert ch04.check_exercise_4(right_answer, copy.copy({"not": "a study"})) is False
    assert "pass section 8's study" in capsys.readouterr().out
