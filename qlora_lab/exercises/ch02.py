"""Checkers for chapter 02 (NormalFloat).

Exercise 1: build the asymmetric NF-k data type from N(0, 1) quantiles.
Exercise 2: decode packed 4-bit bytes back into a tensor (nibble order, block
scaling, partial last block).
"""

from __future__ import annotations

import torch

from qlora_lab.exercises import call_learner, checker
from qlora_lab.quant import codes, nf4


@checker(1)
def check_exercise_1(my_normal_float_code) -> bool:
    """``my_normal_float_code(bits)`` must return the asymmetric NF-k code
    (``qlora_lab.quant.codes.normal_float_code(bits)``) for k = 2, 3, 4: ``2**k`` sorted
    values, within 1e-6 of the reference (float64 arithmetic is fine)."""
    for bits in (4, 3, 2):
        expected = codes.normal_float_code(bits)
        ok, got = call_learner(1, my_normal_float_code, bits)
        if not ok:
            return False
        if not isinstance(got, torch.Tensor):
            print(f"Exercise 1: return a torch.Tensor, got {type(got).__name__}")
            return False
        got = got.detach().double().reshape(-1)
        if not bool(torch.isfinite(got).all()):
            print(f"Exercise 1: NF{bits} came back with inf or NaN values: {[round(v, 4) for v in got.tolist()]}")
            print("  Hint: the normal quantile of probability 1 is infinite (scipy's norm.ppf(1.0) is inf): "
                  "the outermost quantile is taken at normal_float_offset(bits) instead, and the "
                  "probabilities run from there down to 0.5.")
            return False
        if got.numel() != expected.numel():
            print(f"Exercise 1: NF{bits} has {expected.numel()} values, yours has {got.numel()}")
            if got.numel() == 256:
                print("  Hint: bitsandbytes pads its table to 256 entries; keep only the 2**bits values.")
            return False
        if not torch.all(got[1:] >= got[:-1]):
            print(f"Exercise 1: sort the values (NF{bits} came back unsorted)")
            return False
        error = (got - expected.double()).abs().max().item()
        if error > 1e-6:
            print(f"Exercise 1: NF{bits} differs from the reference by up to {error:.3g}")
            print(f"  expected {[round(v, 4) for v in expected.tolist()]}")
            print(f"  got      {[round(v, 4) for v in got.tolist()]}")
            if not (got == 0).any():
                print("  Hint: the asymmetric type contains an exact zero.")
            elif got.abs().max() != 1:
                print("  Hint: divide by the largest value so that the code spans [-1, 1].")
            elif (got > 0).sum() != 2 ** (bits - 1):
                print(f"  Hint: {2 ** (bits - 1)} positive quantiles, {2 ** (bits - 1) - 1} negative ones, and zero.")
            else:
                print("  Hint: probabilities evenly spaced from normal_float_offset(bits) down to 0.5 (excluded).")
            return False
    print("Exercise 1: correct")
    return True


def _cases():
    generator = torch.Generator().manual_seed(2)
    cases = []
    for shape, blocksize, quant_type in [((6, 64), 64, "nf4"), ((5, 7), 32, "nf4"), ((101,), 64, "fp4"),
                                         ((3, 45), 128, "int4"), ((1,), 64, "nf4")]:
        x = torch.randn(shape, generator=generator)
        packed, state = nf4.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
        cases.append((packed, state, quant_type))
    return cases


@checker(2)
def check_exercise_2(my_dequantize) -> bool:
    """``my_dequantize(packed, absmax, code, blocksize, shape)`` must return the
    float32 tensor of ``shape`` that ``qlora_lab.quant.nf4.dequantize_4bit`` returns,
    exactly, for NF4, FP4 and Int4 tensors with full and partial blocks."""
    for packed, state, quant_type in _cases():
        expected = nf4.dequantize_4bit(packed, state)
        ok, got = call_learner(2, my_dequantize, packed.clone(), state.absmax.clone(), state.code.clone(),
                               state.blocksize, tuple(state.shape))
        if not ok:
            return False
        where = f"{quant_type}, shape {tuple(state.shape)}, blocks of {state.blocksize}"
        if not isinstance(got, torch.Tensor):
            print(f"Exercise 2: return a torch.Tensor, got {type(got).__name__}")
            return False
        if tuple(got.shape) != tuple(state.shape):
            print(f"Exercise 2 ({where}): expected shape {tuple(state.shape)}, got {tuple(got.shape)}")
            if got.numel() == state.numel + 1:
                print("  Hint: an odd number of elements leaves one padding nibble in the last byte; drop it.")
            return False
        if torch.equal(got.float(), expected):
            continue
        print(f"Exercise 2 ({where}): values differ in {(got.float() != expected).sum().item()} of "
              f"{expected.numel()} places")
        swapped = _decode(packed, state, high_first=False)
        if torch.equal(got.float(), swapped):
            print("  Hint: element 2i is in the high nibble (byte >> 4), element 2i + 1 in the low one.")
        # Another rounding path (float64, or x / (1 / absmax)) rounds code * absmax up to 3 times eps/2 otherwise.
        elif torch.allclose(got.float(), expected, rtol=2 * torch.finfo(torch.float32).eps, atol=0):
            print("  Hint: almost: multiply code[index] by absmax in float32 (no division, no float64).")
        return False
    print("Exercise 2: correct")
    return True


def _decode(packed: torch.Tensor, state: nf4.QuantState, high_first: bool) -> torch.Tensor:
    flat = packed.reshape(-1)
    pair = [flat >> 4, flat & 0xF] if high_first else [flat & 0xF, flat >> 4]
    indices = torch.stack(pair, 1).reshape(-1)[: state.numel].long()
    blocks = torch.arange(state.numel) // state.blocksize
    return (state.code[indices] * state.absmax[blocks]).reshape(state.shape)
