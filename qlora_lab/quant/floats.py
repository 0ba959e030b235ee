"""Numbers in a computer: the bit layouts of FP32, FP16 and BF16 (chapter 01).

A binary floating-point number is 1 sign bit, ``e`` exponent bits and ``m``
mantissa bits (:class:`FloatFormat`); every range figure of a format (largest
value, smallest normal and subnormal, epsilon, decimal digits) follows from
the two bit counts. :func:`float_fields` and :func:`float_bit_string` read the
fields of stored numbers.

The module also holds the input checks that the quantizers of chapter 01
(:mod:`qlora_lab.quant.int8`, :mod:`qlora_lab.quant.zeropoint`, :mod:`qlora_lab.quant.llm_int8`)
share: quantization starts from a non-empty, finite float tensor, a bit width and positive
scales, and returns integer codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["FloatFormat", "check_bits", "check_float_tensor", "check_integer_tensor", "check_scale", "float_bit_string",
           "float_fields", "float_format"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)




@dataclass(frozen=True)
class FloatFormat:
    """An IEEE-754-style binary floating-point format: 1 sign bit, ``exponent_bits``
    of biased exponent and ``mantissa_bits`` of fraction (the leading 1 of a
    normal number is implicit). Every range figure is derived from the two bit
    counts; :func:`torch.finfo` agrees for FP32, FP16 and BF16."""

    name: str
    exponent_bits: int
    mantissa_bits: int

    @property
    def total_bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def bias(self) -> int:
        """Stored exponent minus bias is the power of two: ``2^(e-1) - 1``."""
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def max(self) -> float:
        """Largest finite value: exponent field all ones but one, mantissa all ones."""
        return (2.0 - 2.0 ** -self.mantissa_bits) * 2.0**self.bias

    @property
    def smallest_normal(self) -> float:
        """``2^(1 - bias)``: exponent field 1, mantissa 0 (``torch.finfo(...).tiny``)."""
        return 2.0 ** (1 - self.bias)

    @property
    def smallest_subnormal(self) -> float:
        """Exponent field 0, mantissa 1: ``2^(1 - bias - m)``."""
        return 2.0 ** (1 - self.bias - self.mantissa_bits)

    @property
    def eps(self) -> float:
        """Gap between 1 and the next representable number: ``2^-m``."""
        return 2.0 ** -self.mantissa_bits

    @property
    def decimal_digits(self) -> int:
        """Decimal digits every number keeps: ``floor(m log10 2)`` (``torch.finfo(...).resolution == 10^-digits``)."""
        return math.floor(self.mantissa_bits * math.log10(2))


_FORMATS = {
    torch.float32: FloatFormat("float32", 8, 23),
    torch.float16: FloatFormat("float16", 5, 10),
    torch.bfloat16: FloatFormat("bfloat16", 8, 7),
}
_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def float_format(dtype: torch.dtype) -> FloatFormat:
    """The bit layout of ``torch.float32``, ``torch.float16`` or ``torch.bfloat16``."""
    if dtype not in _FORMATS:
        raise ValueError(f"float_format knows float32, float16 and bfloat16, not {dtype}")
    return _FORMATS[dtype]


def float_fields(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The raw ``(sign, exponent, mantissa)`` bit fields of every element of a
    float32, float16 or bfloat16 tensor, as int64 tensors of ``x``'s shape.

    A normal number is ``(-1)^sign * 2^(exponent - bias) * (1 + mantissa / 2^m)``;
    a subnormal (exponent field 0) is ``(-1)^sign * 2^(1 - bias) * (mantissa / 2^m)``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"float_fields expects a torch.Tensor, got {type(x).__name__}")
    fmt = float_format(x.dtype)
    bits = x.contiguous().view(_SAME_WIDTH_INT[x.dtype]).to(torch.int64) & ((1 << fmt.total_bits) - 1)
    mantissa = bits & ((1 << fmt.mantissa_bits) - 1)
    exponent = (bits >> fmt.mantissa_bits) & ((1 << fmt.exponent_bits) - 1)
    sign = bits >> (fmt.total_bits - 1)
    return sign, exponent, mantissa


def float_bit_string(value: float | torch.Tensor, dtype: torch.dtype = torch.float32) -> str:
    """The bits of one number stored as ``dtype``, as ``"sign exponent mantissa"``,
    e.g. ``float_bit_string(1.0, torch.bfloat16) == "0 01111111 0000000"``."""
    fmt = float_format(dtype)
    t = value.to(dtype) if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=dtype)
    t = t.reshape(1)
    sign, exponent, mantissa = (int(f) for f in float_fields(t))
    return f"{sign} {exponent:0{fmt.exponent_bits}b} {mantissa:0{fmt.mantissa_bits}b}"


# --------------------------------------------------------------------------
# Input checks shared by the quantizers
# --------------------------------------------------------------------------


def check_float_tensor(x: object, fn: str, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn} expects {name} to be a torch.Tensor, got {type(x).__name__}; wrap it with torch.tensor(...)")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{fn} got a {str(x.dtype).removeprefix('torch.')} tensor; quantization starts from real numbers: "
            f"pass a float32, float16 or bfloat16 tensor ({name}.float())"
        )
    if x.numel() == 0:
        raise ValueError(f"{fn} got an empty tensor (shape {tuple(x.shape)}); there is nothing to quantize")
    if not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{fn} got {n_bad} NaN or infinite value(s); a scale cannot be computed from them: "
            f"clean the tensor first (e.g. torch.nan_to_num)"
        )
    return x


def check_integer_tensor(q: object, fn: str) -> torch.Tensor:
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{fn} expects q to be a torch.Tensor, got {type(q).__name__}")
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise ValueError(f"{fn} expects the integer codes returned by the quantizer, got a {q.dtype} tensor")
    return q


def check_bits(bits: object, fn: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{fn} expects bits to be an int between 2 and 8, got {bits!r}")
    if not 2 <= bits <= 8:
        raise ValueError(f"{fn} supports 2 to 8 bits (results are stored as int8), got bits={bits}")
    return bits


def check_scale(scale: object, fn: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale`` as a tensor of ``dtype``, after checking that every scale is finite and positive."""
    s = torch.as_tensor(scale, dtype=dtype)
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError(f"{fn} needs finite, positive scales; got {scale!r}")
    return s
