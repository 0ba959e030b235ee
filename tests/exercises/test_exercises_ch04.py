"""The chapter 04 checkers accept right answers, reject typical wrong ones with a
hint, and treat a skeleton as "not attempted yet" without raising."""

import torch

from qlora_lab.exercises import ch04

from exercise_feedback import assert_bugs_are_feedback


def skeleton(*args):
    raise NotImplementedError("your turn")


# ---------------------------------------------------------------- exercise 1


def merged_weight(W, A, B, alpha):
    return W + (alpha / A.shape[0]) * (B @ A)


def test_exercise_1_right(capsys):
    assert ch04.check_exercise_1(merged_weight)
    assert "Exercise 1: correct" in capsys.readouterr().out


def test_exercise_1_wrong(capsys):
    def in_place(W, A, B, alpha):
        W += (alpha / A.shape[0]) * (B @ A)
        return W

    cases = [
        (lambda W, A, B, alpha: W + B @ A, "scaled by alpha / r"),
        (lambda W, A, B, alpha: W + alpha * A.shape[0] * (B @ A), "not alpha * r"),
        (lambda W, A, B, alpha: W + (A.shape[0] / alpha) * (B @ A), "not r / alpha"),
        (lambda W, A, B, alpha: W - (alpha / A.shape[0]) * (B @ A), "B @ A has W's shape"),
        (in_place, "changed W in place"),
        (lambda W, A, B, alpha: (B @ A).T, "return a tensor shaped like W"),
    ]
    for wrong, hint in cases:
        assert ch04.check_exercise_1(wrong) is False
        assert hint in capsys.readouterr().out


def test_exercise_1_keeps_the_global_random_state():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    ch04.check_exercise_1(merged_weight)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------- exercise 2


def llama_lora_params(hidden, intermediate, num_layers, r):
    attention = 4 * r * (hidden + hidden)
    mlp = 3 * r * (hidden + intermediate)
    return num_layers * (attention + mlp)


def test_exercise_2_right(capsys):
    assert ch04.check_exercise_2(llama_lora_params)
    assert "Exercise 2: correct" in capsys.readouterr().out


def test_exercise_2_wrong(capsys):
    cases = [
        (lambda h, i, n, r: n * 4 * 2 * h * r, "also adapts the MLP"),
        (lambda h, i, n, r: n * 7 * 2 * h * r, "not square"),
        (lambda h, i, n, r: llama_lora_params(h, i, 1, r), "in every layer"),
        (lambda h, i, n, r: n * (4 * h * h + 3 * h * i), "r * (in + out)"),
    ]
    for wrong, hint in cases:
        assert ch04.check_exercise_2(wrong) is False
        assert hint in capsys.readouterr().out


# ---------------------------------------------------------------- exercise 3


def best_low_rank_factors(delta, r):
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return U[:, :r] * S[:r], Vh[:r]


def test_exercise_3_right(capsys):
    assert ch04.check_exercise_3(best_low_rank_factors)

    def balanced(delta, r):  # sqrt(S) on both sides is just as good
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        return U[:, :r] * S[:r].sqrt(), S[:r].sqrt()[:, None] * Vh[:r]

    assert ch04.check_exercise_3(balanced)
    assert capsys.readouterr().out.count("Exercise 3: correct") == 2


def test_exercise_3_wrong(capsys):
    def unscaled(delta, r):
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        return U[:, :r], Vh[:r]

    def smallest(delta, r):
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        return U[:, -r:] * S[-r:], Vh[-r:]

    def transposed(delta, r):
        B, A = best_low_rank_factors(delta, r)
        return A.T, B.T

    cases = [
        (unscaled, "put the singular values into one of the factors"),
        (smallest, "r largest singular values"),
        (transposed, "expected B"),
        (lambda delta, r: delta, "pair of tensors"),
    ]
    for wrong, hint in cases:
        assert ch04.check_exercise_3(wrong) is False
        assert hint in capsys.readouterr().out


def test_skeletons_and_crashes(capsys):
    for check in (ch04.check_exercise_1, ch04.check_exercise_2, ch04.check_exercise_3):
        assert check(skeleton) is False
        assert "not attempted yet" in capsys.readouterr().out
        assert check(lambda *args: 1 / 0) is False
        assert "ZeroDivisionError" in capsys.readouterr().out


# ------------------------------------------------------- a learner's bug is feedback


def test_a_bug_in_the_learners_code_is_feedback_not_a_crash(capsys):
    assert_bugs_are_feedback(capsys, [
        (1, ch04.check_exercise_1, ()),
        (2, ch04.check_exercise_2, ()),
        (3, ch04.check_exercise_3, ()),
    ])
