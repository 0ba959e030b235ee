"""4-bit NormalFloat (NF4), FP4 and Int4: block-wise 4-bit quantization (QLoRA, Sec. 3).

The three 4-bit data types
--------------------------
A 4-bit data type is a table of 16 numbers in [-1, 1], its **code**; a weight
is stored as the 4-bit **index** of the code value nearest to it (after
scaling, see below).

* **NF4** (:func:`normal_float_code`): the code holds quantiles of N(0, 1), so
  that every value is used equally often by normally distributed weights
  ("quantile quantization", QLoRA Sec. 3, Eq. (4)). bitsandbytes builds an
  asymmetric version with an exact zero; the paper's formula gives a symmetric
  one without zero. Both are built here, for k = 2, 3 and 4 bits.
* **FP4** (:func:`fp4_code`): bitsandbytes' 4-bit float: 1 sign, 2 exponent and
  1 mantissa bit.
* **Int4** (:func:`int4_code`): evenly spaced integers -7..7, divided by 7.

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
* The FP4 code the kernels use has the subnormal 0.0625/12 = 0.0052, while
  ``create_fp8_map(signed=True, exponent_bits=2, precision_bits=1,
  total_bits=4)``, which its comments say regenerates it, gives 0.0208.
* ``get_4bit_type("int4")`` raises ``RuntimeError`` and ``quantize_4bit``
  accepts only ``"nf4"``/``"fp4"``: Int4 has nothing to compare with.
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

from qlora_lab.quant import double_quant as dq
from qlora_lab.quant.blockwise import (QuantState, blockwise_absmax, code_thresholds, dequantize_blockwise, nearest_code,
                                 quantize_blockwise, scale_blocks)

QUANT_TYPES = ("nf4", "fp4", "int4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: bitsandbytes' offset for NF4: the outermost quantile is taken at this
#: probability instead of 1 (where the N(0, 1) quantile is infinite).
NF4_OFFSET = 0.9677083


# --------------------------------------------------------------------------- #
# The data types
# --------------------------------------------------------------------------- #
def normal_float_offset(bits: int = 4) -> float:
    """The probability at which the outermost NF-k quantile is taken.

    The N(0, 1) quantiles at probabilities 0 and 1 are infinite, so the
    construction stops short of them. For k = 4 bitsandbytes uses
    0.9677083; that number is ``1 - (1/30 + 1/32) / 2`` rounded to 7 digits:
    the mean of ``1 - 1/(2*15)`` and ``1 - 1/(2*16)``, the centres of the last
    of 15 and of 16 equally likely bins. We use the same rule for every k,
    ``1 - (1/(2(2^k - 1)) + 1/2^(k+1)) / 2`` rounded to 7 digits, which gives
    exactly bitsandbytes' constant for k = 4.
    """
    _check_bits(bits)
    levels = 2**bits
    return round(1 - (1 / (2 * (levels - 1)) + 1 / (2 * levels)) / 2, 7)


def normal_float_code(bits: int = 4, symmetric: bool = False) -> torch.Tensor:
    """The NF-k data type: ``2**bits`` float32 values in [-1, 1], sorted.

    ``symmetric=False`` (the default, used by QLoRA and bitsandbytes): the
    asymmetric type with an exact zero (QLoRA Sec. 3, last paragraph). With
    ``half = 2**(bits-1)``: ``half`` positive quantiles of N(0, 1) at
    probabilities evenly spaced from the offset (:func:`normal_float_offset`)
    down to 0.5 (excluded), ``half - 1`` negative ones likewise, and 0;
    divided by the largest. For ``bits=4`` this is bitsandbytes' NF4 table
    (``create_normal_map()``) to the float32 bit: it is computed the same way
    (float32 probabilities from ``torch.linspace``, quantiles in float64,
    rounded to float32, divided by the maximum in float32).

    The quantile function Q of N(0, 1) is ``torch.special.ndtri`` in float64,
    the same function as ``scipy.stats.norm.ppf`` (the tests check that both
    give these codes to the bit), so quantizing needs no scipy at run time.

    ``symmetric=True``: the paper's Eq. (4),
    ``q_i = (Q(p_i) + Q(p_{i+1})) / 2`` for ``i = 0 .. 2**bits - 1``, each value
    the midpoint of two neighbouring quantiles of 2**bits + 1 evenly spaced
    probabilities. As printed, Eq. (4) takes ``p_i = i / (2**bits + 1)`` and so
    needs Q(0) = -inf; like bitsandbytes we put the outermost probabilities at
    ``1 - offset`` and ``offset`` instead. The result is symmetric around zero
    and has no value at zero, which is why QLoRA uses the asymmetric type.
    """
    _check_bits(bits)
    offset = normal_float_offset(bits)
    half = 2 ** (bits - 1)
    quantile = torch.special.ndtri  # Q, the inverse of the N(0, 1) distribution function
    if symmetric:
        probabilities = torch.linspace(1 - offset, offset, 2**bits + 1, dtype=torch.float64)
        quantiles = quantile(probabilities)
        midpoints = (quantiles[:-1] + quantiles[1:]) / 2
        return (midpoints / midpoints.abs().max()).to(torch.float32)
    positive = quantile(torch.linspace(offset, 0.5, half + 1)[:-1].double())
    negative = -quantile(torch.linspace(offset, 0.5, half)[:-1].double())
    values = torch.tensor([*positive.tolist(), 0.0, *negative.tolist()], dtype=torch.float32)
    values = values.sort().values
    return values / values.max()


def fp4_code() -> torch.Tensor:
    """bitsandbytes' FP4 data type: 16 float32 values in index order.

    The 4-bit index is ``s e1 e0 m`` (sign, two exponent bits, one mantissa
    bit). Exponent field ``e >= 1`` gives ``(1 + m/2) * 2**(4 - e)``, i.e.
    8, 12 (e=1), 4, 6 (e=2), 2, 3 (e=3); ``e = 0`` is subnormal: ``m / 16``,
    i.e. 0 and 0.0625. The sign bit negates (index 8 is -0). Divided by the
    largest magnitude, 12. Equal bit for bit to
    ``bitsandbytes.functional.get_4bit_type("fp4")``.
    """
    values = []
    for index in range(16):
        sign = -1.0 if index & 0b1000 else 1.0
        exponent = (index >> 1) & 0b11
        mantissa = index & 0b1
        magnitude = mantissa / 16 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (4 - exponent)
        values.append(sign * magnitude)
    code = torch.tensor(values, dtype=torch.float32)
    return code / code.abs().max()


def int4_code() -> torch.Tensor:
    """The Int4 data type: 16 float32 values in index order.

    Index ``i`` stores the 4-bit two's-complement integer ``k`` (0..7 for
    ``i`` = 0..7, -8..-1 for ``i`` = 8..15) and means ``k / 7``. Quantization
    is symmetric (absmax maps to 7, as int8 absmax maps to 127), so only
    -7..7 are ever produced; index 8 (-8/7, outside [-1, 1]) is never chosen.
    """
    integers = torch.tensor([i if i < 8 else i - 16 for i in range(16)], dtype=torch.float32)
    return integers / 7


def integer_code(bits: int) -> torch.Tensor:
    """The symmetric k-bit integer type, sorted: ``k / m`` for ``k = -m .. m``
    with ``m = 2**(bits-1) - 1`` (15 values for 4 bits, 7 for 3, 3 for 2)."""
    _check_bits(bits)
    largest = 2 ** (bits - 1) - 1
    return torch.arange(-largest, largest + 1, dtype=torch.float32) / largest


def float_code(exponent_bits: int, mantissa_bits: int) -> torch.Tensor:
    """A signed minifloat with ``1 + exponent_bits + mantissa_bits`` bits, sorted
    and divided by its largest value.

    IEEE-style: bias ``2**(exponent_bits-1) - 1``, exponent field 0 is
    subnormal (``m * 2**(1 - bias)``), no infinities or NaN, +0 and -0 merged.
    ``float_code(2, 1)`` is the E2M1 FP4 of the OCP microscaling formats
    (0, 0.5, 1, 1.5, 2, 3, 4, 6, over 6); ``float_code(2, 0)`` a 3-bit float
    (0, 1, 2, 4 over 4).
    """
    if exponent_bits < 1 or mantissa_bits < 0 or exponent_bits + mantissa_bits > 7:
        raise ValueError(
            f"float_code needs exponent_bits >= 1, mantissa_bits >= 0 and at most 7 bits besides the "
            f"sign; got exponent_bits={exponent_bits}, mantissa_bits={mantissa_bits}"
        )
    bias = 2 ** (exponent_bits - 1) - 1
    magnitudes = set()
    for exponent in range(2**exponent_bits):
        for mantissa in range(2**mantissa_bits):
            fraction = mantissa / 2**mantissa_bits
            if exponent == 0:
                magnitudes.add(fraction * 2.0 ** (1 - bias))
            else:
                magnitudes.add((1 + fraction) * 2.0 ** (exponent - bias))
    positive = sorted(magnitudes)
    values = torch.tensor([-m for m in reversed(positive[1:])] + positive, dtype=torch.float32)
    return values / values.max()


def code_for(quant_type: str) -> torch.Tensor:
    """The 16-value code of ``"nf4"``, ``"fp4"`` or ``"int4"``, in index order."""
    check_quant_type(quant_type)
    return CODES[quant_type].clone()


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
    code = CODES[quant_type].to(x.device)
    absmax = absmax_4bit(x, blocksize)
    _check_finite(absmax, "quantize_4bit")
    indices = nearest_code(scale_blocks(x, absmax, blocksize, divide_partial_block=True), code)
    return pack_nibbles(pad_to_even(indices, code)), make_state(x, absmax, blocksize, quant_type, double_quant)


def make_state(x: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
               double_quant: bool) -> QuantState:
    """The :class:`QuantState` of ``x`` quantized with ``absmax``; with
    ``double_quant`` the absmax are quantized again (blocks of 256)."""
    code = CODES[quant_type].to(x.device, copy=True)
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


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")


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


#: The three 4-bit codes, built once at import (``code_for`` hands out copies),
#: so that nothing is built while torch.compile traces quantize_4bit.
CODES = {"nf4": normal_float_code(4), "fp4": fp4_code(), "int4": int4_code()}

__all__ = [
    "CODES",
    "BLOCKSIZES", "FLOAT_DTYPES", "NF4_OFFSET", "QUANT_TYPES", "QuantState", "absmax_4bit", "blockwise_absmax",
    "check_blocksize", "check_dequantize_4bit_arguments", "check_quantize_4bit_arguments", "check_quant_type", "code_for", "code_thresholds",
    "dequantize_4bit", "dequantize_blockwise", "float_code", "fp4_code",
    "int4_code", "integer_code", "make_state", "nearest_code", "normal_float_code", "normal_float_offset",
    "pack_nibbles", "pad_to_even", "quantize_4bit", "quantize_blockwise", "scale_blocks", "unpack_nibbles",
]
