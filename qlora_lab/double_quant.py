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
codes differ in about 0.15-0.2 % of places, and only where bitsandbytes does
not pick the nearest code: its CPU kernel rounds the scaled value to a uniform
grid of 65536 points on [-1, 1] (step 3.05e-5) and looks the code up from the
grid point. The dynamic map's codes near zero are 1e-7 to 1e-5 apart, so near
zero several codes share one grid cell and the kernel can land up to four codes
away; elsewhere it only errs for values within half a grid step of a midpoint.
We take the exact nearest code (ties to the lower one), so our error is never
larger. ``tests/test_double_quant.py`` reproduces bitsandbytes' codes exactly
with a model of that grid look-up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora_lab import nf4

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
# The nested state
# --------------------------------------------------------------------------- #
@dataclass
class NestedState:
    """Second-level state of double quantization: the mean ``offset`` (a 0-dim
    float32 tensor), one float32 ``absmax`` per block of ``blocksize`` codes,
    and the 8-bit ``code`` table (:func:`dynamic_map`). The 8-bit codes
    themselves are the ``absmax`` of the 4-bit :class:`qlora_lab.nf4.QuantState`,
    as in bitsandbytes."""

    absmax: torch.Tensor
    offset: torch.Tensor
    code: torch.Tensor
    blocksize: int = 256


def double_quantize(absmax: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, NestedState]:
    """Quantize the float32 block constants of a 4-bit tensor (QLoRA Sec. 3,
    "Double Quantization"): ``(codes, nested)``.

    ``offset = absmax.mean()``; the centred constants ``absmax - offset`` are cut
    into blocks of ``blocksize`` (the last block may be shorter), each block is
    divided by its own absolute maximum (multiplying by the float32 reciprocal,
    as bitsandbytes does) and every value becomes the index (uint8) of the
    *nearest* value of :func:`dynamic_map`, ties to the lower one. A block whose
    constants all equal the mean has absmax 0 and stores the code of 0.
    """
    _check_absmax(absmax)
    _check_nested_blocksize(blocksize)
    absmax = absmax.detach()
    offset = absmax.mean()
    centred = absmax - offset
    nested_absmax = _nested_block_absmax(centred, blocksize)
    scaled = _scale(centred, nested_absmax, blocksize)
    code = dynamic_map(signed=True).to(absmax.device)
    codes = nearest_code_exact(scaled, code)
    return codes, NestedState(absmax=nested_absmax, offset=offset, code=code, blocksize=blocksize)


def double_dequantize(codes: torch.Tensor, nested: NestedState) -> torch.Tensor:
    """The float32 block constants back: ``code[codes] * absmax[block] + offset``,
    in float32, in that order (bitsandbytes' ``dequantize_blockwise`` followed
    by ``+= offset``, so the result is the same to the bit)."""
    if not isinstance(nested, NestedState):
        raise TypeError(f"double_dequantize needs a NestedState, got {type(nested).__name__}")
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.dim() != 1:
        raise ValueError(f"double_dequantize needs the 1-D uint8 codes returned by double_quantize, got "
                         f"{getattr(codes, 'dtype', type(codes).__name__)} of shape "
                         f"{tuple(getattr(codes, 'shape', ()))}")
    expected_blocks = -(-codes.numel() // nested.blocksize)
    if nested.absmax.numel() != expected_blocks:
        raise ValueError(f"{codes.numel()} codes in blocks of {nested.blocksize} need {expected_blocks} second-level "
                         f"absmax values, got {nested.absmax.numel()}")
    values = nf4.dequantize_blockwise(codes, nested.absmax, nested.code, nested.blocksize)
    return values + nested.offset


def nearest_code_exact(values: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the entry of the sorted ``code`` nearest to each value,
    ties to the lower entry. Exact for float32 inputs: midpoints and
    comparisons in float64, where the sum of two float32 numbers and half of
    it are exact."""
    if code.numel() > 256 or not bool(torch.all(code[1:] >= code[:-1])):
        raise ValueError("nearest_code_exact needs a sorted code table of at most 256 values")
    code64 = code.double()
    midpoints = (code64[:-1] + code64[1:]) / 2
    return torch.bucketize(values.double(), midpoints).to(torch.uint8)


# --------------------------------------------------------------------------- #
# Storage cost
# --------------------------------------------------------------------------- #
def storage_bytes(packed: torch.Tensor, state: nf4.QuantState, include_tables: bool = False) -> int:
    """Bytes a 4-bit tensor occupies, counted from the tensors themselves:
    the packed weights, the per-block constants (float32, or uint8 codes with
    double quantization) and, when double-quantized, the second-level float32
    absmax and the float32 offset. ``include_tables`` adds the code tables
    (16 float32 values, plus 256 for the dynamic map), which are the same for
    every tensor of a model and so are usually left out (as in the paper)."""
    tensors = [packed, state.absmax]
    if state.nested is not None:
        tensors += [state.nested.absmax, state.nested.offset]
    if include_tables:
        tensors.append(state.code)
        if state.nested is not None:
            tensors.append(state.nested.code)
    return sum(t.numel() * t.element_size() for t in tensors)


def bits_per_parameter(packed: torch.Tensor, state: nf4.QuantState, include_tables: bool = False) -> float:
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
# Helpers and checks
# --------------------------------------------------------------------------- #
def _nested_block_absmax(values: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Absolute maximum of each block of 1-D ``values`` (the last block may be
    shorter; no clamping, as in bitsandbytes' C kernel)."""
    n = values.numel()
    full = n - n % blocksize
    blocks = values[:full].view(-1, blocksize)
    absmax = torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg_()).abs_()
    if full < n:
        absmax = torch.cat([absmax, values[full:].abs().max().reshape(1)])
    return absmax


def _scale(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values * (1 / absmax)`` per block in float32; a zero absmax leaves
    zeros (the reciprocal is taken of ``max(absmax, 1e-38)``)."""
    reciprocal = 1.0 / absmax.clamp(min=1e-38)
    per_value = reciprocal.repeat_interleave(blocksize)[: values.numel()]
    return values * per_value


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
    "dynamic_map", "expected_bits_per_parameter", "nearest_code_exact", "storage_bytes",
]
