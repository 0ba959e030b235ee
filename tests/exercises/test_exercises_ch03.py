"""The chapter 03 checkers accept right answers, reject typical wrong ones, and
treat a skeleton as "not attempted yet" without raising."""

import pytest
import torch

from qlora_lab import memory
from qlora_lab.exercises import ch03
from qlora_lab.quant.double_quant import dynamic_map

from exercise_feedback import assert_bugs_are_feedback


def skeleton(*args):
    raise NotImplementedError("your turn")


# ---------------------------------------------------------------- exercise 1


def constants_bytes(numel, blocksize, double_quant):
    blocks = -(-numel // blocksize)
    if not double_quant:
        return 4 * blocks
    return blocks + 4 * -(-blocks // 256) + 4


def forgets_the_offset(numel, blocksize, double_quant):
    blocks = -(-numel // blocksize)
    return 4 * blocks if not double_quant else blocks + 4 * -(-blocks // 256)


def whole_blocks_only(numel, blocksize, double_quant):
    blocks = numel // blocksize
    return 4 * blocks if not double_quant else blocks + 4 * -(-blocks // 256) + 4


def whole_groups_only(numel, blocksize, double_quant):
    blocks = -(-numel // blocksize)
    return 4 * blocks if not double_quant else blocks + 4 * (blocks // 256) + 4


def the_papers_average(numel, blocksize, double_quant):
    bits = 32 / blocksize if not double_quant else 8 / blocksize + 32 / (blocksize * 256)
    return numel * bits / 8


def test_exercise_1_accepts_exact_counting(capsys):
    assert ch03.check_exercise_1(constants_bytes) is True
    assert "Exercise 1: correct" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, hint", [(forgets_the_offset, "offset"), (whole_blocks_only, "partial"),
                                         (whole_groups_only, "groups of 256 (the last one partial)"),
                                         (the_papers_average, "")])
def test_exercise_1_rejects_wrong_counts(wrong, hint, capsys):
    assert ch03.check_exercise_1(wrong) is False
    out = capsys.readouterr().out
    assert "the constants take" in out and hint in out


def test_exercise_1_skeleton_is_not_attempted(capsys):
    assert ch03.check_exercise_1(skeleton) is False
    assert "not attempted yet" in capsys.readouterr().out


# ---------------------------------------------------------------- exercise 2


def double_quantize(absmax, blocksize):
    code = dynamic_map()
    offset = absmax.mean()
    centred = absmax - offset
    padded = torch.nn.functional.pad(centred, (0, -centred.numel() % blocksize))
    nested = padded.view(-1, blocksize).abs().amax(dim=1)
    scale = torch.repeat_interleave(nested, blocksize)[: centred.numel()]
    scaled = torch.where(scale > 0, centred / scale, torch.zeros_like(centred))
    codes = (scaled[:, None] - code[None, :]).abs().argmin(dim=1).to(torch.uint8)
    return codes, nested, offset


def no_offset(absmax, blocksize):
    codes, nested, _ = double_quantize(absmax + 0, blocksize)
    return codes, nested, torch.tensor(0.0)


def absmax_of_the_raw_constants(absmax, blocksize):
    codes, _, offset = double_quantize(absmax, blocksize)
    padded = torch.nn.functional.pad(absmax, (0, -absmax.numel() % blocksize))
    return codes, padded.view(-1, blocksize).abs().amax(dim=1), offset


def rounds_down(absmax, blocksize):
    codes, nested, offset = double_quantize(absmax, blocksize)
    code = dynamic_map()
    scale = torch.repeat_interleave(nested, blocksize)[: absmax.numel()].clamp_min(1e-30)
    scaled = (absmax - offset) / scale
    below = torch.searchsorted(code, scaled, right=True).clamp(1, 255) - 1
    return below.to(torch.uint8), nested, offset


def test_exercise_2_accepts_double_quantization(capsys):
    assert ch03.check_exercise_2(double_quantize) is True
    assert "Exercise 2: correct" in capsys.readouterr().out


@pytest.mark.parametrize("wrong", [no_offset, absmax_of_the_raw_constants, rounds_down])
def test_exercise_2_rejects_wrong_versions(wrong, capsys):
    assert ch03.check_exercise_2(wrong) is False
    assert "Exercise 2:" in capsys.readouterr().out


def test_exercise_2_skeleton_is_not_attempted(capsys):
    assert ch03.check_exercise_2(skeleton) is False
    assert "not attempted yet" in capsys.readouterr().out


# ---------------------------------------------------------------- exercise 3


def longest_fit(config, gpu_gb, gradient_checkpointing):
    capacity = memory.gpu_capacity_bytes(gpu_gb)
    best, seq_len = 0, 128
    while memory.estimate(config, "qlora", seq_len=seq_len, gradient_checkpointing=gradient_checkpointing).peak \
            <= capacity:
        best, seq_len = seq_len, seq_len + 128
    return best


def test_exercise_3_reference_is_the_linear_search():
    for config, gb, ckpt in [("llama-7b", 24, False), ("llama-65b", 48, False), ("llama-33b", 24, True),
                             ("llama-65b", 24, True)]:
        assert ch03.longest_fit_reference(config, gb, ckpt) == longest_fit(config, gb, ckpt)


def test_exercise_3_accepts_the_search(capsys):
    assert ch03.check_exercise_3(ch03.longest_fit_reference) is True
    out = capsys.readouterr().out
    assert "Exercise 3: correct" in out and "checkpointing on" in out


def test_checkpointing_buys_longer_steps():
    on = ch03.longest_fit_reference("llama-7b", 24, True)
    off = ch03.longest_fit_reference("llama-7b", 24, False)
    assert on > 5 * off > 0
    assert ch03.longest_fit_reference("llama-65b", 24, True) == 0  # its 4-bit weights alone exceed 24 GB


@pytest.mark.parametrize("wrong, hint", [
    (lambda c, gb, ckpt: ch03.longest_fit_reference(c, gb, ckpt) + 128, "no longer fits"),
    (lambda c, gb, ckpt: ch03.longest_fit_reference(c, gb, ckpt) + 1, "multiples of 128"),
    (lambda c, gb, ckpt: ch03.longest_fit_reference(c, gb, True), "checkpointing off"),
])
def test_exercise_3_rejects_wrong_searches(wrong, hint, capsys):
    assert ch03.check_exercise_3(wrong) is False
    assert hint in capsys.readouterr().out


def test_exercise_3_skeleton_is_not_attempted(capsys):
    assert ch03.check_exercise_3(skeleton) is False
    assert "not attempted yet" in capsys.readouterr().out


# ------------------------------------------------------- a learner's bug is feedback


def test_a_bug_in_the_learners_code_is_feedback_not_a_crash(capsys):
    assert_bugs_are_feedback(capsys, [
        (1, ch03.check_exercise_1, ()),
        (2, ch03.check_exercise_2, ()),
        (3, ch03.check_exercise_3, ()),
    ])
