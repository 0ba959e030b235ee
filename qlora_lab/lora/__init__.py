"""Low-rank adapters (LoRA), the trainable half of QLoRA (chapter 04).

Read it in this order; each module is one idea:

1. :mod:`qlora_lab.lora.layer`: :class:`LoRALinear`, a frozen linear layer plus
   ``(alpha / r) B A x`` (LoRA, Sec. 4.1, Eq. (3); QLoRA, Sec. 2, Eq. (3)),
   bit for bit peft's ``lora.Linear``; merging the update into the weight.
2. :mod:`qlora_lab.lora.surgery`: :func:`add_lora` puts adapters on the layers
   ``target_modules`` names and freezes the rest (peft's ``get_peft_model``);
   :func:`merge_lora`, :func:`unmerge_lora`, :func:`trainable_parameters`.
3. :mod:`qlora_lab.lora.peft_format`: :func:`save_adapter` and
   :func:`load_adapter` in peft's file format, so that peft loads what we
   save and we load what peft saves.
4. :mod:`qlora_lab.lora.counting`: :func:`lora_parameter_count` from a
   config, without building the model (the seminar's GPT-3 example).
5. :mod:`qlora_lab.lora.subspace`: what rank LoRA needs and what its update
   does: subspace similarity and amplification of trained adapters (LoRA Sec. 7).
6. :mod:`qlora_lab.lora.ablation`: ablations on cached activations (the
   chapter's training loop, :func:`~qlora_lab.lora.ablation.fit`), and where
   the adapters go: q and v only or all linear layers (QLoRA Sec. 4, Figure 2).

The public names of 1-4 are importable from ``qlora_lab.lora`` directly;
the studies of 5 and 6 are imported as ``from qlora_lab.lora import subspace``
(or ``ablation``).
"""

from qlora_lab.lora.counting import linear_shapes, lora_parameter_count
from qlora_lab.lora.layer import LoRALinear
from qlora_lab.lora.peft_format import (
    ADAPTER_FILES,
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_state_dict,
    load_adapter,
    save_adapter,
)
from qlora_lab.lora.surgery import (
    ALL_LINEAR,
    TrainableParameters,
    add_lora,
    lora_modules,
    merge_lora,
    trainable_parameters,
    unmerge_lora,
)

__all__ = [
    "ADAPTER_FILES",
    "ALL_LINEAR",
    "CONFIG_NAME",
    "LoRALinear",
    "TrainableParameters",
    "WEIGHTS_NAME",
    "adapter_state_dict",
    "add_lora",
    "linear_shapes",
    "load_adapter",
    "lora_modules",
    "lora_parameter_count",
    "merge_lora",
    "save_adapter",
    "trainable_parameters",
    "unmerge_lora",
]
