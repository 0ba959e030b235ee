"""Checkers for chapter 02 (NormalFloat).

Exercise 1: build the asymmetric NF-k data type from N(0, 1) quantiles.
Exercise 2: decode packed 4-bit bytes back into a tensor (nibble order, block
scaling, partial last block).
Exercise 3: change the block size and measure: the relative error of Int4, FP4
and NF4 on real weights at block sizes from 32 to 4096.
"""

from __future__ import annotations

import math

import torch

from qlora_lab.exercises import call_learner, checker, dict_keyed
from qlora_lab.quant import codes, fake_quant, nf4

#: The block sizes of exercise 3, and its three data types.
EXERCISE_3_BLOCKSIZES = (32, 64, 256, 1024, 4096)
EXERCISE_3_TYPES = ("Int4", "FP4", "NF4")


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


def block_size_errors(x: torch.Tensor, blocksizes=EXERCISE_3_BLOCKSIZES) -> dict[int, dict[str, float]]:
    """The reference answer of exercise 3: ``{blocksize: {type: relative error}}``,
    the relative error ``||Q(x) - x|| / ||x||`` of ``x`` quantized block-wise to
    each 4-bit code, summed in float64."""
    x64 = x.double()
    return {b: {name: ((fake_quant.round_trip(x, code=codes.code_for(name.lower()), blocksize=b).double() - x64)
                       .pow(2).sum() / x64.pow(2).sum()).sqrt().item() for name in EXERCISE_3_TYPES}
            for b in blocksizes}


@checker(3)
def check_exercise_3(my_block_size_errors, x) -> bool:
    """``my_block_size_errors(x, blocksizes)`` must return ``{blocksize: {"Int4": e,
    "FP4": e, "NF4": e}}`` for the block sizes of :data:`EXERCISE_3_BLOCKSIZES`, each
    ``e`` the relative error of ``x`` quantized block-wise to that code (a float or a
    0-d tensor).

    Tolerance, relative: a float32 sum of n terms is within ``log2(n) * eps`` of the
    exact sum when summed pairwise (``tensor.sum()``), and within about
    ``sqrt(n) * eps`` in any order with high probability (Higham and Mary's
    probabilistic bound; ``torch.linalg.norm`` sums otherwise); rounding each
    difference adds ``eps``. The ratio of two such sums is off by at most twice
    that, its square root by half of that again: ``max(sqrt(n), log2(n) + 1) * eps``.
    The reference sums in float64."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() < 2:
        print("Exercise 3: pass the weights to measure as the second argument (a float tensor), as the cell does")
        return False
    ok, got = call_learner(3, my_block_size_errors, x.clone(), EXERCISE_3_BLOCKSIZES)
    if not ok:
        return False
    if not dict_keyed(3, got, EXERCISE_3_BLOCKSIZES, f"one entry per block size {list(EXERCISE_3_BLOCKSIZES)}"):
        return False
    expected = block_size_errors(x)
    tolerance = max(math.sqrt(x.numel()), math.log2(x.numel()) + 1) * torch.finfo(torch.float32).eps
    for blocksize in EXERCISE_3_BLOCKSIZES:
        row = got[blocksize]
        if not isinstance(row, dict) or sorted(row) != sorted(EXERCISE_3_TYPES):
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            print(f"Exercise 3: got[{blocksize}] must be a dict with the keys {list(EXERCISE_3_TYPES)}, got {keys}")
            return False
        for name in EXERCISE_3_TYPES:
            want, mine = expected[blocksize][name], float(row[name])
            if abs(mine - want) <= tolerance * want:
                continue
            print(f"Exercise 3: {name} with blocks of {blocksize}: expected a relative error of {want:.4f}, got "
                  f"{mine:.4f}")
            if abs(mine - want**2) <= tolerance * want**2:
                print("  Hint: that is the squared error ratio; take its square root.")
            elif any(abs(mine - expected[b][name]) <= tolerance * expected[b][name]
                     for b in EXERCISE_3_BLOCKSIZES if b != blocksize):
                print("  Hint: that is the error at another block size; pass each block size on to "
                      "nf4.quantize_blockwise and dequantize_blockwise.")
            else:
                print("  Hint: ||Q(x) - x|| / ||x|| over the whole tensor, with Q the block-wise round trip of "
                      "nf4.quantize_blockwise and nf4.dequantize_blockwise to codes.code_for(name.lower()).")
            return False
    print("Exercise 3: correct")
    return True
