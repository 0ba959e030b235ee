"""qlora_lab.support.checks: the rounding tolerance the tests and notebooks share."""

import pytest
import torch

from qlora_lab.support.checks import assert_close_to_rounding, summation_tolerance


def test_summation_tolerance_bounds_every_order_of_a_sum():
    torch.manual_seed(0)
    x = torch.randn(4096)
    exact = x.double().sum()
    orders = [x.sum(), x.flip(0).sum(), x.view(64, 64).sum(0).sum(), x.cumsum(0)[-1]]
    bound = summation_tolerance(torch.float32, x.numel(), x.abs().sum().item())
    assert bound == 4096 * 2**-23 * x.abs().sum().item()
    assert all(abs(o.double() - exact) <= bound / 2 for o in orders)
    assert len({o.item() for o in orders}) > 1  # the orders do round differently


def test_assert_close_to_rounding_passes_reordered_matmuls_and_fails_real_differences():
    torch.manual_seed(0)
    x, w = torch.randn(8, 512), torch.randn(16, 512)
    by_blocks = sum(x[:, i:i + 64] @ w[:, i:i + 64].T for i in range(0, 512, 64))
    assert_close_to_rounding(by_blocks, x @ w.T, terms=512, magnitude=x.abs() @ w.abs().T, why="blocked vs one matmul")
    wrong = x @ (w * (1 + 1e-3)).T
    with pytest.raises(AssertionError, match="512 terms in torch.float32 \\(a scaled weight\\)"):
        assert_close_to_rounding(wrong, x @ w.T, terms=512, why="a scaled weight")
    with pytest.raises(AssertionError, match="shapes differ"):
        assert_close_to_rounding(x, x.T, terms=1, why="transposed")
    with pytest.raises(AssertionError, match="differ by nan"):
        assert_close_to_rounding(x.masked_fill(x > 2, float("nan")), x, terms=1, why="nan")


def test_the_less_precise_dtype_sets_the_tolerance():
    y = torch.ones(3)
    assert_close_to_rounding(y + 2**-8, y.bfloat16(), terms=1, why="bf16 rounding")  # eps(bf16) = 2**-7
    with pytest.raises(AssertionError):
        assert_close_to_rounding(y + 2**-8, y, terms=1, why="fp32 rounding")
    with pytest.raises(ValueError, match="terms must be a positive int"):
        summation_tolerance(torch.float32, 0, 1.0)
