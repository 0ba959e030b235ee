"""Fake quantization of a whole model (chapters 02 and 03).

To compare data types on a real model, chapter 02 replaces every linear
weight by its quantized-then-dequantized value and measures the perplexity.
The model still stores and computes in its float dtype, but every weight now
holds only values the data type can represent, so its outputs are those of
the quantized model (QLoRA's layer, chapter 05, dequantizes the same values on
the fly instead).

SmolLM2 has 106 million such weights and the chapter quantizes them six times,
so this runs the fast path, whose results ``tests/fast/test_fast.py`` proves equal
to the definitions: :mod:`qlora_lab.fast.nf4` for the 4-bit types, and for any
other code the definition of :mod:`qlora_lab.quant.blockwise` with the nearest code
found by :class:`qlora_lab.fast.nearest.NearestCodeTable`.
"""

from __future__ import annotations

import torch

from qlora_lab.fast import nf4 as fast_nf4
from qlora_lab.fast.nearest import nearest_code_table
from qlora_lab.quant import blockwise, nf4

__all__ = ["fake_quantize_linear_layers", "round_trip"]


def round_trip(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False,
               code: torch.Tensor | None = None) -> torch.Tensor:
    """``w`` quantized and dequantized: equal to
    ``nf4.dequantize_4bit(*nf4.quantize_4bit(w, blocksize, quant_type, double_quant))``,
    or with ``code``, to ``blockwise.dequantize_blockwise(*blockwise.quantize_blockwise(w, code, blocksize), ...)``."""
    if code is None:
        return fast_nf4.dequantize_4bit(*fast_nf4.quantize_4bit(w, blocksize, quant_type, double_quant))
    absmax = blockwise.blockwise_absmax(w, blocksize)
    indices = nearest_code_table(code)(blockwise.scale_blocks(w, absmax, blocksize))
    return blockwise.dequantize_blockwise(indices, absmax, code, blocksize, w.shape, w.dtype)


@torch.no_grad()
def fake_quantize_linear_layers(model: torch.nn.Module, quant_type: str = "nf4", blocksize: int = 64,
                                double_quant: bool = False, code: torch.Tensor | None = None,
                                skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace the weight of every ``nn.Linear`` of ``model`` (in place) by
    :func:`round_trip` of it: the 4-bit ``quant_type`` or, with ``code`` (any
    table, e.g. ``codes.normal_float_code(3)`` of :mod:`qlora_lab.quant.codes`), block-wise quantization to that
    code (``quant_type`` is then ignored). Layers whose qualified name ends with
    an entry of ``skip`` are left alone (the output layer, tied to the
    embeddings in SmolLM2; QLoRA keeps it in 16 bits too). Returns the number of
    weights replaced."""
    if code is None:
        nf4.check_quant_type(quant_type)
        nf4.check_blocksize(blocksize)
    weights = [module.weight for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and not any(name.endswith(s) for s in skip)]
    for weight in weights:
        weight.data.copy_(round_trip(weight.detach(), quant_type, blocksize, double_quant, code))
    return len(weights)
