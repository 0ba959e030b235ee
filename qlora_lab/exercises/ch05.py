"""Checkers for chapter 05 (the QLoRA layer).

Exercise 1: the backward pass of a linear layer with a frozen 4-bit weight.
Exercise 2: the bytes a 4-bit layer really holds, from its shape alone.
"""

from __future__ import annotations

import torch

from qlora_lab.exercises import call_learner, checker, tensor_shaped
from qlora_lab.qlora import DequantizeLinear, LinearNF4, memory_footprint
from qlora_lab.quant.nf4 import dequantize_4bit, quantize_4bit
from qlora_lab.support.checks import summation_tolerance


@checker(1)
def check_exercise_1(input_gradient) -> bool:
    """``input_gradient(grad_output, packed, state)`` must return dL/dx for
    ``y = x W^T`` where ``W`` is the weight that ``packed`` and ``state``
    stand for, with the shape of ``x`` (any number of leading dimensions)."""
    generator = torch.Generator().manual_seed(5)
    for shape, leading in [((48, 64), (7,)), ((96, 32), (2, 5)), ((17, 40), (3,))]:
        weight = torch.randn(shape, generator=generator)
        packed, state = quantize_4bit(weight, double_quant=True)
        x = torch.randn(*leading, shape[1], generator=generator, requires_grad=True)
        grad_output = torch.randn(*leading, shape[0], generator=generator)
        DequantizeLinear.apply(x, packed, state, None).backward(grad_output)
        ok, got = call_learner(1, input_gradient, grad_output, packed, state)
        if not ok:
            return False
        if not tensor_shaped(1, got, x.shape):
            return False
        # grad_output @ W_hat sums out_features products, in whatever order the learner's matmul takes.
        tol = summation_tolerance(torch.float32, shape[0], grad_output.abs() @ dequantize_4bit(packed, state).abs())
        if not bool(((got - x.grad).abs() <= tol).all()):
            print(f"Exercise 1: wrong values for a weight of shape {shape} (largest error "
                  f"{(got - x.grad).abs().max().item():.3g}).")
            if bool(((got - grad_output @ weight).abs() <= tol).all()):
                print("  Hint: you used the full-precision weight; the layer only has the 4-bit one.")
            return False
    print("Exercise 1: correct")
    return True


@checker(2)
def check_exercise_2(layer_bytes) -> bool:
    """``layer_bytes(out_features, in_features)`` must return the bytes that a
    bias-free ``LinearNF4`` (NF4, blocks of 64, double quantization with
    blocks of 256) holds in its tensors, counted by ``memory_footprint``."""
    generator = torch.Generator().manual_seed(6)
    for out_features, in_features in [(576, 576), (1536, 576), (192, 576), (7, 33), (64, 4097)]:
        weight = torch.randn(out_features, in_features, generator=generator)
        packed, state = quantize_4bit(weight, blocksize=64, quant_type="nf4", double_quant=True)
        expected = memory_footprint(LinearNF4(in_features, out_features, packed, state))
        ok, got = call_learner(2, layer_bytes, out_features, in_features)
        if not ok:
            return False
        if got != expected:
            print(f"Exercise 2: a {out_features}x{in_features} layer holds {expected:,} bytes, you said {got!r}.")
            if got == (out_features * in_features + 1) // 2:
                print("  Hint: the packed weight is not everything: count the constants too.")
            return False
    print("Exercise 2: correct")
    return True

