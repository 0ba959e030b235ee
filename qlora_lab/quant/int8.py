"""Absmax (symmetric) 8-bit integer quantization (chapter 01).

Chapter 01 has four parts, each built from the formulas of the seminar deck
and the papers; this module is the second and re-exports the first and the
last, so that ``int8.float_format`` and ``int8.int8_matmul`` read as the
notebook uses them:

* **Floating-point formats** (:mod:`qlora_lab.quant.floats`): the sign / exponent /
  mantissa layout of FP32, FP16 and BF16 and the ranges that follow from it.
* **Absmax quantization**, here (LLM.int8 paper, Dettmers et al. 2022,
  Sec. 2; the seminar's "Int8 Quantization" slides; QLoRA paper Eq. (1) for the
  block-wise form). The seminar's conventions are kept: the scale ``s``
  *multiplies* ``x``::

      s = (2^(b-1) - 1) / alpha         x_q = clip(round(s x))
      x_hat = x_q / s

  with ``alpha = max|x|``. ``round`` is :func:`torch.round`, which sends ties
  to the even integer. The scale is one number, one per slice along a
  dimension, given in advance (static quantization), or one per block of the
  flattened tensor, cut as :mod:`qlora_lab.quant.blockwise` does for the
  4-bit types.
* **Zero-point quantization** (:mod:`qlora_lab.quant.zeropoint`): the
  asymmetric variant with an integer shift, and a linear layer computed on
  zero-point operands. Not re-exported: import it as ``zeropoint``.
* **LLM.int8()** (:mod:`qlora_lab.quant.llm_int8`; Dettmers et al. 2022, Sec. 3): :func:`vectorwise_quantize`
  (one absmax scale per row, outlier columns held out) and :func:`int8_matmul`
  (int8 matmul of the inlier part plus a 16-bit matmul of the outlier columns).
  Both reproduce ``bitsandbytes`` bit for bit (see their docstrings for the
  precise statement and the library's quirks).
"""

from __future__ import annotations

import torch

from qlora_lab.quant import blockwise
# Chapter 01's first and last parts, importable from here as the notebook does:
from qlora_lab.quant.floats import (FloatFormat, check_bits, check_float_tensor, check_integer_tensor, check_scale,
                              float_bit_string, float_fields, float_format)
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
    bits = check_bits(bits, fn)
    s = check_scale(scale, fn)
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
    bits = check_bits(bits, fn)
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
    s = check_scale(scale, fn)
    return q.to(torch.float32) / s


def fake_quantize_absmax(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``absmax_dequantize(*absmax_quantize(x, bits))`` in the forward pass, identity in
    the backward pass (the straight-through estimator, Bengio et al. 2013): what
    quantization-aware training puts in front of each quantized weight."""
    q, s = absmax_quantize(x.detach(), bits)
    x_hat = absmax_dequantize(q, s).to(x.dtype)
    return x + (x_hat - x).detach()


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
    bits = check_bits(bits, fn)
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
    s = check_scale(scale, fn).reshape(-1, 1)
    return (blockwise.as_blocks(q.to(torch.float32), blocksize) / s).reshape(-1)[:n].reshape(q.shape)
