"""LoRA's scaled update added in one pass over the output.

The reference is the last line of peft's ``lora.Linear.forward``, which is
also how :class:`qlora_lab.lora.layer.LoRALinear` defines its output:
``result + update * scaling``,
two passes over an ``(tokens, out_features)`` tensor, a product then a sum,
each rounded. ``torch.add(result, update, alpha=scaling)`` makes one pass and
rounds once. The two agree bit for bit when the product ``update * scaling`` is
itself exact, which is the case when ``scaling`` is a power of two
(``alpha = r``, ``2 r`` or ``r / 4``, the usual choices): multiplying by a
power of two only changes the exponent. That holds for every product that is a
normal number; it fails only where a product leaves the normal range (below
1.2e-38 or above 3.4e38 in float32 and bfloat16, never reached by a LoRA
update, but below 6e-5 in float16, which is therefore left to the reference).
For any other ``scaling`` or dtype the reference runs.

What it gained, and under which conditions: ``bench/speed_choices.md``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["add_scaled_update", "fused_add_is_exact"]


def fused_add_is_exact(dtype: torch.dtype, scaling: float) -> bool:
    """Whether ``torch.add(result, update, alpha=scaling)`` rounds as
    ``result + update * scaling`` for an ``update`` of ``dtype`` (every
    product in the normal range, see the module docstring)."""
    return dtype in (torch.float32, torch.bfloat16, torch.float64) and math.frexp(scaling)[0] == 0.5


def add_scaled_update(result: torch.Tensor, update: torch.Tensor, scaling: float) -> torch.Tensor:
    """``result + update * scaling``, bit for bit, in one fused operation
    whenever that is exact (:func:`fused_add_is_exact`)."""
    if fused_add_is_exact(update.dtype, scaling):
        return torch.add(result, update, alpha=scaling)
    return result + update * scaling
