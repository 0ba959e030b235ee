"""Numbers in a computer, and 8-bit integer quantization (chapter 01).

Three layers, each built from the formulas of the seminar deck and the papers:

* **Floating-point formats** (:class:`FloatFormat`, :func:`float_format`,
  :func:`float_fields`, :func:`float_bit_string`): the sign / exponent /
  mantissa layout of FP32, FP16 and BF16 and the ranges that follow from it.
* **Absmax and zero-point quantization** (LLM.int8 paper, Dettmers et al. 2022,
  Sec. 2; the seminar's "Int8 Quantization" slides; QLoRA paper Eq. (1) for the
  block-wise form). The seminar's conventions are kept: the scale ``s``
  *multiplies* ``x``::

      absmax:     s = (2^(b-1) - 1) / alpha         x_q = clip(round(s x))
                  x_hat = x_q / s
      zero-point: s = (2^b - 1) / (alpha - beta)    z = -round(beta s) - 2^(b-1)
                  x_q = clip(round(s x + z))        x_hat = (x_q - z) / s

  with ``alpha = max|x|`` (absmax) or ``alpha = max x, beta = min x``
  (zero-point). ``round`` is :func:`torch.round`, which sends ties to the even
  integer.
* **LLM.int8()** (Dettmers et al. 2022, Sec. 3): :func:`vectorwise_quantize`
  (one absmax scale per row, outlier columns held out) and :func:`int8_matmul`
  (int8 matmul of the inlier part plus a 16-bit matmul of the outlier columns).
  Both reproduce ``bitsandbytes`` bit for bit (see their docstrings for the
  precise statement and the library's quirks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "FloatFormat",
    "float_format",
    "float_fields",
    "float_bit_string",
    "absmax_quantize",
    "absmax_quantize_with_scale",
    "absmax_dequantize",
    "zeropoint_quantize",
    "zeropoint_quantize_with_params",
    "zeropoint_dequantize",
    "zeropoint_linear",
    "blockwise_absmax_quantize",
    "blockwise_absmax_dequantize",
    "fake_quantize_absmax",
    "vectorwise_quantize",
    "vectorwise_dequantize",
    "int8_matmul",
    "int8_matmul_dequant",
    "INT8_DEQUANT_CONSTANT",
    "BNB_CPU_DEQUANT_CONSTANT",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: ``1 / 127**2`` as float32: turns an int32 sum of products of two int8
#: vectors, each scaled to [-127, 127], back into the product of the originals.
INT8_DEQUANT_CONSTANT = 1.0 / (127 * 127)
#: The constant bitsandbytes 0.50.2 uses in its pure-PyTorch (CPU) kernel
#: ``int8_mm_dequant`` (``backends/default/ops.py``): two digits are swapped
#: (the CUDA kernel has ``6.200012e-05``), so CPU results are 1.8e-5 too large.
BNB_CPU_DEQUANT_CONSTANT = 6.200124e-05


# --------------------------------------------------------------------------
# Floating-point formats
# --------------------------------------------------------------------------


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
# Input checks
# --------------------------------------------------------------------------


def _check_float_tensor(x: object, fn: str, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn} expects {name} to be a torch.Tensor, got {type(x).__name__}; wrap it with torch.tensor(...)")
    if x.dtype not in _FLOAT_DTYPES:
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


def _check_bits(bits: object, fn: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{fn} expects bits to be an int between 2 and 8, got {bits!r}")
    if not 2 <= bits <= 8:
        raise ValueError(f"{fn} supports 2 to 8 bits (results are stored as int8), got bits={bits}")
    return bits


def _check_dim(dim: object, x: torch.Tensor, fn: str) -> int | None:
    if dim is None:
        return None
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{fn} expects dim to be an int or None, got {dim!r}")
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"{fn}: dim={dim} is out of range for a tensor with {x.dim()} dimension(s) (shape {tuple(x.shape)}); "
            f"use dim=None for one scale for the whole tensor"
        )
    return dim % x.dim()


def _check_integer_tensor(q: object, fn: str) -> torch.Tensor:
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{fn} expects q to be a torch.Tensor, got {type(q).__name__}")
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise ValueError(f"{fn} expects the integer codes returned by the quantizer, got a {q.dtype} tensor")
    return q


def _as_scale(scale: object, fn: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    s = torch.as_tensor(scale, dtype=dtype)
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError(f"{fn} needs finite, positive scales; got {scale!r}")
    return s


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # float16/bfloat16/float32 are computed in float32, exactly as bitsandbytes does.
    return torch.promote_types(x.dtype, torch.float32)


# --------------------------------------------------------------------------
# Absmax (symmetric) quantization
# --------------------------------------------------------------------------


def absmax_quantize_with_scale(x: torch.Tensor, scale: torch.Tensor | float, bits: int = 8) -> torch.Tensor:
    """``clip(round(scale * x), -(2^(b-1) - 1), 2^(b-1) - 1)`` as int8, for a
    given ``scale`` (a number or a tensor broadcastable to ``x``). With a scale
    fixed in advance this is *static* quantization: values beyond the calibrated
    range ``(2^(b-1) - 1) / scale`` are clipped."""
    fn = "absmax_quantize_with_scale"
    x = _check_float_tensor(x, fn)
    bits = _check_bits(bits, fn)
    s = _as_scale(scale, fn)
    qmax = 2 ** (bits - 1) - 1
    return torch.round(x.to(_compute_dtype(x)) * s).clamp(-qmax, qmax).to(torch.int8)


def absmax_quantize(x: torch.Tensor, bits: int = 8, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric (absmax) quantization, the seminar's first int8 slide and LLM.int8 Sec. 2.1.

    ``alpha = max|x|`` (over the whole tensor, or along ``dim``), ``s = (2^(b-1) - 1) / alpha``,
    ``x_q = clip(round(s x))``. Returns ``(q, scale)``: ``q`` int8 of ``x``'s shape, and
    ``scale`` = ``s`` as float32, a 0-d tensor (``dim=None``) or of ``x``'s shape with size 1
    along ``dim`` (so ``q / scale`` broadcasts). A slice that is all zeros gets ``s = 1``
    (its codes are 0 whatever the scale). Dequantize with :func:`absmax_dequantize`.

    The error of every element is at most half a step, ``|x - x_hat| <= 0.5 / s`` (plus
    float32 rounding of ``s x``), since the largest ``|s x|`` is exactly ``2^(b-1) - 1``.
    """
    fn = "absmax_quantize"
    x = _check_float_tensor(x, fn)
    bits = _check_bits(bits, fn)
    dim = _check_dim(dim, x, fn)
    qmax = 2 ** (bits - 1) - 1
    absx = x.abs()
    alpha = absx.amax() if dim is None else absx.amax(dim=dim, keepdim=True)
    alpha = alpha.to(torch.float32)
    scale = torch.where(alpha > 0, qmax / alpha, torch.ones_like(alpha))
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(
            f"{fn}: max|x| is too small (below {qmax / torch.finfo(torch.float32).max:.3g}) for a float32 scale; "
            f"multiply x by a power of two first"
        )
    q = torch.round(x.to(_compute_dtype(x)) * scale).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


def absmax_dequantize(q: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``x_hat = q / s`` in float32 (the seminar's ``x_hat = (1/s) x_q``)."""
    fn = "absmax_dequantize"
    q = _check_integer_tensor(q, fn)
    s = _as_scale(scale, fn)
    return q.to(torch.float32) / s


def fake_quantize_absmax(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``absmax_dequantize(*absmax_quantize(x, bits))`` in the forward pass, identity in
    the backward pass (the straight-through estimator, Bengio et al. 2013): what
    quantization-aware training puts in front of each quantized weight."""
    q, s = absmax_quantize(x.detach(), bits)
    x_hat = absmax_dequantize(q, s).to(x.dtype)
    return x + (x_hat - x).detach()


# --------------------------------------------------------------------------
# Zero-point (asymmetric) quantization
# --------------------------------------------------------------------------


def _zeropoint_params(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    alpha = x.max().to(torch.float64)
    beta = x.min().to(torch.float64)
    if alpha == beta:
        # A constant tensor has no range; widen it to include 0 so that the constant
        # lands on a code exactly (all zeros: any scale does, take 1).
        alpha, beta = torch.clamp(alpha, min=0.0), torch.clamp(beta, max=0.0)
        if alpha == beta:
            return torch.tensor(1.0, dtype=torch.float64), torch.tensor(-(2 ** (bits - 1)), dtype=torch.int64)
    # tensor / tensor is correctly rounded (number / tensor goes through a reciprocal)
    scale = torch.tensor(2.0**bits - 1, dtype=torch.float64) / (alpha - beta)
    zero = -torch.round(beta * scale).to(torch.int64) - 2 ** (bits - 1)
    return scale, zero


def zeropoint_quantize_with_params(
    x: torch.Tensor, scale: torch.Tensor | float, zero: torch.Tensor | int, bits: int = 8
) -> torch.Tensor:
    """``clip(round(scale * x + zero), -2^(b-1), 2^(b-1) - 1)`` as int8 for a given
    scale and zero point (static quantization, and the output step of
    :func:`zeropoint_linear`). Computed in float64."""
    fn = "zeropoint_quantize_with_params"
    x = _check_float_tensor(x, fn)
    bits = _check_bits(bits, fn)
    s = _as_scale(scale, fn, torch.float64)
    z = torch.as_tensor(zero)
    if z.dtype.is_floating_point and not bool((z == torch.round(z)).all()):
        raise ValueError(f"{fn}: the zero point must be an integer, got {zero!r}")
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return torch.round(x.to(torch.float64) * s + z.to(torch.float64)).clamp(lo, hi).to(torch.int8)


def zeropoint_quantize(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric (zero-point) quantization, the seminar's second int8 slide and LLM.int8 Sec. 2.1.

    ``alpha = max x``, ``beta = min x``, ``s = (2^b - 1) / (alpha - beta)``,
    ``z = -round(beta s) - 2^(b-1)``, ``x_q = clip(round(s x + z), -2^(b-1), 2^(b-1) - 1)``.
    All ``2^b`` codes are used for ``[beta, alpha]``, whereas absmax wastes the
    codes of ``[-alpha, beta)`` when the data are one-sided.

    Returns ``(q, scale, zero)``: ``q`` int8, ``scale`` a float64 0-d tensor, ``zero`` an
    int64 0-d tensor. Scale and zero point are computed in float64 so that the
    formula holds even when ``[beta, alpha]`` is narrow and far from 0 (then ``z`` is
    far outside the int8 range, which is why it is int64). A constant tensor has
    its range widened to include 0. The error of every element is at most
    ``0.5 / s`` (clipping included: ``s alpha + z`` and ``s beta + z`` lie within half a
    step of the end codes).
    """
    fn = "zeropoint_quantize"
    x = _check_float_tensor(x, fn)
    bits = _check_bits(bits, fn)
    scale, zero = _zeropoint_params(x, bits)
    return zeropoint_quantize_with_params(x, scale, zero, bits), scale, zero


def zeropoint_dequantize(q: torch.Tensor, scale: torch.Tensor | float, zero: torch.Tensor | int) -> torch.Tensor:
    """``x_hat = (x_q - z) / s`` (computed in float64, returned as float32)."""
    fn = "zeropoint_dequantize"
    q = _check_integer_tensor(q, fn)
    s = _as_scale(scale, fn, torch.float64)
    return ((q.to(torch.float64) - torch.as_tensor(zero).to(torch.float64)) / s).to(torch.float32)


def zeropoint_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor | float,
    x_zero: torch.Tensor | int,
    w_q: torch.Tensor,
    w_scale: torch.Tensor | float,
    w_zero: torch.Tensor | int,
    y_scale: torch.Tensor | float,
    y_zero: torch.Tensor | int,
    b_q: torch.Tensor | None = None,
    b_scale: torch.Tensor | float | None = None,
    b_zero: torch.Tensor | int | None = None,
    bits: int = 8,
    round_output: bool = True,
) -> torch.Tensor:
    """``Y = X W + b`` computed on zero-point-quantized operands, with the seminar's identity
    ("Matrix Multiplication Quantization" slide), ``X`` of shape (n, p), ``W`` (p, m)::

        Y_q[i,j] = z_Y + s_Y / s_b (b_q[j] - z_b)
                   + s_Y / (s_X s_W) [ sum_k X_q[i,k] W_q[k,j] - z_W sum_k X_q[i,k]
                                       - z_X sum_k W_q[k,j] + p z_X z_W ]

    It follows from ``x = (x_q - z) / s`` for each operand and ``Y_q = s_Y Y + z_Y``: the
    bracket is exact integer arithmetic (an int32 accumulator in hardware; int64 here),
    and ``sum_k W_q[k,j]`` can be computed once per weight. Returns ``Y_q`` as int8
    (rounded and clipped to ``bits``), or with ``round_output=False`` the real-valued
    right-hand side before rounding, in float64.
    """
    fn = "zeropoint_linear"
    x_q = _check_integer_tensor(x_q, fn)
    w_q = _check_integer_tensor(w_q, fn)
    bits = _check_bits(bits, fn)
    if x_q.dim() != 2 or w_q.dim() != 2 or x_q.shape[1] != w_q.shape[0]:
        raise ValueError(
            f"{fn} computes X (n, p) @ W (p, m); got X of shape {tuple(x_q.shape)} and W of shape {tuple(w_q.shape)}"
        )
    s_x, s_w, s_y = (_as_scale(s, fn, torch.float64) for s in (x_scale, w_scale, y_scale))
    z_x, z_w, z_y = (torch.as_tensor(z).to(torch.int64) for z in (x_zero, w_zero, y_zero))
    p = x_q.shape[1]
    xq, wq = x_q.to(torch.int64), w_q.to(torch.int64)
    acc = (
        (xq.to(torch.float64) @ wq.to(torch.float64)).to(torch.int64)  # exact: |sums| << 2^53
        - z_w * xq.sum(dim=1, keepdim=True)
        - z_x * wq.sum(dim=0, keepdim=True)
        + p * z_x * z_w
    )
    y = z_y.to(torch.float64) + (s_y / (s_x * s_w)) * acc.to(torch.float64)
    if b_q is not None:
        if b_scale is None or b_zero is None:
            raise ValueError(f"{fn}: a quantized bias needs its b_scale and b_zero")
        b_q = _check_integer_tensor(b_q, fn)
        s_b = _as_scale(b_scale, fn, torch.float64)
        y = y + (s_y / s_b) * (b_q.to(torch.float64) - torch.as_tensor(b_zero).to(torch.float64))
    if not round_output:
        return y
    return torch.round(y).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).to(torch.int8)


# --------------------------------------------------------------------------
# Block-wise absmax (QLoRA Eq. (1), one scale per block of the flattened tensor)
# --------------------------------------------------------------------------


def blockwise_absmax_quantize(
    x: torch.Tensor, blocksize: int = 64, bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax quantization with one scale per contiguous block of ``blocksize``
    elements of the flattened tensor (QLoRA Sec. 2, "Block-wise k-bit
    Quantization"; the last block may be shorter). Returns ``q`` (int8, ``x``'s
    shape) and ``scale`` (float32, one ``s`` per block). A single outlier now
    only coarsens the step of its own block."""
    fn = "blockwise_absmax_quantize"
    x = _check_float_tensor(x, fn)
    bits = _check_bits(bits, fn)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"{fn}: blocksize must be a positive int, got {blocksize!r}")
    flat = x.reshape(-1)
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, blocksize)
    q, scale = absmax_quantize(blocks, bits, dim=1)
    return q.reshape(-1)[:n].reshape(x.shape), scale.reshape(-1)


def blockwise_absmax_dequantize(q: torch.Tensor, scale: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Inverse of :func:`blockwise_absmax_quantize`: ``q / s`` block by block, float32."""
    fn = "blockwise_absmax_dequantize"
    q = _check_integer_tensor(q, fn)
    n = q.numel()
    if scale.numel() != -(-n // blocksize):
        raise ValueError(
            f"{fn}: {n} codes in blocks of {blocksize} need {-(-n // blocksize)} scales, got {scale.numel()}; "
            f"pass the blocksize used to quantize"
        )
    s = _as_scale(scale, fn).reshape(-1).repeat_interleave(blocksize)[:n]
    return (q.reshape(-1).to(torch.float32) / s).reshape(q.shape)


# --------------------------------------------------------------------------
# LLM.int8(): vector-wise quantization with outlier decomposition
# --------------------------------------------------------------------------


def vectorwise_quantize(
    x: torch.Tensor, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row-wise absmax int8 with outlier columns held out: LLM.int8(), Dettmers et
    al. 2022, Sec. 3.1 (vector-wise quantization) and Sec. 3.2 (mixed-precision
    decomposition, threshold 6.0 in the paper). Mirrors
    ``bitsandbytes.functional.int8_vectorwise_quant``.

    ``x`` is seen as rows of its last dimension (``rows = numel / x.shape[-1]``).
    With ``threshold > 0`` every element with ``|x| >= threshold`` is an outlier and
    every column holding one is an *outlier column*. Then, as in bitsandbytes:

    1. the outlier elements (only they, not their whole columns) are left out of
       each row's absmax ``alpha_r``;
    2. ``q = round(x * (127 / alpha_r))`` with the outliers replaced by 0;
    3. every outlier column of ``q`` is set to 0 (those columns are computed in
       16 bits by :func:`int8_matmul`).

    Returns ``(q, row_stats, outlier_cols)``: ``q`` int8 of ``x``'s shape; ``row_stats``
    float32 of shape ``(rows,)`` holding ``alpha_r`` (the absmax, **not** the scale
    ``s = 127 / alpha_r`` that :func:`absmax_quantize` returns); ``outlier_cols`` the
    sorted int64 column indices, an empty tensor if ``threshold > 0`` found none,
    ``None`` if ``threshold == 0``. A row whose ``alpha_r`` is 0 gets codes 0.

    Unlike bitsandbytes' CPU kernel this never writes into ``x`` (the library zeroes
    the outliers of its input in place and restores them afterwards, which bumps
    the tensor's autograd version counter), and it handles tensors of any rank
    (the library's CPU kernel is correct for 2-D input only). ``threshold`` is
    compared with ``|x|`` in ``x``'s dtype, so it is rounded to that dtype first,
    as in the library.
    """
    fn = "vectorwise_quantize"
    x = _check_float_tensor(x, fn)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"{fn} expects threshold to be a number, got {threshold!r}")
    if math.isnan(threshold) or threshold < 0:
        raise ValueError(f"{fn}: threshold must be >= 0 (0 disables outlier decomposition), got {threshold}")
    if x.dim() == 0:
        raise ValueError(f"{fn} quantizes rows of the last dimension; got a 0-d tensor (use x.reshape(1, 1))")
    cols = x.shape[-1]
    x2 = x.reshape(-1, cols)
    outlier_cols = None
    if threshold > 0.0:
        outliers = x2.abs() >= threshold
        outlier_cols = torch.argwhere(outliers.any(dim=0)).view(-1)
        x2 = x2.masked_fill(outliers, 0)
    row_stats = x2.abs().amax(dim=1).float()
    scale = 127.0 / row_stats.unsqueeze(-1)
    q = torch.round(x2 * scale)
    q = torch.where(row_stats.unsqueeze(-1) > 0, q, torch.zeros_like(q)).to(torch.int8)
    if outlier_cols is not None and outlier_cols.numel():
        q[:, outlier_cols] = 0
    return q.reshape(x.shape), row_stats, outlier_cols


def vectorwise_dequantize(q: torch.Tensor, row_stats: torch.Tensor) -> torch.Tensor:
    """``q * alpha_r / 127`` row by row in float32; bit for bit what
    ``bitsandbytes.functional.int8_vectorwise_dequant`` computes (it multiplies by
    the float32 nearest to 1/127, as here)."""
    fn = "vectorwise_dequantize"
    q = _check_integer_tensor(q, fn)
    q2 = q.reshape(-1, q.shape[-1]) if q.dim() else q.reshape(1, 1)
    if row_stats.numel() != q2.shape[0]:
        raise ValueError(f"{fn}: {q2.shape[0]} rows need {q2.shape[0]} row_stats, got {row_stats.numel()}")
    return (q2 * row_stats.reshape(-1, 1).float() * (1.0 / 127)).reshape(q.shape)


def int8_matmul_dequant(
    acc: torch.Tensor,
    row_stats: torch.Tensor,
    col_stats: torch.Tensor,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    constant: float = INT8_DEQUANT_CONSTANT,
) -> torch.Tensor:
    """Turn the int32 products of two vector-wise quantized matrices back into real
    numbers: ``acc[i,j] * alpha_i * beta_j / 127^2`` (LLM.int8 Sec. 3.1, the outer
    product of the row and column normalization constants). The operations and
    their order are those of bitsandbytes' ``int8_mm_dequant`` CPU kernel; pass
    ``constant=BNB_CPU_DEQUANT_CONSTANT`` to reproduce it bit for bit, typo included."""
    if acc.dtype != torch.int32:
        raise ValueError(f"int8_matmul_dequant expects the int32 accumulator, got {acc.dtype}")
    out = acc.reshape(-1, acc.shape[-1]) * (row_stats.reshape(-1, 1) * col_stats.reshape(1, -1)) * constant
    if bias is not None:
        out += bias
    return out.to(dtype)


def int8_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    threshold: float = 0.0,
    bias: torch.Tensor | None = None,
    constant: float = INT8_DEQUANT_CONSTANT,
) -> torch.Tensor:
    """LLM.int8() matrix multiplication ``x @ w.T (+ bias)`` (Dettmers et al. 2022, Sec. 3.1 and 3.2,
    mixed-precision decomposition), ``w`` of shape (out_features, in_features) as in ``nn.Linear``:

    * ``x`` row-wise (one scale per token) and ``w`` row-wise (one per output feature)
      quantized with :func:`vectorwise_quantize`; ``x``'s outlier columns (``|x| >= threshold``)
      are zero in its int8 codes;
    * the int8 product is accumulated exactly in int32 and rescaled with
      :func:`int8_matmul_dequant`;
    * the outlier columns are multiplied in ``x``'s dtype: ``x[:, cols] @ w_hat[:, cols].T``
      with ``w_hat`` the dequantized int8 weight (only the int8 weight is stored).

    The result has ``x``'s dtype and shape ``(*x.shape[:-1], out_features)``. These are the
    steps of bitsandbytes' ``int8_mixed_scaled_mm`` / ``int8_scaled_mm`` kernels (what
    ``Linear8bitLt`` runs); with ``constant=BNB_CPU_DEQUANT_CONSTANT`` and ``x``, ``w`` in
    float16 the output equals bitsandbytes' bit for bit.
    """
    fn = "int8_matmul"
    x = _check_float_tensor(x, fn)
    w = _check_float_tensor(w, fn, "w")
    if x.dim() < 1 or w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"{fn} computes x (..., in) @ w.T with w of shape (out, in); got x {tuple(x.shape)}, w {tuple(w.shape)}"
        )
    x2 = x.reshape(-1, x.shape[-1])
    qx, sx, cols = vectorwise_quantize(x2, threshold)
    qw, sw, _ = vectorwise_quantize(w)
    # float64 holds every int32 sum exactly (|sum| <= in_features * 127^2 << 2^53).
    acc = (qx.to(torch.float64) @ qw.to(torch.float64).T).to(torch.int32)
    out = int8_matmul_dequant(acc, sx, sw, bias=bias, dtype=x.dtype, constant=constant)
    if cols is not None and cols.numel():
        w_hat_cols = vectorwise_dequantize(qw[:, cols].contiguous(), sw).to(x.dtype)
        out = out.addmm(x2[:, cols], w_hat_cols.t())
    return out.reshape(*x.shape[:-1], w.shape[0])
