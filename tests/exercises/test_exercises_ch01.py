"""The chapter 01 checkers accept right answers, reject typical wrong ones with a
hint, and treat a skeleton as "not attempted yet" without raising."""

import struct

import torch

from qlora_lab.exercises import ch01
from qlora_lab.quant import int8

from exercise_feedback import assert_bugs_are_feedback


def skeleton(*args):
    raise NotImplementedError("your turn")


# ---------------------------------------------------------------- exercise 1


def decode_bfloat16(pattern):
    sign = -1.0 if pattern >> 15 else 1.0
    exponent = (pattern >> 7) & 0xFF
    mantissa = pattern & 0x7F
    if exponent == 0xFF:
        return sign * float("inf") if mantissa == 0 else float("nan")
    if exponent == 0:
        return sign * 2.0**-126 * (mantissa / 128)
    return sign * 2.0 ** (exponent - 127) * (1 + mantissa / 128)


def decode_via_struct(pattern):  # bfloat16 is the top half of a float32
    return struct.unpack(">f", struct.pack(">I", pattern << 16))[0]


def test_exercise_1_right(capsys):
    assert ch01.check_exercise_1(decode_bfloat16)
    assert ch01.check_exercise_1(decode_via_struct)
    assert "Exercise 1: correct" in capsys.readouterr().out


def test_exercise_1_wrong(capsys):
    def no_subnormals(p):
        return 0.0 if (p >> 7) & 0xFF == 0 else decode_bfloat16(p)

    def bias_128(p):
        e = (p >> 7) & 0xFF
        return decode_bfloat16(p) / 2 if 0 < e < 0xFF else decode_bfloat16(p)

    def no_sign(p):
        return abs(decode_bfloat16(p))

    for wrong, hint in [(no_subnormals, "subnormal"), (bias_128, "2^(exponent - 127)"), (no_sign, "sign")]:
        assert ch01.check_exercise_1(wrong) is False
        assert hint in capsys.readouterr().out


def test_exercise_1_skeleton_and_crash(capsys):
    assert ch01.check_exercise_1(skeleton) is False
    assert "Exercise 1: not attempted yet" in capsys.readouterr().out
    assert ch01.check_exercise_1(lambda p: 1 / 0) is False
    assert "ZeroDivisionError" in capsys.readouterr().out


# ---------------------------------------------------------------- exercise 2


def int8_linear(x, w):
    alpha_x = x.abs().amax(dim=1, keepdim=True)
    alpha_w = w.abs().amax(dim=1, keepdim=True)
    x_q = torch.round(x * 127 / alpha_x).to(torch.int8)
    w_q = torch.round(w * 127 / alpha_w).to(torch.int8)
    acc = x_q.to(torch.int64) @ w_q.to(torch.int64).T
    return acc.float() * (alpha_x * alpha_w.T) / 127**2


def test_exercise_2_right(capsys):
    assert ch01.check_exercise_2(int8_linear)
    assert ch01.check_exercise_2(lambda x, w: int8.int8_matmul(x, w))
    assert "Exercise 2: correct" in capsys.readouterr().out


def test_exercise_2_wrong(capsys):
    def tensorwise(x, w):
        return int8.absmax_dequantize(*int8.absmax_quantize(x)) @ int8.absmax_dequantize(*int8.absmax_quantize(w)).T

    def forgot_one_127(x, w):
        return int8_linear(x, w) * 127

    for wrong, hint in [(tensorwise, "tensor-wise"), (forgot_one_127, "same factor"),
                        (lambda x, w: x @ w.T, "float result")]:
        assert ch01.check_exercise_2(wrong) is False
        assert hint in capsys.readouterr().out
    assert ch01.check_exercise_2(lambda x, w: (x @ w.T)[:3]) is False
    assert "shape" in capsys.readouterr().out


def test_exercise_2_skeleton(capsys):
    assert ch01.check_exercise_2(skeleton) is False
    assert "Exercise 2: not attempted yet" in capsys.readouterr().out


# ---------------------------------------------------------------- exercise 3


def int8_matmul_inliers(x, w, threshold):
    cols = (x.abs() >= threshold).any(dim=0)
    x_in = x.masked_fill(cols, 0.0)
    out = int8_linear(x_in, w)
    q_w, stats_w, _ = int8.vectorwise_quantize(w)
    w_hat = int8.vectorwise_dequantize(q_w, stats_w)
    return out + x[:, cols] @ w_hat[:, cols].T


def test_exercise_3_right(capsys):
    assert ch01.check_exercise_3(int8_matmul_inliers)
    out = capsys.readouterr().out
    assert "Exercise 3: correct" in out


def test_exercise_3_beats_bitsandbytes_rule_on_its_data():
    x, w = ch01.exercise_3_data()
    exact = x @ w.T
    ours = ch01.int8_matmul_inlier_stats(x, w, 6.0)
    bnb_rule = int8.int8_matmul(x, w, 6.0)
    assert (ours - exact).norm() < 0.9 * (bnb_rule - exact).norm()


def test_exercise_3_wrong(capsys):
    assert ch01.check_exercise_3(lambda x, w, t: int8.int8_matmul(x, w, t)) is False
    assert "bitsandbytes' rule" in capsys.readouterr().out
    assert ch01.check_exercise_3(lambda x, w, t: int8.int8_matmul(x, w)) is False
    assert "without decomposition" in capsys.readouterr().out
    assert ch01.check_exercise_3(skeleton) is False
    assert "Exercise 3: not attempted yet" in capsys.readouterr().out


# ---------------------------------------------------------------- exercise 4


def outlier_matrix():
    M = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    M[5, 100] = 60.0
    return M


def blocksize_sweep(x, blocksizes):
    result = {}
    for b in blocksizes:
        q, s = int8.blockwise_absmax_quantize(x, blocksize=b)
        error = (x - int8.blockwise_absmax_dequantize(q, s, blocksize=b)).abs().double().mean().item()
        result[b] = (error, 32 * s.numel() / x.numel())
    return result


def test_exercise_4_right(capsys):
    assert ch01.check_exercise_4(blocksize_sweep, outlier_matrix())
    out = capsys.readouterr().out
    assert "Exercise 4: correct" in out and "16,384" in out


def test_exercise_4_smaller_blocks_cost_more_bits_and_err_less():
    sweep = ch01.blocksize_sweep_reference(outlier_matrix(), ch01.exercise_4_blocksizes(outlier_matrix()))
    errors = [e for e, _ in sweep.values()]
    bits = [b for _, b in sweep.values()]
    assert errors == sorted(errors) and bits == sorted(bits, reverse=True)
    assert bits[1] == 0.5  # blocks of 64: QLoRA's 0.5 bits per value, the cost chapter 03 cuts


def test_exercise_4_wrong(capsys):
    def whole_blocks_only(x, blocksizes):
        return {b: (e, 32 / b) for b, (e, _) in blocksize_sweep(x, blocksizes).items()}

    def bytes_not_bits(x, blocksizes):
        return {b: (e, bits / 8) for b, (e, bits) in blocksize_sweep(x, blocksizes).items()}

    def swapped(x, blocksizes):
        return {b: (bits, e) for b, (e, bits) in blocksize_sweep(x, blocksizes).items()}

    def tensorwise_error(x, blocksizes):
        q, s = int8.absmax_quantize(x)
        e = (x - int8.absmax_dequantize(q, s)).abs().mean().item()
        return {b: (e, bits) for b, (_, bits) in blocksize_sweep(x, blocksizes).items()}

    for wrong, hint in [(whole_blocks_only, "partial"), (bytes_not_bits, "32 bits"), (swapped, "in that order"),
                        (tensorwise_error, "mean |error|"),
                        (lambda x, b: {16: (0.0, 2.0)}, "one entry per block size")]:
        assert ch01.check_exercise_4(wrong, outlier_matrix()) is False
        assert hint in capsys.readouterr().out
    assert ch01.check_exercise_4(skeleton, outlier_matrix()) is False
    assert "Exercise 4: not attempted yet" in capsys.readouterr().out


# ------------------------------------------------------- a learner's bug is feedback


def test_a_bug_in_the_learners_code_is_feedback_not_a_crash(capsys):
    assert_bugs_are_feedback(capsys, [
        (1, ch01.check_exercise_1, ()),
        (2, ch01.check_exercise_2, ()),
        (3, ch01.check_exercise_3, ()),
        (4, ch01.check_exercise_4, (outlier_matrix(),)),
    ])
