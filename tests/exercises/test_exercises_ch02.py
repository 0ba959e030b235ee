import torch
from scipy.stats import norm

from qlora_lab.exercises import ch02
from qlora_lab.quant import codes

from exercise_feedback import assert_bugs_are_feedback


def not_attempted(*args):
    raise NotImplementedError("your turn")


def right_code(bits):
    offset = codes.normal_float_offset(bits)
    half = 2 ** (bits - 1)
    positive = norm.ppf(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1].numpy())
    negative = -norm.ppf(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1].numpy())
    values = torch.tensor(sorted([*positive, 0.0, *negative]), dtype=torch.float64)
    return values / values.max()


def test_exercise_1(capsys):
    assert ch02.check_exercise_1(right_code)  # float64 arithmetic is within tolerance
    assert ch02.check_exercise_1(codes.normal_float_code)
    assert "correct" in capsys.readouterr().out
    assert not ch02.check_exercise_1(lambda bits: codes.normal_float_code(bits, symmetric=True))
    assert "exact zero" in capsys.readouterr().out
    assert not ch02.check_exercise_1(lambda bits: right_code(bits) * 1.8)
    assert "largest value" in capsys.readouterr().out
    assert not ch02.check_exercise_1(lambda bits: right_code(bits).flip(0))
    assert "unsorted" in capsys.readouterr().out
    assert not ch02.check_exercise_1(lambda bits: torch.cat([right_code(bits), torch.zeros(256 - 2**bits)]))
    assert "256" in capsys.readouterr().out
    assert not ch02.check_exercise_1(lambda bits: -right_code(bits).flip(0))  # more negative than positive
    assert "positive quantiles" in capsys.readouterr().out
    unbounded = lambda bits: torch.tensor(norm.ppf(torch.linspace(0, 1, 2**bits).numpy()))  # noqa: E731
    assert not ch02.check_exercise_1(unbounded)
    assert "inf or NaN" in (out := capsys.readouterr().out) and "normal_float_offset(bits)" in out
    assert not ch02.check_exercise_1(not_attempted)
    assert "not attempted" in capsys.readouterr().out
    assert not ch02.check_exercise_1(lambda bits: 1 / 0)
    assert "ZeroDivisionError" in capsys.readouterr().out


def right_dequantize(packed, absmax, code, blocksize, shape):
    flat = packed.reshape(-1)
    n = 1
    for size in shape:
        n *= size
    indices = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n].long()
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (code[indices] * scale).reshape(shape)


def test_exercise_2(capsys):
    assert ch02.check_exercise_2(right_dequantize)
    assert "correct" in capsys.readouterr().out

    def low_nibble_first(packed, absmax, code, blocksize, shape):
        swapped = ((packed & 0xF) << 4) | (packed >> 4)
        return right_dequantize(swapped, absmax, code, blocksize, shape)

    assert not ch02.check_exercise_2(low_nibble_first)
    assert "high nibble" in capsys.readouterr().out

    def keeps_padding(packed, absmax, code, blocksize, shape):
        flat = packed.reshape(-1)
        indices = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1).long()
        return code[indices] * absmax.repeat_interleave(blocksize)[: indices.numel()]

    assert not ch02.check_exercise_2(keeps_padding)
    out = capsys.readouterr().out
    assert "expected shape" in out

    def divides(packed, absmax, code, blocksize, shape):
        return right_dequantize(packed, absmax.double(), code.double(), blocksize, shape).float() / 1.0000001

    assert not ch02.check_exercise_2(divides)
    assert "almost" in capsys.readouterr().out

    def ignores_partial_block(packed, absmax, code, blocksize, shape):
        out = right_dequantize(packed, absmax, code, blocksize, shape).reshape(-1)
        full = out.numel() - out.numel() % blocksize
        out[full:] = out[full:] / absmax[-1] * absmax[0]
        return out.reshape(shape)

    assert not ch02.check_exercise_2(ignores_partial_block)
    assert "values differ" in capsys.readouterr().out
    assert not ch02.check_exercise_2(not_attempted)
    assert "not attempted" in capsys.readouterr().out


# ------------------------------------------------------- a learner's bug is feedback


def test_a_bug_in_the_learners_code_is_feedback_not_a_crash(capsys):
    assert_bugs_are_feedback(capsys, [
        (1, ch02.check_exercise_1, ()),
        (2, ch02.check_exercise_2, ()),
    ])
