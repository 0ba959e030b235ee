"""What finetuning costs in memory, estimated and measured (chapter 03).

Read it in this order; each module is one idea:

1. :mod:`qlora_lab.memory.activations`: what autograd keeps for the backward
   pass of a Llama decoder layer, derived tensor by tensor.
2. :mod:`qlora_lab.memory.costs`: the five terms of a finetuning step
   (weights, adapters, gradients, optimizer, activations) for full 16-bit
   finetuning, LoRA and QLoRA, 135M to 65B parameters; :func:`estimate`.
3. :mod:`qlora_lab.memory.footprint`: what serving the finetuned model costs
   (weights, adapters, key/value cache): the memory QLoRA's Table 6 reports;
   :func:`deployment_footprint`.
4. :mod:`qlora_lab.memory.report`: the estimates as tables, set against the
   paper's numbers, and as a chart against 24, 48 and 80 GB GPUs.
5. :mod:`qlora_lab.memory.measured_step`: one real training step measured in
   a fresh process, the check of the estimate.

The estimate's public names are importable from ``qlora_lab.memory`` directly
(``memory.estimate("llama-65b", "qlora")``).
"""

from qlora_lab.memory.activations import GUANACO_LORA_R, METHODS
from qlora_lab.memory.costs import (
    GB,
    GPU_SIZES_GB,
    LLAMA_SIZES,
    OPTIMIZER_TEMPORARIES,
    PAPER_FULL16_65B_GB,
    MemoryEstimate,
    count_parameters,
    estimate,
    gpu_capacity_bytes,
    nf4_storage_bytes,
)
from qlora_lab.memory.footprint import PAPER_MEMORY_GB, PAPER_TABLE6, Footprint, deployment_footprint

__all__ = [
    "GB",
    "GPU_SIZES_GB",
    "GUANACO_LORA_R",
    "LLAMA_SIZES",
    "METHODS",
    "OPTIMIZER_TEMPORARIES",
    "PAPER_FULL16_65B_GB",
    "PAPER_MEMORY_GB",
    "PAPER_TABLE6",
    "Footprint",
    "MemoryEstimate",
    "count_parameters",
    "deployment_footprint",
    "estimate",
    "gpu_capacity_bytes",
    "nf4_storage_bytes",
]
