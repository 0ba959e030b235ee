"""Checkers for chapter 05 (the QLoRA layer).

Exercise 1: the backward pass of a linear layer with a frozen 4-bit weight.
Exercise 2: the bytes a 4-bit layer really holds, from its shape alone.
Exercise 3: an experiment: the block size against the layer's bits per weight
            and output error.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

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



def _blocksize_case(generator: torch.Generator, out_features: int, in_features: int):
    """A bias-free linear layer with N(0, 0.02^2) weights, and an input whose
    feature 3 is 20 times larger than the others (an outlier column, chapter 01)."""
    linear = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(0.02 * torch.randn(out_features, in_features, generator=generator))
    x = torch.randn(6, in_features, generator=generator)
    x[:, 3] *= 20
    return linear, x


def _as_float(value) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


@checker(3)
def check_exercise_3(blocksize_trade) -> bool:
    """``blocksize_trade(linear, x, blocksize)`` must return ``(bits_per_weight,
    relative_error)`` for ``layer = LinearNF4.from_linear(linear, blocksize=blocksize,
    compute_dtype=torch.float32)`` (NF4 with double quantization):
    ``8 * memory_footprint(layer) / linear.weight.numel()`` and
    ``||layer(x) - linear(x)|| / ||linear(x)||``."""
    generator = torch.Generator().manual_seed(7)
    for (out_features, in_features), blocksize in [((384, 256), 32), ((384, 256), 64), ((384, 256), 1024),
                                                   ((100, 77), 256)]:
        linear, x = _blocksize_case(generator, out_features, in_features)
        layer = LinearNF4.from_linear(linear, blocksize=blocksize, compute_dtype=torch.float32)
        with torch.no_grad():
            reference, output, dequantized = linear(x), layer(x), layer.dequantized_weight()
        bits = 8 * memory_footprint(layer) / linear.weight.numel()
        error = ((output - reference).norm() / reference.norm()).item()
        ok, got = call_learner(3, blocksize_trade, copy.deepcopy(linear), x.clone(), blocksize)
        if not ok:
            return False
        pair = list(got) if isinstance(got, (tuple, list)) else []
        values = [_as_float(v) for v in pair]
        if len(values) != 2 or None in values:
            print(f"Exercise 3: return (bits_per_weight, relative_error), two numbers; got {type(got).__name__}")
            return False
        got_bits, got_error = values
        # the learner may compute the bits in float32: a few roundings of 8 * bytes / weights
        if abs(got_bits - bits) > 4 * torch.finfo(torch.float32).eps * bits:
            print(f"Exercise 3: a {out_features}x{in_features} layer in blocks of {blocksize} holds "
                  f"{bits:.4f} bits per weight, you said {got_bits:.4f}.")
            tables = 8 * 4 * (layer.code.numel() + layer.nested_code.numel()) / linear.weight.numel()
            if abs(got_bits - (bits - tables)) <= 4 * torch.finfo(torch.float32).eps * bits:
                print("  Hint: memory_footprint counts every tensor the layer holds, its two code tables too.")
            return False
        # both outputs are float32 sums of in_features products (any order), and the norms sums of
        # reference.numel() squares: their roundings bound how far a correct answer can lie from ours
        magnitude = ((x.abs() @ linear.weight.abs().t() + x.abs() @ dequantized.abs().t()).norm()
                     / reference.norm()).item()
        tol = (summation_tolerance(torch.float32, in_features, magnitude)
               + summation_tolerance(torch.float32, reference.numel(), error))
        if abs(got_error - error) > tol:
            print(f"Exercise 3: in blocks of {blocksize} the layer's output is off by {error:.4%} of "
                  f"linear(x), you said {got_error:.4%}.")
            weight_error = ((dequantized - linear.weight).norm() / linear.weight.norm()).item()
            if abs(got_error - weight_error) <= tol:
                print("  Hint: that is the weight's error; measure the outputs, layer(x) against linear(x).")
            return False
    print("Exercise 3: correct")
    return True
