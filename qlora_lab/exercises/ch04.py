"""Checkers for chapter 04 (LoRA).

Exercise 1: the merged weight ``W + (alpha / r) B A`` a merged adapter leaves behind.
Exercise 2: LoRA's trainable parameters on every linear layer of a LLaMA model.
Exercise 3: the best rank-r adapter for a given weight update (truncated SVD,
            Eckart-Young), i.e. what LoRA can at best represent at rank r.
Exercise 4: an experiment: adapters on one linear layer of the block at a time
            (section 8's study), measured on the held-out words.
"""

from __future__ import annotations

import torch
from torch import nn

from qlora_lab.exercises import call_learner, checker, dict_keyed, tensor_shaped
from qlora_lab.lora import LoRALinear, lora_parameter_count
from qlora_lab.lora.ablation import PlacementStudy
from qlora_lab.support.checks import summation_tolerance


# ---------------------------------------------------------------- exercise 1


def _exercise_1_cases():
    g = torch.Generator().manual_seed(41)
    for out_features, in_features, r, alpha in [(6, 10, 2, 4.0), (32, 16, 4, 16.0), (12, 12, 3, 1.0)]:
        W = torch.randn(out_features, in_features, generator=g)
        A = torch.randn(r, in_features, generator=g) / in_features**0.5
        B = torch.randn(out_features, r, generator=g)
        yield W, A, B, alpha


def _reference_merge(W, A, B, alpha):
    with torch.random.fork_rng(devices=[]):  # leave the notebook's random stream alone
        layer = LoRALinear(nn.Linear(W.shape[1], W.shape[0], bias=False), r=A.shape[0], alpha=alpha)
    with torch.no_grad():
        layer.base.weight.copy_(W)
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
        layer.merge()
    return layer.base.weight.detach().clone()


@checker(1)
def check_exercise_1(merged_weight) -> bool:
    """``merged_weight(W, A, B, alpha)`` must return a new tensor equal to the
    base weight after merging (``LoRALinear.merge``): ``W + (alpha / r) B A``
    with ``r = A.shape[0]``, leaving ``W`` itself unchanged."""
    for W, A, B, alpha in _exercise_1_cases():
        expected = _reference_merge(W, A, B, alpha)
        W_before = W.clone()
        ok, got = call_learner(1, merged_weight, W, A, B, alpha)
        if not ok:
            return False
        if not tensor_shaped(1, got, W.shape, like="W"):
            return False
        if not torch.equal(W, W_before):
            print("Exercise 1: your function changed W in place; return a new tensor (W + ..., not W += ...)")
            return False
        r = A.shape[0]
        # B @ A sums r products, then scale and add to W round once each; a learner may order them otherwise.
        tol = summation_tolerance(torch.float32, r + 2, W.abs() + (alpha / r) * (B.abs() @ A.abs()))
        if not bool(((got - expected).abs() <= tol).all()):
            print(f"Exercise 1: wrong merged weight for W {tuple(W.shape)}, r={r}, alpha={alpha}")
            for wrong, hint in [(W + B @ A, "the update is scaled by alpha / r"),
                                (W + alpha * r * (B @ A), "the scale is alpha / r, not alpha * r"),
                                (W + (r / alpha) * (B @ A), "the scale is alpha / r, not r / alpha")]:
                if bool(((got - wrong).abs() <= tol).all()):
                    print(f"  Hint: {hint}.")
                    break
            else:
                print("  Hint: B is (out x r) and A is (r x in), so B @ A has W's shape.")
            return False
    print("Exercise 1: correct")
    return True


# ---------------------------------------------------------------- exercise 2

_EXERCISE_2_CASES = [
    # hidden, intermediate, layers, r   (LLaMA-7B, LLaMA-13B, a small one)
    (4096, 11008, 32, 64),
    (5120, 13824, 40, 64),
    (64, 172, 2, 3),
]


@checker(2)
def check_exercise_2(llama_lora_params) -> bool:
    """``llama_lora_params(hidden, intermediate, num_layers, r)`` must return
    the trainable parameters of LoRA rank ``r`` on all seven linear layers of
    every block of a LLaMA model (q, k, v, o: hidden x hidden; gate, up:
    hidden -> intermediate; down: intermediate -> hidden)."""
    for hidden, intermediate, layers, r in _EXERCISE_2_CASES:
        config = {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
                  "num_attention_heads": 1}
        expected = lora_parameter_count(config, r=r, target_modules="all-linear")
        ok, got = call_learner(2, llama_lora_params, hidden, intermediate, layers, r)
        if not ok:
            return False
        if got != expected:
            print(f"Exercise 2: hidden={hidden}, intermediate={intermediate}, layers={layers}, r={r}: "
                  f"expected {expected:,}, got {got!r}")
            attention_only = layers * 4 * 2 * hidden * r
            if got == attention_only:
                print("  Hint: all-linear also adapts the MLP's gate_proj, up_proj and down_proj.")
            elif got == layers * 7 * 2 * hidden * r:
                print("  Hint: the MLP matrices are not square: each adapter has r * (in + out) parameters.")
            elif got == layers * 7 * r * (hidden + intermediate) or got == expected // layers:
                print("  Hint: count each of the seven matrices with its own sizes, in every layer.")
            else:
                print("  Hint: A is r x in and B is out x r, so one adapter has r * (in + out) parameters.")
            return False
    print("Exercise 2: correct")
    return True


# ---------------------------------------------------------------- exercise 3


def _exercise_3_cases():
    g = torch.Generator().manual_seed(43)
    smooth = torch.randn(40, 6, generator=g) @ torch.randn(6, 24, generator=g)  # rank 6
    noisy = smooth + 0.05 * torch.randn(40, 24, generator=g)
    yield torch.randn(30, 20, generator=g), 1
    yield noisy, 3
    yield noisy, 6
    yield smooth.T.contiguous(), 8  # r above the rank: the error must be (about) zero


@checker(3)
def check_exercise_3(best_low_rank_factors) -> bool:
    """``best_low_rank_factors(delta, r)`` must return ``(B, A)`` with B of
    shape (out, r) and A of shape (r, in) such that ``B @ A`` is the best
    rank-r approximation of ``delta`` in the Frobenius norm: its error must be
    ``sqrt(sum of the squared singular values beyond the r-th)``
    (Eckart-Young)."""
    for delta, r in _exercise_3_cases():
        ok, got = call_learner(3, best_low_rank_factors, delta.clone(), r)
        if not ok:
            return False
        if not (isinstance(got, tuple) and len(got) == 2 and all(isinstance(t, torch.Tensor) for t in got)):
            print("Exercise 3: return a pair of tensors (B, A)")
            return False
        B, A = got
        out_features, in_features = delta.shape
        if B.shape != (out_features, r) or A.shape != (r, in_features):
            print(f"Exercise 3: for delta {tuple(delta.shape)} and r={r} expected B {(out_features, r)} and "
                  f"A {(r, in_features)}, got B {tuple(B.shape)} and A {tuple(A.shape)}")
            return False
        S = torch.linalg.svdvals(delta.double())
        best = S[r:].square().sum().sqrt().item()
        error = torch.linalg.matrix_norm(delta.double() - B.double() @ A.double()).item()
        if error > best * (1 + 1e-4) + 1e-4 * S[0].item():
            print(f"Exercise 3: for delta {tuple(delta.shape)}, r={r}: |delta - B A| = {error:.4g}, "
                  f"but the best rank-{r} error is {best:.4g}")
            U, S_, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
            unscaled = torch.linalg.matrix_norm(delta.double() - U[:, :r] @ Vh[:r]).item()
            if abs(error - unscaled) < 1e-6 * (1 + unscaled):
                print("  Hint: put the singular values into one of the factors, e.g. B = U_r diag(S_r), A = V_r^T.")
            else:
                print("  Hint: take the r largest singular values: delta = U diag(S) V^T (torch.linalg.svd).")
            return False
    print("Exercise 3: correct")
    return True


# ---------------------------------------------------------------- exercise 4

#: The seven linear layers of a LLaMA block, in the order of the block.
LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _as_number(value) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


@checker(4)
def check_exercise_4(single_matrix_losses, study: PlacementStudy, r: int = 16) -> bool:
    """``single_matrix_losses(study, r)`` must return ``{name: held-out loss}``
    for rank-``r`` adapters on each linear layer of the block alone,
    ``study.run([name], r).heldout_loss``. The checker runs the best and the
    worst of the learner's seven again and compares."""
    if not isinstance(study, PlacementStudy):
        print(f"Exercise 4: pass section 8's study (ablation.PlacementStudy), got {type(study).__name__}")
        return False
    ok, got = call_learner(4, single_matrix_losses, study, r)
    if not ok:
        return False
    if not dict_keyed(4, got, LINEAR_LAYERS, f"one entry per linear layer, {', '.join(LINEAR_LAYERS)};"):
        return False
    losses = {name: _as_number(value) for name, value in got.items()}
    bad = [name for name, value in losses.items() if value is None or not value == value or value < 0]
    if bad:
        print(f"Exercise 4: the held-out loss of {bad[0]} must be a non-negative number, got {got[bad[0]]!r}")
        return False
    for name in (min(losses, key=losses.get), max(losses, key=losses.get)):
        run = study.run([name], r)
        # the same run gives the same float; a float32 round trip of the learner's changes at most its last bit
        tol = 2 * torch.finfo(torch.float32).eps * abs(run.heldout_loss)
        if abs(losses[name] - run.heldout_loss) > tol:
            print(f"Exercise 4: with rank-{r} adapters on {name} alone the held-out loss is "
                  f"{run.heldout_loss:.4f}, you said {losses[name]:.4f}.")
            if abs(losses[name] - run.train_loss) <= 2 * torch.finfo(torch.float32).eps * abs(run.train_loss):
                print("  Hint: that is the loss on the training words; the exercise asks for heldout_loss.")
            else:
                print(f"  Hint: train and measure with study.run([name], r) (the study's seed, steps and learning "
                      f"rate), and return its heldout_loss.")
            return False
    print(f"Exercise 4: correct. Held-out loss with rank-{r} adapters on one matrix only, best first:")
    for name in sorted(losses, key=losses.get):
        print(f"  {name:10s} {losses[name]:.2f}")
    return True
