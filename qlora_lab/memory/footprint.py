"""What serving a finetuned model costs in memory: its weights, its adapters and
the key/value cache of its context (chapter 03).

The finetuning estimate (:func:`qlora_lab.memory.costs.estimate`) counts what a
training step holds; once training is over, what is left on the GPU is the
model, the adapters beside it, and the cache that generation fills. That is the
number QLoRA's Table 6 prints:

* Table 6, column "Memory" (:data:`PAPER_TABLE6`): 4-bit Guanaco 7B/13B/
  33B/65B 5/10/21/41 GB, 16-bit Vicuna 13B 26 GB and Open Assistant 33B
  66 GB. The column is the memory of the deployed model, not of its
  finetuning: the 16-bit rows are 2 bytes per parameter (a full finetune of
  13B cannot run in 26 GB), Sec. 5.3 calls the 7B figure a "5 GB footprint"
  that "easily fits on modern phones", and the paper's own 7B base model
  (5,048 MB) plus the r = 64 adapters with their gradients and Adam states
  (1.92 GB) exceed 5 GB. Compared like with like,
  :func:`deployment_footprint` (weights, adapters, key/value cache for the
  full 2048-token context at batch 1) is within 7% of all six rows
  (:func:`qlora_lab.memory.report.paper_comparison`). The peaks of a QLoRA
  finetuning step by :func:`qlora_lab.memory.costs.estimate` are
  5.8/10.2/23.3/44.1 GB: +16%, +2%, +11%, +7% above the column.

Every figure is in bytes; tables print decimal gigabytes (1 GB = 10^9 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qlora_lab.memory.activations import GUANACO_LORA_R
from qlora_lab.memory.costs import nf4_storage_bytes
from qlora_lab.support.checks import as_dtype, check_positive
from qlora_lab.support.model_config import count_parameters, model_name, model_shape, read_model_config

PAPER_MEMORY_GB = {"llama-7b": 5, "llama-13b": 10, "llama-33b": 21, "llama-65b": 41}
"""QLoRA, Table 6, column "Memory", for the 4-bit Guanaco models."""

PAPER_TABLE6 = (
    # (model in Table 6, shipped config, bits of its weights, Memory column in GB)
    ("Guanaco 65B", "llama-65b", 4, 41),
    ("Guanaco 33B", "llama-33b", 4, 21),
    ("Open Assistant 33B", "llama-33b", 16, 66),
    ("Vicuna 13B", "llama-13b", 16, 26),
    ("Guanaco 13B", "llama-13b", 4, 10),
    ("Guanaco 7B", "llama-7b", 4, 5),
)
"""Every row of QLoRA's Table 6 with a Memory entry. The 16-bit rows are full
finetunes of LLaMA (no adapters)."""


@dataclass(frozen=True)
class Footprint:
    """Memory to run a (finetuned) model for generation, in bytes."""

    model: str
    bits: int
    context: int
    batch: int
    weights: int
    adapters: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.kv_cache


def deployment_footprint(
    config: Any,
    bits: int = 4,
    lora_r: int | None = GUANACO_LORA_R,
    context: int | None = None,
    batch: int = 1,
    *,
    compute_dtype: torch.dtype | str = torch.bfloat16,
    adapter_dtype: torch.dtype | str = torch.bfloat16,
) -> Footprint:
    """Memory to serve a finetuned model: its weights (NF4 + double
    quantization when ``bits=4``, else 16 bits), its LoRA adapters (a 4-bit
    model keeps them beside the frozen weights: merging would need the 16-bit
    weights; ``lora_r=None`` for a fully finetuned model), and the key/value
    cache of ``context`` tokens (default: the config's
    ``max_position_embeddings``, 2048 for LLaMA) for ``batch`` sequences:
    ``2 x layers x kv_heads x head_dim x context x batch`` values in the
    compute dtype. Activations of the token being generated are negligible.
    """
    original = config
    config = read_model_config(config)
    shape = model_shape(config)
    if bits not in (4, 16):
        raise ValueError(f"bits must be 4 (NF4 + double quantization) or 16, got {bits!r}")
    if context is None:
        context = getattr(config, "max_position_embeddings", None)
        if context is None:
            raise ValueError("the config has no 'max_position_embeddings'; pass context=")
    check_positive("context", context)
    check_positive("batch", batch)
    counts = count_parameters(config)
    if bits == 4:
        weights = sum(nf4_storage_bytes(o * i) for o, i in counts.block_linear_shapes) + counts.other * 2
    else:
        weights = counts.total * 2
    adapters = 0
    if lora_r is not None:
        check_positive("lora_r", lora_r)
        adapters = counts.lora(lora_r) * as_dtype(adapter_dtype, "adapter_dtype").itemsize
    c = as_dtype(compute_dtype, "compute_dtype").itemsize
    kv_cache = 2 * shape.layers * shape.kv_dim * context * batch * c
    return Footprint(model=model_name(config, original), bits=bits, context=context, batch=batch,
                     weights=weights, adapters=adapters, kv_cache=kv_cache)
