"""LLM.int8(): vector-wise int8 with outlier decomposition (Dettmers et al. 2022, Sec. 3; chapter 01).

:func:`vectorwise_quantize` gives each row its own absmax scale and holds out
the outlier columns; :func:`int8_matmul` multiplies the inlier part in int8
(an exact int32 accumulation, then :func:`int8_matmul_dequant`) and the
outlier columns in 16 bits. Both reproduce ``bitsandbytes`` bit for bit (see
their docstrings for the precise statement and the library's quirks).
"""

from __future__ import annotations

import math

import torch

from qlora_lab.quant.floats import check_float_tensor, check_integer_tensor

__all__ = ["BNB_CPU_DEQUANT_CONSTANT", "INT8_DEQUANT_CONSTANT", "int8_matmul", "int8_matmul_dequant",
           "vectorwise_dequantize", "vectorwise_quantize"]

#: ``1 / 127**2`` as float32: turns an int32 sum of products of two int8
#: vectors, each scaled to [-127, 127], back into the product of the originals.
INT8_DEQUANT_CONSTANT = 1.0 / (127 * 127)
#: The constant bitsandbytes 0.50.2 uses in its pure-PyTorch (CPU) kernel
#: ``int8_mm_dequant`` (``backends/default/ops.py``): two digits are swapped
#: (the CUDA kernel has ``6.200012e-05``), so CPU results are 1.8e-5 too large.
BNB_CPU_DEQUANT_CONSTANT = 6.200124e-05


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
    x = check_float_tensor(x, fn)
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
    q = check_integer_tensor(q, fn)
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
    x = check_float_tensor(x, fn)
    w = check_float_tensor(w, fn, "w")
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
