"""Block-wise 4-bit quantization with NF4, FP4 or Int4, in bitsandbytes' layout (QLoRA, Sec. 3).

:func:`quantize_4bit` turns a float tensor into 4-bit indices of one of the
three 4-bit codes of :mod:`qlora_lab.quant.codes` (``"nf4"``, ``"fp4"``,
``"int4"``) plus one absmax per block; :func:`dequantize_4bit` turns them back.

Block-wise quantization and packing
-----------------------------------
:mod:`qlora_lab.quant.blockwise` cuts the flattened tensor into blocks of
``blocksize`` values, divides each block by its absmax and finds the nearest
code value of every scaled value. Two 4-bit indices are then packed into one
byte: element ``2i`` in the high nibble, ``2i + 1`` in the low nibble, shape
``((n + 1) // 2, 1)``. Dequantization is a look-up in the code times the
block's absmax.

Bit for bit with bitsandbytes
-----------------------------
For ``"nf4"`` and ``"fp4"`` :func:`quantize_4bit` returns the same bytes and
absmax as ``bitsandbytes.functional.quantize_4bit`` on CPU (bitsandbytes
0.50.2, ``bitsandbytes/backends/default/ops.py``), and :func:`dequantize_4bit`
the same values as its ``dequantize_4bit``. That needs bitsandbytes' rules:

1. Scaling: full blocks are multiplied by the float32 reciprocal
   ``1 / absmax`` but the partial last block is *divided* by its absmax. The
   two differ by one rounding step for about one value in ten million, enough
   to move a value next to a threshold into the other bucket; neither rule is
   more right than the other. An absmax below 1e-38 is replaced by 1e-38.
2. Nearest code: thresholds at the float32 midpoints of neighbouring (sorted)
   code values; a value exactly on a threshold goes to the lower one.
3. Odd element counts: the missing last value is quantized as 0.0, so the
   final low nibble is the index of zero (7 for NF4), not 0.
4. The absmax *stored* for the partial last block is clamped to 1e-38, the one
   of full blocks is not: an all-zero block stores 0 when it is full and
   1e-38 when it is the last, partial one (the values are 0 either way).

Inconsistencies of bitsandbytes (0.50.2) found while matching it
-----------------------------------------------------------------
* FP4 has a +0 (index 0) and a -0 (index 8). The CPU quantizer maps small
  *negative* values (down to -0.0026) to +0 and small *positive* values to -0,
  because it sorts the code with ``argsort`` and +0 comes first. Both
  dequantize to 0.0; we reproduce the bytes.
* The AVX-512 ``dequantize_4bit`` kernel assumes every row of the output
  starts a new block. When the last dimension is a multiple of 16 but not of
  the block size (576 columns, blocks of 128) and there is more than one row,
  it multiplies by the wrong absmax. :func:`dequantize_4bit` always uses the
  flattened-block definition (the one the quantizer uses).
* A 1-D tensor of even length comes back from the C kernel with shape
  ``(1, n)``, of odd length with ``(n,)``, of one or two elements transposed.
  Ours keeps the shape.

Speed
-----
The functions here are the definitions, written to be read (and traced by
``torch.compile``). The training path (:mod:`qlora_lab.qlora`) and fake quantization of
whole models (:mod:`qlora_lab.quant.fake_quant`) run :mod:`qlora_lab.fast.nf4`,
which returns the same bits faster;
``bench/quantize.py`` measures the three against bitsandbytes.
"""

from __future__ import annotations

import torch

from qlora_lab.quant import codes
from qlora_lab.quant import double_quant as dq
from qlora_lab.quant.blockwise import (QuantState, blockwise_absmax, code_thresholds, dequantize_blockwise, nearest_code,
                                 quantize_blockwise, scale_blocks)

#: The ``quant_type`` values :func:`quantize_4bit` takes: the 4-bit codes of :data:`codes.CODES`.
QUANT_TYPES = tuple(codes.CODES)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- #
# 4-bit quantization
# --------------------------------------------------------------------------- #
def absmax_4bit(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The absmax of every block as bitsandbytes stores it: that of a partial
    last block clamped to 1e-38 (rule 4 of the module docstring)."""
    absmax = blockwise_absmax(x, blocksize)
    if x.numel() % blocksize:
        absmax[-1] = absmax[-1].clamp(min=1e-38)
    return absmax


def pack_nibbles(indices: torch.Tensor) -> torch.Tensor:
    """Two 4-bit indices per byte: element ``2i`` in the high nibble, ``2i + 1``
    in the low one; shape ``(n // 2, 1)`` (``n`` must be even)."""
    if indices.numel() % 2:
        raise ValueError(f"pack_nibbles needs an even number of indices, got {indices.numel()}; pad first")
    flat = indices.reshape(-1)
    return (flat[0::2] << 4 | flat[1::2]).unsqueeze(1)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit indices of a packed tensor, high nibble first (uint8, 1-D)."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)


def pad_to_even(indices: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """An odd number of indices gets one more: the index of 0.0 (rule 3)."""
    if indices.numel() % 2 == 0:
        return indices
    return torch.cat([indices, nearest_code(torch.zeros(1, device=indices.device), code)])


def quantize_4bit(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = False) -> tuple[torch.Tensor, QuantState]:
    """Block-wise 4-bit quantization (QLoRA Sec. 3): ``(packed, state)``.

    ``x``: a float32, float16 or bfloat16 tensor (finite, not empty).
    ``blocksize``: 32 .. 4096, a power of two (QLoRA uses 64).
    ``quant_type``: ``"nf4"``, ``"fp4"`` or ``"int4"``.
    ``double_quant``: also quantize the absmax constants
    (:func:`qlora_lab.quant.double_quant.double_quantize`, QLoRA's "Double
    Quantization").

    ``packed`` is uint8 of shape ``((n + 1) // 2, 1)``. For nf4 and fp4 the
    bytes and absmax equal bitsandbytes' ``quantize_4bit`` on CPU exactly.
    """
    check_quantize_4bit_arguments(x, blocksize, quant_type, double_quant)
    x = x.detach()
    code = codes.CODES[quant_type].to(x.device)
    absmax = absmax_4bit(x, blocksize)
    _check_finite(absmax, "quantize_4bit")
    indices = nearest_code(scale_blocks(x, absmax, blocksize, divide_partial_block=True), code)
    return pack_nibbles(pad_to_even(indices, code)), make_state(x, absmax, blocksize, quant_type, double_quant)


def make_state(x: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
               double_quant: bool) -> QuantState:
    """The :class:`QuantState` of ``x`` quantized with ``absmax``; with
    ``double_quant`` the absmax are quantized again (blocks of 256)."""
    code = codes.CODES[quant_type].to(x.device, copy=True)
    if not double_quant:
        return QuantState(x.shape, x.dtype, blocksize, quant_type, code, absmax=absmax)
    absmax_indices, nested = dq.double_quantize(absmax)
    return QuantState(x.shape, x.dtype, blocksize, quant_type, code, absmax_indices=absmax_indices, nested=nested)


def dequantize_4bit(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """The tensor that ``packed`` and ``state`` stand for: each 4-bit index
    looked up in ``state.code``, times its block's absmax (in float32), then
    rounded to ``state.dtype`` and reshaped to ``state.shape``."""
    check_dequantize_4bit_arguments(packed, state)
    indices = unpack_nibbles(packed)[: state.numel]
    return dequantize_blockwise(indices, state.block_absmax(), state.code, state.blocksize, state.shape, state.dtype)


# --------------------------------------------------------------------------- #
# Argument checks
# --------------------------------------------------------------------------- #
def check_quantize_4bit_arguments(x: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool) -> None:
    """ValueError/TypeError for anything :func:`quantize_4bit` cannot take."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize_4bit needs a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"quantize_4bit got a {str(x.dtype).removeprefix('torch.')} tensor; pass a float32, "
                         f"float16 or bfloat16 tensor (x.float())")
    if x.numel() == 0:
        raise ValueError(f"quantize_4bit got an empty tensor (shape {tuple(x.shape)}); there is nothing to quantize")
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")


def check_dequantize_4bit_arguments(packed: torch.Tensor, state: QuantState) -> None:
    """ValueError/TypeError when ``packed`` and ``state`` do not fit together."""
    if not isinstance(state, QuantState):
        raise TypeError(f"dequantize_4bit needs a qlora_lab.quant.nf4.QuantState, got {type(state).__name__}; "
                        f"convert a bitsandbytes state with QuantState.from_bnb(state)")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError(f"dequantize_4bit needs the packed uint8 tensor returned by quantize_4bit, got "
                         f"{getattr(packed, 'dtype', type(packed).__name__)}")
    check_blocksize(state.blocksize)
    check_quant_type(state.quant_type)
    if state.dtype not in FLOAT_DTYPES:
        raise ValueError(f"state.dtype must be float32, float16 or bfloat16, got {state.dtype}")
    n = state.numel
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"a tensor of shape {tuple(state.shape)} ({n} elements) packs into {(n + 1) // 2} bytes, "
                         f"but packed has {packed.numel()}")
    constants = state.absmax if state.nested is None else state.absmax_indices
    if constants.numel() != -(-n // state.blocksize):
        raise ValueError(f"{n} elements in blocks of {state.blocksize} need {-(-n // state.blocksize)} absmax "
                         f"values, got {constants.numel()}")


def check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {', '.join(map(repr, QUANT_TYPES))}, got {quant_type!r}")


def check_blocksize(blocksize: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))} (powers of two, as in "
                         f"bitsandbytes), got {blocksize!r}")


def _check_finite(absmax: torch.Tensor, name: str) -> None:
    # A NaN or an infinity anywhere in a block makes that block's absmax NaN or inf.
    message = (f"{name} got a tensor containing NaN or infinity; quantization needs finite values "
               f"(find them with torch.isfinite(x))")
    if torch.compiler.is_compiling():  # a branch on a tensor's value cannot be traced: check when it runs
        torch._assert_async(torch.isfinite(absmax).all(), message)
    elif not torch.isfinite(absmax).all():
        raise ValueError(message)


__all__ = [
    "BLOCKSIZES", "FLOAT_DTYPES", "QUANT_TYPES", "QuantState", "absmax_4bit", "blockwise_absmax", "check_blocksize",
    "check_dequantize_4bit_arguments", "check_quantize_4bit_arguments", "check_quant_type", "code_thresholds",
    "dequantize_4bit", "dequantize_blockwise", "make_state", "nearest_code", "pack_nibbles", "pad_to_even",
    "quantize_4bit", "quantize_blockwise", "scale_blocks", "unpack_nibbles",
]
