"""The data types as code tables: NF-k from quantiles of N(0, 1), FP4, Int4 (QLoRA, Sec. 3).

A k-bit data type is a table of ``2**k`` numbers in [-1, 1], its **code**; a
weight is stored as the k-bit **index** of the code value nearest to it, after
its block is scaled into [-1, 1] (:mod:`qlora_lab.quant.blockwise`). This
module builds the tables; :mod:`qlora_lab.quant.nf4` quantizes tensors with
the three 4-bit ones.

The three 4-bit data types
--------------------------
* **NF4** (:func:`normal_float_code`): the code holds quantiles of N(0, 1), so
  that every value is used equally often by normally distributed weights
  ("quantile quantization", QLoRA Sec. 3, Eq. (4)). bitsandbytes builds an
  asymmetric version with an exact zero; the paper's formula gives a symmetric
  one without zero. Both are built here, for k = 2 to 8 bits.
* **FP4** (:func:`fp4_code`): bitsandbytes' 4-bit float: 1 sign, 2 exponent and
  1 mantissa bit.
* **Int4** (:func:`int4_code`): evenly spaced integers -7..7, divided by 7.

:data:`CODES` holds the three, built once; :func:`code_for` hands out copies.
For comparisons at other bit widths, :func:`integer_code` and
:func:`float_code` build k-bit integer and minifloat tables;
:func:`fp4_e3m0_code` is the paper's second 4-bit float (3 exponent bits, no
mantissa; QLoRA Table 2), which bitsandbytes has no 4-bit kernels for.

Where bitsandbytes' tables disagree with themselves (0.50.2)
------------------------------------------------------------
* The FP4 code the kernels use has the subnormal 0.0625/12 = 0.0052, while
  ``create_fp8_map(signed=True, exponent_bits=2, precision_bits=1,
  total_bits=4)``, which its comments say regenerates it, gives 0.0208.
* ``get_4bit_type("int4")`` raises ``RuntimeError`` and ``quantize_4bit``
  accepts only ``"nf4"``/``"fp4"``: Int4 has nothing to compare with.
"""

from __future__ import annotations

import torch

#: bitsandbytes' offset for NF4: the outermost quantile is taken at this
#: probability instead of 1 (where the N(0, 1) quantile is infinite).
NF4_OFFSET = 0.9677083


def normal_float_offset(bits: int = 4) -> float:
    """The probability at which the outermost NF-k quantile is taken.

    The N(0, 1) quantiles at probabilities 0 and 1 are infinite, so the
    construction stops short of them. For k = 4 bitsandbytes uses
    0.9677083 and does not say why. The course's reconstruction (a rule that
    reproduces the constant, documented nowhere): it equals
    ``1 - (1/30 + 1/32) / 2`` rounded to 7 digits,
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


def fp4_e3m0_code() -> torch.Tensor:
    """The 4-bit float with 1 sign, 3 exponent and no mantissa bits (QLoRA
    Table 2, "FP4 (E3M0)"), sorted: :func:`float_code` ``(3, 0)``.

    With bias 3 the exponent fields 1..7 give the powers of two 1/4 .. 16; the
    field 0 is subnormal and, with no mantissa bit, holds only zero. Divided by
    16: 0 and plus or minus 1/64, 1/32, 1/16, 1/8, 1/4, 1/2, 1, i.e. 15 values
    (+0 and -0 merged), each twice the one below it. Equal to the distinct
    values of bitsandbytes' ``create_fp8_map(signed=True, exponent_bits=3,
    precision_bits=0, total_bits=4)``; bitsandbytes has no E3M0 type for
    ``quantize_4bit``, so it is quantized through
    :func:`qlora_lab.quant.blockwise.quantize_blockwise` with this table.
    """
    return float_code(3, 0)


def code_for(quant_type: str) -> torch.Tensor:
    """The 16-value code of ``"nf4"``, ``"fp4"`` or ``"int4"``, in index order (a copy)."""
    if quant_type not in CODES:
        raise ValueError(f"quant_type must be one of {', '.join(map(repr, CODES))}, got {quant_type!r}")
    return CODES[quant_type].clone()


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")


#: The three 4-bit codes, built once at import (``code_for`` hands out copies),
#: so that nothing is built while torch.compile traces quantize_4bit.
CODES = {"nf4": normal_float_code(4), "fp4": fp4_code(), "int4": int4_code()}

__all__ = ["CODES", "NF4_OFFSET", "code_for", "float_code", "fp4_code", "fp4_e3m0_code", "int4_code", "integer_code",
           "normal_float_code", "normal_float_offset"]
