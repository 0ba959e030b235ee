"""qlora_lab.finetune.run_time: chapter 07's time estimate and the headroom table,
checked against the arithmetic they claim."""

import pytest

from qlora_lab import memory
from qlora_lab.finetune import run_time
from qlora_lab.finetune.plan import run_estimate
from qlora_lab.finetune.recipe import preset
from qlora_lab.support.model_config import count_parameters, model_shape


@pytest.fixture(scope="module")
def recipe():
    return preset("llama-7b-gpu")  # LLaMA-7B's shapes, batch 1 x 512, 16 accumulated, 1,875 steps


def test_a_forward_is_two_flops_a_weight_plus_attention(recipe):
    counts, shape = count_parameters("llama-7b"), model_shape("llama-7b")
    matmul = counts.block_linear + shape.vocab * shape.hidden
    attention = shape.layers * 4 * (recipe.max_length / 2) * shape.q_dim
    assert run_time.forward_flops_per_token(recipe) == 2 * matmul + attention
    assert 2 * 6.4e9 < run_time.forward_flops_per_token(recipe) < 2 * 6.8e9  # about twice the weights


def test_checkpointing_adds_one_forward(recipe):
    import dataclasses

    forward = run_time.forward_flops_per_token(recipe)
    assert run_time.train_flops_per_token(recipe) == 3 * forward
    plain = dataclasses.replace(recipe, gradient_checkpointing=False)
    assert run_time.train_flops_per_token(plain) == 2 * forward


def test_time_is_tokens_over_the_achieved_rate(recipe):
    tokens = 1875 * 16 * 512
    assert run_time.run_tokens(recipe) == tokens
    est = run_time.time_estimate(recipe, "NVIDIA L4 (24 GB)", 0.5)
    rate = 121.0e12 * 0.5 / run_time.train_flops_per_token(recipe)
    assert est.tokens_per_second == pytest.approx(rate) and est.hours == pytest.approx(tokens / rate / 3600)
    assert run_time.time_estimate(recipe, "NVIDIA L4 (24 GB)", 0.25).hours == pytest.approx(2 * est.hours)


@pytest.mark.parametrize("gpu, utilization, message", [("H100", 0.5, "gpu must be one of"),
                                                       ("NVIDIA L4 (24 GB)", 0.0, "utilization is a fraction"),
                                                       ("NVIDIA L4 (24 GB)", 1.5, "utilization is a fraction")])
def test_bad_input_is_named(recipe, gpu, utilization, message):
    with pytest.raises(ValueError, match=message):
        run_time.time_estimate(recipe, gpu, utilization)


def test_the_text_has_a_line_per_card_and_calls_itself_an_estimate(recipe):
    text = run_time.time_text(recipe)
    for gpu in run_time.DATASHEET_TFLOPS:
        assert sum(line.startswith(gpu) for line in text.splitlines()) == 1
    assert "An estimate" in text and "15.36M tokens" in text


def test_headroom_keeps_the_effective_batch_and_fits_by_the_step_peak(recipe):
    rows = run_time.headroom(recipe, 24)
    assert [(r["batch"], r["max_length"]) for r in rows] == [(1, 512), (2, 512), (4, 512), (8, 512),
                                                              (1, 1024), (1, 2048)]
    for row in rows:
        assert row["batch"] * row["accumulation"] == recipe.effective_batch_size
        assert row["fits"] == (row["bytes"] <= memory.gpu_capacity_bytes(24))
    assert rows[0]["bytes"] == run_estimate(recipe).peak
    assert [r["bytes"] for r in rows[:4]] == sorted(r["bytes"] for r in rows[:4])  # more tokens, more memory
