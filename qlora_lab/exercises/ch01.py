"""Checkers for chapter 01 (numbers and int8).

Exercise 1: decode a bfloat16 bit pattern into its value by hand.
Exercise 2: LLM.int8()'s vector-wise int8 matmul (no outliers), from scratch.
Exercise 3: mixed-precision decomposition with row statistics taken over the
            inlier columns only (a variant of what bitsandbytes does).
Exercise 4: change the block size, measure the error and what the scales cost.
"""

from __future__ import annotations

import math

import torch

from qlora_lab.exercises import call_learner, checker, dict_keyed, tensor_shaped
from qlora_lab.quant import int8
from qlora_lab.support.checks import summation_tolerance


# ---------------------------------------------------------------- exercise 1


@checker(1)
def check_exercise_1(decode_bfloat16) -> bool:
    """``decode_bfloat16(pattern)`` takes an int in ``0..65535`` (the 16 bits of a
    bfloat16) and returns its value as a Python float. Checked on all 65536
    patterns against ``torch`` (any NaN is accepted for NaN patterns)."""
    patterns = torch.arange(2**16, dtype=torch.int32)
    truth = patterns.to(torch.int16).view(torch.bfloat16).double().tolist()
    for pattern in [0x3F80, 0xC000, 0x0001, 0x7F80] + list(range(2**16)):
        ok, got = call_learner(1, decode_bfloat16, pattern)
        if not ok:
            return False
        expected = truth[pattern]
        try:
            got = float(got)
        except (TypeError, ValueError):
            print(f"Exercise 1: return a float, got {type(got).__name__} for pattern {pattern:#06x}")
            return False
        if math.isnan(expected) and math.isnan(got):
            continue
        if got != expected:
            bits = f"{pattern:016b}"
            print(
                f"Exercise 1: pattern {pattern:#06x} = {bits[0]} {bits[1:9]} {bits[9:]} is {expected!r}, you returned {got!r}"
            )
            exponent = (pattern >> 7) & 0xFF
            if exponent == 0 and pattern & 0x7F:
                print("  Hint: exponent field 0 is a subnormal: (-1)^s * 2^(1 - 127) * (mantissa / 2^7), no implicit 1.")
            elif exponent == 0xFF:
                print("  Hint: exponent field all ones means infinity (mantissa 0) or NaN (mantissa not 0).")
            elif got == -expected:
                print("  Hint: the sign is the top bit (bit 15).")
            else:
                print("  Hint: value = (-1)^s * 2^(exponent - 127) * (1 + mantissa / 2^7).")
            return False
    print("Exercise 1: correct")
    return True


# ---------------------------------------------------------------- exercise 2


def _rounding(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """How far two correct int8 matmuls of ``x @ w.T`` may differ: the integer sum is exact, but a
    learner may dequantize first and sum ``in_features`` float32 products in another order, then
    rescale (a few roundings); every dequantized entry is within half a step (absmax / 254) of x."""
    x_hat = x.abs() + x.abs().amax(dim=1, keepdim=True) / 254
    w_hat = w.abs() + w.abs().amax(dim=1, keepdim=True) / 254
    return summation_tolerance(torch.float32, x.shape[1] + 4, x_hat @ w_hat.T)


def _within(got: torch.Tensor, other: torch.Tensor, tol: torch.Tensor) -> bool:
    return bool(((got - other).abs() <= tol).all())


def _exercise_2_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    # rows of very different size: a single scale for all of them would be visibly worse
    x = torch.randn(12, 64, generator=g) * torch.logspace(-2, 1, 12).unsqueeze(1)
    w = torch.randn(20, 64, generator=g) * torch.logspace(-1, 0, 20).unsqueeze(1)
    return x, w


@checker(2)
def check_exercise_2(int8_linear) -> bool:
    """``int8_linear(x, w)`` must compute ``x @ w.T`` the LLM.int8() way without
    outliers: int8 codes for every row of ``x`` and every row of ``w`` (absmax, 127
    levels each side), an integer matmul, and one rescale with the outer product of
    the row absmaxes divided by 127^2. Compared with ``qlora_lab.quant.int8.int8_matmul``
    to within the float32 rounding of its sums (their order may differ)."""
    x, w = _exercise_2_data()
    expected = int8.int8_matmul(x, w)
    ok, got = call_learner(2, int8_linear, x.clone(), w.clone())
    if not ok:
        return False
    if not tensor_shaped(2, got, expected.shape):
        return False
    got = got.float()
    tol = _rounding(x, w)  # reordered float32 sums only
    err = (got - expected).abs().max().item()
    if _within(got, expected, tol):
        print("Exercise 2: correct")
        return True
    print(f"Exercise 2: your output differs from the reference by up to {err:.3g} "
          f"(allowed {tol.max().item():.3g}, float32 rounding of {x.shape[1]}-term sums).")
    exact = x @ w.T
    tensorwise = int8.absmax_dequantize(*int8.absmax_quantize(x)) @ int8.absmax_dequantize(*int8.absmax_quantize(w)).T
    ratio = (got / expected)[expected.abs() > 1e-3 * expected.abs().max()]
    if _within(got, tensorwise, tol):
        print("  Hint: that is tensor-wise quantization; use one absmax per row (dim=1) for x and for w.")
    # Hint only: a wrong constant (128 for 127, 127 for 127^2) moves every ratio by >= 1/127, far above 1e-3.
    elif ratio.numel() and torch.allclose(ratio, ratio.median().expand_as(ratio), rtol=1e-3):
        print(f"  Hint: every output is off by the same factor {ratio.median().item():.4g}: check the 127s.")
    # Hint only: int8 codes err by up to absmax / 254 per operand, ~40x more than 1e-4.
    elif (got - exact).abs().max() < 1e-4 * exact.abs().max():
        print("  Hint: that is the float result; quantize x and w to int8 first.")
    return False


# ---------------------------------------------------------------- exercise 3


def int8_matmul_inlier_stats(x: torch.Tensor, w: torch.Tensor, threshold: float) -> torch.Tensor:
    """Reference answer for exercise 3: LLM.int8() where each row's absmax is taken
    over the inlier columns only (bitsandbytes leaves out only the outlier
    *elements*). Outlier columns go through the 16-bit path as in ``int8_matmul``."""
    _, _, cols = int8.vectorwise_quantize(x, threshold)
    x_inliers = x.clone()
    x_inliers[:, cols] = 0
    out = int8.int8_matmul(x_inliers, w)
    if cols.numel():
        q_w, stats_w, _ = int8.vectorwise_quantize(w)
        w_hat = int8.vectorwise_dequantize(q_w, stats_w)
        out = out + x[:, cols] @ w_hat[:, cols].T
    return out


def exercise_3_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 96, generator=g)
    # an outlier feature of size 3..9: above the threshold 6 in some rows only
    x[:, 11] = torch.linspace(3, 9, 16) * torch.where(torch.arange(16) % 2 == 0, 1.0, -1.0)
    x[5, 60] = 7.5  # a lone outlier: its whole column goes to the 16-bit path
    w = torch.randn(24, 96, generator=g) * 0.2
    return x, w


@checker(3)
def check_exercise_3(int8_matmul_inliers) -> bool:
    """``int8_matmul_inliers(x, w, threshold)``: like ``int8_matmul(x, w, threshold)``, but
    each row's absmax (its scale) is computed over the columns that are not outlier
    columns. Compared with the reference to within the float32 rounding of its sums."""
    x, w = exercise_3_data()
    threshold = 6.0
    expected = int8_matmul_inlier_stats(x, w, threshold)
    ok, got = call_learner(3, int8_matmul_inliers, x.clone(), w.clone(), threshold)
    if not ok:
        return False
    if not tensor_shaped(3, got, expected.shape):
        return False
    got = got.float()
    tol = _rounding(x, w)  # reordered float32 sums only (the outlier columns' product is one of them)
    err = (got - expected).abs().max().item()
    if _within(got, expected, tol):
        exact = x @ w.T
        rel = lambda out: ((out - exact).norm() / exact.norm()).item()  # noqa: E731
        print(
            "Exercise 3: correct. Relative error "
            f"{rel(got):.3g} (bitsandbytes' rule: {rel(int8.int8_matmul(x, w, threshold)):.3g})"
        )
        return True
    print(f"Exercise 3: your output differs from the reference by up to {err:.3g} "
          f"(allowed {tol.max().item():.3g}, float32 rounding of {x.shape[1]}-term sums).")
    if _within(got, int8.int8_matmul(x, w, threshold), tol):
        print("  Hint: that is bitsandbytes' rule; zero the whole outlier columns before taking each row's absmax.")
    elif _within(got, int8.int8_matmul(x, w), tol):
        print("  Hint: that is int8 without decomposition; add the 16-bit product of the outlier columns.")
    return False


# ---------------------------------------------------------------- exercise 4


def blocksize_sweep_reference(x: torch.Tensor, blocksizes) -> dict[int, tuple[float, float]]:
    """Reference answer for exercise 4: ``{blocksize: (mean |error|, bits per value of the
    float32 scales)}`` of block-wise absmax int8 on ``x`` (a partial last block has its own scale)."""
    result = {}
    for blocksize in blocksizes:
        q, scale = int8.blockwise_absmax_quantize(x, blocksize=blocksize)
        error = (x - int8.blockwise_absmax_dequantize(q, scale, blocksize=blocksize)).abs().mean().item()
        result[blocksize] = (error, 32 * scale.numel() / x.numel())
    return result


def exercise_4_blocksizes(x: torch.Tensor) -> tuple[int, ...]:
    """Block sizes from 16 values to the whole tensor (the last is tensor-wise)."""
    return tuple(b for b in (16, 64, 256, 1024, 4096) if b < x.numel()) + (x.numel(),)


@checker(4)
def check_exercise_4(blocksize_sweep, x: torch.Tensor) -> bool:
    """``blocksize_sweep(x, blocksizes)`` must return ``{blocksize: (mean_abs_error,
    scale_bits)}``: the mean |x - dequantized x| of block-wise absmax int8 and the bits per
    value its float32 scales cost. Run on the learner's ``x`` and on a tensor with a partial
    last block; errors must agree to within the float32 rounding of a mean."""
    partial = torch.randn(1000, generator=torch.Generator().manual_seed(4))
    for data, sizes in ((x, exercise_4_blocksizes(x)), (partial, (64, 300))):
        expected = blocksize_sweep_reference(data, sizes)
        ok, got = call_learner(4, blocksize_sweep, data.clone(), sizes)
        if not ok:
            return False
        if not dict_keyed(4, got, sizes, f"one entry per block size {list(sizes)}"):
            return False
        for blocksize, (error, bits) in expected.items():
            answer = got[blocksize]
            if not isinstance(answer, (tuple, list)) or len(answer) != 2:
                print(f"Exercise 4: the value for block size {blocksize} must be a tuple (mean_abs_error, "
                      f"scale_bits), got {answer!r}.")
                return False
            your_error, your_bits = float(answer[0]), float(answer[1])
            # a mean of n float32 values, summed in any order: n eps of the sum, divided by n
            allowed = summation_tolerance(torch.float32, data.numel(), error)
            if abs(your_error - bits) <= 1e-12 * bits and abs(your_bits - error) <= allowed:
                print("Exercise 4: the tuple is (mean_abs_error, scale_bits), in that order.")
                return False
            if abs(your_bits - bits) > 1e-12 * bits:
                print(f"Exercise 4: {data.numel()} values in blocks of {blocksize}: the scales cost {bits:.4g} bits "
                      f"per value, you have {your_bits:.4g}.")
                blocks = -(-data.numel() // blocksize)
                if abs(your_bits - 32 / blocksize) <= 1e-12 and blocks * blocksize != data.numel():
                    print(f"  Hint: the last block is partial but has its own scale: {blocks} scales of 32 bits.")
                elif abs(8 * your_bits - bits) <= 1e-12 * bits:
                    print("  Hint: that is bytes per value; a float32 scale is 32 bits.")
                return False
            if abs(your_error - error) > allowed:
                print(f"Exercise 4: block size {blocksize}: the mean |error| is {error:.6g}, "
                      f"you have {your_error:.6g}.")
                return False
    expected = blocksize_sweep_reference(x, exercise_4_blocksizes(x))
    tensorwise = expected[x.numel()][0]
    print(f"Exercise 4: correct. On your x ({x.numel():,} values):")
    print(f"  {'block size':>10s} {'scale bits/value':>17s} {'mean |error|':>13s} {'vs tensor-wise':>15s}")
    for blocksize, (error, bits) in expected.items():
        print(f"  {blocksize:>10,d} {bits:>17.4f} {error:>13.4g} {error / tensorwise:>15.3f}")
    return True
