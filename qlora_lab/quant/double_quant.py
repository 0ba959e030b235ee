"""Double quantization: quantizing the quantization constants (QLoRA, Sec. 3).

Block-wise 4-bit quantization stores one float32 absmax per block of 64
weights: 32/64 = 0.5 extra bits per parameter. QLoRA's *Double Quantization*
quantizes those constants a second time:

1. subtract their mean (the constants are all positive; centred, they use the
   signed 8-bit type's both halves),
2. cut them into blocks of 256 and quantize each block to 8 bits with the
   signed *dynamic* data type (:func:`dynamic_map`), keeping one float32
   absmax per block of 256.

That costs 8/64 + 32/(64 * 256) = 0.127 bits per parameter instead of 0.5
(QLoRA, Sec. 3: "reducing the memory footprint from 0.5 bits per parameter to
0.127 bits"). Dequantization: ``code[c] * absmax2[block] + mean``.

Compared with bitsandbytes 0.50.2 (``quantize_4bit(..., compress_statistics=True)``
on CPU): the mean offset and the second-level absmax are identical, and so is
every dequantized weight once our state goes through ``to_bnb()``. The 8-bit
indices differ in about 0.15-0.2 % of places, and only where bitsandbytes does
not pick the nearest value: its CPU kernel rounds the scaled value to a uniform
grid of 65536 points on [-1, 1] (step 3.05e-5) and looks the index up from the
grid point. The dynamic map's values near zero are 1e-7 to 1e-5 apart, so near
zero several values share one grid cell and the kernel can land up to four
indices away; elsewhere it only errs for values within half a grid step of a
midpoint. We take the exact nearest value (ties to the lower one), so our error
is never larger. ``tests/quant/test_double_quant.py`` reproduces bitsandbytes'
indices exactly with a model of that grid look-up.
"""

from __future__ import annotations

import torch

from qlora_lab.quant.blockwise import (NestedState, QuantState, blockwise_absmax, dequantize_blockwise, nearest_code,
                                 scale_blocks)

#: Block sizes for the second level (bitsandbytes' ``quantize_blockwise``
#: documents 64 .. 4096; QLoRA and bitsandbytes' 4-bit path use 256).
NESTED_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


# --------------------------------------------------------------------------- #
# The signed 8-bit dynamic data type
# --------------------------------------------------------------------------- #
def dynamic_map(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' 8-bit *dynamic* data type (Dettmers, "8-Bit Approximations
    for Parallelism in Deep Learning", 2016), built from scratch: 256 float32
    values in [-1, 1], sorted. Equal bit for bit to
    ``bitsandbytes.functional.create_dynamic_map(signed)``.

    Layout of a signed code byte, from the top bit down:

    * **sign** (1 bit);
    * **exponent marker**: a run of ``z`` zero bits closed by a single one
      bit. The run length is the decimal exponent: the value lies in
      ``[0.1, 1] * 10**(-z)``. ``z`` goes from 0 to 6;
    * **fraction**: the ``6 - z`` bits left after the marker, a linear index
      into that decade: the decade ``[0.1, 1]`` is cut into ``2**(6 - z)``
      equal parts and the value is the centre of its part.

    So large magnitudes get 6 fraction bits (64 values between 0.1 and 1) and
    each smaller decade one bit less, down to a single value, 0.55e-6, at
    ``z = 6``: range over precision, like a float, but with the exponent's
    length varying. That is 2 * 127 values, plus 0 (all seven bits zero) and
    1.0. Unsigned (``signed=False``): no sign bit, so every decade gets one more
    fraction bit (2 * 127 values in [0, 1], plus 0 and 1.0).

    The construction follows bitsandbytes' arithmetic (float32 boundaries from
    ``torch.linspace``, float32 centres, the power of ten rounded to float32)
    so that the values agree to the bit.
    """
    values: list[float] = []
    for exponent in range(7):  # z: the length of the zero run
        fraction_bits = 6 - exponent if signed else 7 - exponent
        boundaries = torch.linspace(0.1, 1, 2**fraction_bits + 1, dtype=torch.float32)
        centres = (boundaries[:-1] + boundaries[1:]) / 2.0
        magnitudes = (10.0 ** (-exponent)) * centres
        values += magnitudes.tolist()
        if signed:
            values += (-magnitudes).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


# --------------------------------------------------------------------------- #
# Quantizing the constants
# --------------------------------------------------------------------------- #
def double_quantize(absmax: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, NestedState]:
    """Quantize the float32 block constants of a 4-bit tensor (QLoRA Sec. 3,
    "Double Quantization"): ``(absmax_indices, nested)``.

    ``offset = absmax.mean()``; the centred constants ``absmax - offset`` are
    quantized block-wise (:mod:`qlora_lab.quant.blockwise`) to :func:`dynamic_map`:
    cut into blocks of ``blocksize`` (the last block may be shorter), each
    block multiplied by the float32 reciprocal of its own absmax (as
    bitsandbytes does), and every value replaced by the index (uint8) of the
    *nearest* value of the map, ties to the lower one (midpoints in float64,
    so "nearest" is exact). A block whose constants all equal the mean has
    absmax 0 and stores the index of 0.
    """
    _check_absmax(absmax)
    _check_nested_blocksize(blocksize)
    absmax = absmax.detach()
    offset = absmax.mean()
    centred = absmax - offset
    nested_absmax = blockwise_absmax(centred, blocksize)
    code = dynamic_map(signed=True).to(absmax.device)
    indices = nearest_code(scale_blocks(centred, nested_absmax, blocksize), code, midpoint_dtype=torch.float64)
    return indices, NestedState(absmax=nested_absmax, offset=offset, code=code, blocksize=blocksize)


def double_dequantize(absmax_indices: torch.Tensor, nested: NestedState) -> torch.Tensor:
    """The float32 block constants back: ``code[index] * absmax[block] + offset``,
    in float32, in that order (bitsandbytes' ``dequantize_blockwise`` followed
    by ``+= offset``, so the result is the same to the bit)."""
    if not isinstance(nested, NestedState):
        raise TypeError(f"double_dequantize needs a NestedState, got {type(nested).__name__}")
    if (not isinstance(absmax_indices, torch.Tensor) or absmax_indices.dtype != torch.uint8
            or absmax_indices.dim() != 1):
        raise ValueError(f"double_dequantize needs the 1-D uint8 indices returned by double_quantize, got "
                         f"{getattr(absmax_indices, 'dtype', type(absmax_indices).__name__)} of shape "
                         f"{tuple(getattr(absmax_indices, 'shape', ()))}")
    expected_blocks = -(-absmax_indices.numel() // nested.blocksize)
    if nested.absmax.numel() != expected_blocks:
        raise ValueError(f"{absmax_indices.numel()} indices in blocks of {nested.blocksize} need {expected_blocks} "
                         f"second-level absmax values, got {nested.absmax.numel()}")
    return dequantize_blockwise(absmax_indices, nested.absmax, nested.code, nested.blocksize) + nested.offset


# --------------------------------------------------------------------------- #
# Storage cost
# --------------------------------------------------------------------------- #
def storage_bytes(packed: torch.Tensor, state: QuantState, include_tables: bool = False) -> int:
    """Bytes a 4-bit tensor occupies, counted from the tensors themselves:
    the packed weights, the per-block constants (float32, or uint8 indices with
    double quantization) and, when double-quantized, the second-level float32
    absmax and the float32 offset. ``include_tables`` adds the code tables
    (16 float32 values, plus 256 for the dynamic map), which are the same for
    every tensor of a model and so are usually left out (as in the paper)."""
    if state.nested is None:
        tensors = [packed, state.absmax]
    else:
        tensors = [packed, state.absmax_indices, state.nested.absmax, state.nested.offset]
    if include_tables:
        tensors.append(state.code)
        if state.nested is not None:
            tensors.append(state.nested.code)
    return sum(t.numel() * t.element_size() for t in tensors)


def bits_per_parameter(packed: torch.Tensor, state: QuantState, include_tables: bool = False) -> float:
    """``8 * storage_bytes(...) / number of quantized elements``: 4.5 for NF4
    with blocks of 64, about 4.127 with double quantization (QLoRA Sec. 3)."""
    return 8 * storage_bytes(packed, state, include_tables) / state.numel


def expected_bits_per_parameter(blocksize: int = 64, double_quant: bool = False, nested_blocksize: int = 256) -> float:
    """The paper's arithmetic (ignoring partial blocks and the single offset):
    ``4 + 32/blocksize`` bits, or ``4 + 8/blocksize + 32/(blocksize * nested_blocksize)``."""
    if not double_quant:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * nested_blocksize)


# --------------------------------------------------------------------------- #
# Checks
# --------------------------------------------------------------------------- #
def _check_absmax(absmax: torch.Tensor) -> None:
    if not isinstance(absmax, torch.Tensor):
        raise TypeError(f"double_quantize needs a torch.Tensor of block constants, got {type(absmax).__name__}")
    if absmax.dim() != 1:
        raise ValueError(f"double_quantize needs the 1-D absmax of quantize_4bit (one value per block), got shape "
                         f"{tuple(absmax.shape)}; flatten it with absmax.reshape(-1)")
    if absmax.dtype != torch.float32:
        raise ValueError(f"double_quantize needs float32 block constants (quantize_4bit's absmax), got "
                         f"{str(absmax.dtype).removeprefix('torch.')}; convert with absmax.float()")
    if absmax.numel() == 0:
        raise ValueError("double_quantize got an empty absmax; there are no constants to quantize")
    if not torch.isfinite(absmax).all():
        raise ValueError("double_quantize got NaN or infinite block constants")


def _check_nested_blocksize(blocksize: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in NESTED_BLOCKSIZES:
        raise ValueError(f"the double-quantization block size must be a power of two from 64 to 4096 "
                         f"({', '.join(map(str, NESTED_BLOCKSIZES))}; QLoRA uses 256), got {blocksize!r}")


__all__ = [
    "NESTED_BLOCKSIZES", "NestedState", "bits_per_parameter", "double_dequantize", "double_quantize",
    "dynamic_map", "expected_bits_per_parameter", "storage_bytes",
]
