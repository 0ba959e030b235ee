"""Zero-point (asymmetric) quantization, and a linear layer computed on it (chapter 01).

Absmax (:mod:`qlora_lab.quant.int8`) maps ``[-max|x|, max|x|]`` onto the
integer codes, so one-sided data (a ReLU's output) waste half of them.
Zero-point quantization maps ``[min x, max x]`` instead, with an integer
shift ``z``, the zero point (LLM.int8 paper, Dettmers et al. 2022, Sec. 2.1;
the seminar's "Int8 Quantization" slides). The seminar's conventions are kept:
the scale ``s`` *multiplies* ``x``::

    s = (2^b - 1) / (alpha - beta)    z = -round(beta s) - 2^(b-1)
    x_q = clip(round(s x + z))        x_hat = (x_q - z) / s

with ``alpha = max x`` and ``beta = min x``; ``round`` is :func:`torch.round`,
which sends ties to the even integer.

:func:`zeropoint_linear` then computes ``Y = X W + b`` on zero-point operands
without going back to floats: the seminar's "Matrix Multiplication
Quantization" identity, an integer sum with the zero points' corrections and
one rescale.
"""

from __future__ import annotations

import torch

from qlora_lab.quant.floats import check_bits, check_float_tensor, check_integer_tensor, check_scale

__all__ = ["zeropoint_dequantize", "zeropoint_linear", "zeropoint_quantize", "zeropoint_quantize_with_params"]


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
    bits = check_bits(bits, fn)
    s = check_scale(scale, fn, torch.float64)
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
    bits = check_bits(bits, fn)
    scale, zero = _zeropoint_params(x, bits)
    return zeropoint_quantize_with_params(x, scale, zero, bits), scale, zero


def zeropoint_dequantize(q: torch.Tensor, scale: torch.Tensor | float, zero: torch.Tensor | int) -> torch.Tensor:
    """``x_hat = (x_q - z) / s`` (computed in float64, returned as float32, saturating at float32's largest value)."""
    q = check_integer_tensor(q, "zeropoint_dequantize")
    s = check_scale(scale, "zeropoint_dequantize", torch.float64)
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
    bits = check_bits(bits, fn)
    if x_q.dim() != 2 or w_q.dim() != 2 or x_q.shape[1] != w_q.shape[0]:
        raise ValueError(
            f"{fn} computes X (n, p) @ W (p, m); got X of shape {tuple(x_q.shape)} and W of shape {tuple(w_q.shape)}"
        )
    s_x, s_w, s_y = (check_scale(s, fn, torch.float64) for s in (x_scale, w_scale, y_scale))
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
        s_b = check_scale(b_scale, fn, torch.float64)
        y = y + (s_y / s_b) * (b_q.to(torch.float64) - torch.as_tensor(b_zero).to(torch.float64))
    if not round_output:
        return y
    return torch.round(y).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).to(torch.int8)
