"""8-bit integer quantization (chapter 01).

Chapter 01 has three layers, each built from the formulas of the seminar deck
and the papers; this module is the middle one and re-exports the other two,
so that ``qlora_lab.quant.int8`` names the whole chapter:

* **Floating-point formats** (:mod:`qlora_lab.quant.floats`): the sign / exponent /
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
  Block-wise absmax cuts the tensor into blocks as :mod:`qlora_lab.quant.blockwise`
  does for the 4-bit types.
* **LLM.int8()** (:mod:`qlora_lab.quant.llm_int8`; Dettmers et al. 2022, Sec. 3): :func:`vectorwise_quantize`
  (one absmax scale per row, outlier columns held out) and :func:`int8_matmul`
  (int8 matmul of the inlier part plus a 16-bit matmul of the outlier columns).
  Both reproduce ``bitsandbytes`` bit for bit (see their docstrings for the
  precise statement and the library's quirks).
"""

from __future__ import annotations

import torch

from qlora_lab.quant import blockwise
# Chapter 01's other two parts, importable from here as the notebook does:
from qlora_lab.quant.floats import (FloatFormat, check_float_tensor, check_integer_tensor, float_bit_string, float_fields,
                              float_format)
from qlora_lab.quant.llm_int8 import (BNB_CPU_DEQUANT_CONSTANT, INT8_DEQUANT_CONSTANT, int8_matmul, int8_matmul_dequant,
                                vectorwise_dequantize, vectorwise_quantize)

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


# --------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------

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
    x = check_float_tensor(x, fn)
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
    x = check_float_tensor(x, fn)
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
    q = check_integer_tensor(q, fn)
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
    x = check_float_tensor(x, fn)
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
    x = check_float_tensor(x, fn)
    bits = _check_bits(bits, fn)
    scale, zero = _zeropoint_params(x, bits)
    return zeropoint_quantize_with_params(x, scale, zero, bits), scale, zero


def zeropoint_dequantize(q: torch.Tensor, scale: torch.Tensor | float, zero: torch.Tensor | int) -> torch.Tensor:
    """``x_hat = (x_q - z) / s`` (computed in float64, returned as float32, saturating at float32's largest value)."""
    q = check_integer_tensor(q, "zeropoint_dequantize")
    s = _as_scale(scale, "zeropoint_dequantize", torch.float64)
    largest = torch.finfo(torch.float32).max  # the end codes may lie half a step beyond x's range: no inf
    return ((q.to(torch.float64) - torch.as_tensor(zero).to(torch.float64)) / s).clamp(-largest, largest).float()


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
    x_q = check_integer_tensor(x_q, fn)
    w_q = check_integer_tensor(w_q, fn)
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
        b_q = check_integer_tensor(b_q, fn)
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
    x = check_float_tensor(x, fn)
    bits = _check_bits(bits, fn)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"{fn}: blocksize must be a positive int, got {blocksize!r}")
    q, scale = absmax_quantize(blockwise.as_blocks(x, blocksize), bits, dim=1)  # one row per block
    return q.reshape(-1)[: x.numel()].reshape(x.shape), scale.reshape(-1)


def blockwise_absmax_dequantize(q: torch.Tensor, scale: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Inverse of :func:`blockwise_absmax_quantize`: ``q / s`` block by block, float32."""
    fn = "blockwise_absmax_dequantize"
    q = check_integer_tensor(q, fn)
    n = q.numel()
    if scale.numel() != blockwise.number_of_blocks(n, blocksize):
        raise ValueError(
            f"{fn}: {n} codes in blocks of {blocksize} need {blockwise.number_of_blocks(n, blocksize)} scales, "
            f"got {scale.numel()}; pass the blocksize used to quantize"
        )
    s = _as_scale(scale, fn).reshape(-1, 1)
    return (blockwise.as_blocks(q.to(torch.float32), blocksize) / s).reshape(-1)[:n].reshape(q.shape)
