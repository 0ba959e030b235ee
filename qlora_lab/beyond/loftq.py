"""LoftQ: an adapter that starts where the quantization error is (appendix, chapter 09).

LoftQ (Li et al., 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization") notices
that QLoRA starts from ``Q(W) + 0``, not from ``W``: the adapter starts at
zero, so the model begins training with the whole quantization error.
LoftQ instead picks the 4-bit weight and the adapter together, alternating::

    Q_t = NF4(W - B_{t-1} A_{t-1});   B_t A_t = best rank-r approximation of W - Q_t

so that ``Q + B A`` is closer to ``W`` than ``Q(W)`` is. :func:`loftq_init`
runs that with the course's NF4 (peft's ``loftq_init`` does the same with
bitsandbytes, on a GPU only) and :func:`initialisation_error` measures it.
"""

from __future__ import annotations

import math

import torch

from qlora_lab.quant.nf4 import QuantState, dequantize_4bit, quantize_4bit

__all__ = ["initialisation_error", "loftq_init"]


def _rank_r(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B A`` the best rank-``r`` approximation of ``matrix``
    (truncated SVD; the singular values split evenly between the factors)."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r]


@torch.no_grad()
def loftq_init(weight: torch.Tensor, r: int, num_iter: int = 5, blocksize: int = 64,
               double_quant: bool = True) -> tuple[torch.Tensor, QuantState, torch.Tensor, torch.Tensor]:
    """LoftQ's alternating initialisation (Li et al., 2023, Algorithm 1) with
    NF4: ``(packed, state, A, B)`` such that ``dequant(packed) + B A`` is
    close to ``weight``. ``A`` is ``r x in``, ``B`` is ``out x r``; a LoRA
    layer with scaling ``s`` stores ``B / s`` as its ``lora_B``."""
    if weight.dim() != 2:
        raise ValueError(f"loftq_init needs a 2-D weight, got shape {tuple(weight.shape)}")
    if not isinstance(r, int) or not 1 <= r <= min(weight.shape):
        raise ValueError(f"r must be an integer in [1, {min(weight.shape)}], got {r!r}")
    if not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"num_iter must be a positive integer, got {num_iter!r}")
    weight = weight.float()
    low_rank = torch.zeros_like(weight)
    for _ in range(num_iter):
        packed, state = quantize_4bit(weight - low_rank, blocksize=blocksize, double_quant=double_quant)
        B, A = _rank_r(weight - dequantize_4bit(packed, state), r)
        low_rank = B @ A
    return packed, state, A, B


@torch.no_grad()
def initialisation_error(weight: torch.Tensor, r: int, num_iter: int = 5) -> dict[str, float]:
    """Relative Frobenius error ``||W - (Q + B A)|| / ||W||`` of QLoRA's start
    (``Q = NF4(W)``, ``B A = 0``) and of LoftQ's after ``num_iter`` rounds."""
    weight = weight.float()
    packed, state = quantize_4bit(weight, double_quant=True)
    norm = weight.norm().item()
    qlora = (weight - dequantize_4bit(packed, state)).norm().item() / norm
    packed, state, A, B = loftq_init(weight, r, num_iter)
    loftq = (weight - dequantize_4bit(packed, state) - B @ A).norm().item() / norm
    return {"qlora_zero_init": qlora, "loftq": loftq, "reduction": 1 - loftq / qlora,
            "rank": r, "iterations": num_iter, "numel": math.prod(weight.shape)}
