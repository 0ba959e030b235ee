"""The Guanaco recipe: every setting of a QLoRA finetuning run (QLoRA, Sec. 5
and Appendix B), as one dataclass and two presets.

:class:`TrainConfig` holds what a run needs; :data:`GUANACO_7B` is the paper's
7B recipe, :data:`SMOLLM2_CPU` the same recipe scaled to SmolLM2-135M on two
CPU cores, and :func:`preset` returns a checked copy of either with overrides.
The LoRA settings use peft's ``LoraConfig`` names (``r``, ``lora_alpha``,
``lora_dropout``, ``target_modules``), the words of ``adapter_config.json``.
:mod:`qlora_lab.finetune.train` runs a config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from qlora_lab.support.resources import COURSE_DATASET_DIR

__all__ = ["GUANACO_7B", "PRESETS", "RENAMED_SETTINGS", "SMOLLM2_CPU", "TrainConfig", "preset", "renamed_hint"]


@dataclass
class TrainConfig:
    """Everything a finetuning run needs; the presets fill it in.

    ``method`` is ``"qlora"`` (4-bit base, QLoRA) or ``"lora16"`` (16-bit base:
    bfloat16 on CUDA, float32 on CPU; the paper's baseline). ``optimizer`` is
    ``"auto"`` (bitsandbytes ``paged_adamw_32bit`` on CUDA, ``adamw`` on CPU),
    ``"adamw"`` (torch), ``"paged_adamw"`` (``qlora_lab.paging.paged_adamw.PagedAdamW``) or
    ``"paged_adamw_32bit"`` (bitsandbytes; CUDA only). ``memory_config`` names a shipped
    config for the dry-run memory estimate when the model's own config cannot
    be read (a hub id on an offline machine). ``backend`` is ``"auto"``,
    ``"qlora_lab"`` or ``"bitsandbytes"`` (:mod:`qlora_lab.finetune.backends`).

    ``data`` is the course's data directory, a hub data set or a local file or
    directory in a hub schema; ``data_format`` names the schema (``"auto"``
    reads it from the columns; :mod:`qlora_lab.finetune.hub_data`).
    ``train_on`` is ``"assistant"`` (the loss on the replies only) or ``"all"``
    (the whole conversation, as Guanaco was trained). ``end_of_turn`` names the
    token that closes a reply when the chat template's own cannot be found
    (:func:`qlora_lab.finetune.chat_format.end_of_turn_id`).
    """

    model: str = "smollm2"
    data: str = str(COURSE_DATASET_DIR)
    data_format: str = "auto"
    train_on: str = "assistant"
    end_of_turn: str | None = None
    method: str = "qlora"
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str = "auto"
    r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    target_modules: str = "all-linear"
    max_length: int = 512
    group_by_length: bool = True
    batch_size: int = 1
    gradient_accumulation_steps: int = 16
    max_steps: int = 1875
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 0.3
    optimizer: str = "auto"
    gradient_checkpointing: bool = True
    seed: int = 0
    eval_every: int = 187
    eval_examples: int = 200
    eval_batch_size: int = 8
    score_examples: int = 0
    max_new_tokens: int = 32
    save_every: int = 500
    keep_checkpoints: int = 2
    requires_gpu: bool = False
    memory_config: str | None = None
    backend: str = "auto"

    def validate(self) -> None:
        """Clear errors for settings that cannot work."""
        if self.method not in ("qlora", "lora16"):
            raise ValueError(f"method must be 'qlora' or 'lora16', got {self.method!r}")
        if self.optimizer not in ("auto", "adamw", "paged_adamw", "paged_adamw_32bit"):
            raise ValueError(f"optimizer must be auto, adamw, paged_adamw or paged_adamw_32bit, got {self.optimizer!r}")
        if self.backend not in ("auto", "qlora_lab", "bitsandbytes"):
            raise ValueError(f"backend must be auto, qlora_lab or bitsandbytes, got {self.backend!r}")
        if self.compute_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"compute_dtype must be auto, float32, bfloat16 or float16, got {self.compute_dtype!r}")
        for name in ("r", "max_length", "batch_size", "gradient_accumulation_steps", "max_steps",
                     "eval_every", "save_every", "keep_checkpoints", "eval_batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_examples", "score_examples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be zero or positive, got {getattr(self, name)!r}")
        # Real-valued settings: finite (nan and inf are refused), in (0, inf), [0, inf) or [0, 1).
        for name, lowest, above in (("learning_rate", ">", math.inf), ("lora_alpha", ">", math.inf),
                                    ("max_grad_norm", ">", math.inf), ("weight_decay", ">=", math.inf),
                                    ("lora_dropout", ">=", 1), ("warmup_ratio", ">=", 1),
                                    ("adam_beta1", ">=", 1), ("adam_beta2", ">=", 1)):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or not (value > 0 if lowest == ">" else value >= 0) or not value < above):
                interval = ("(0, " if lowest == ">" else "[0, ") + ("1)" if above == 1 else "inf)")
                raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
        from qlora_lab.quant.nf4 import BLOCKSIZES, QUANT_TYPES

        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {', '.join(QUANT_TYPES)}, got {self.quant_type!r}")
        if isinstance(self.blocksize, bool) or self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {self.blocksize!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, got {self.seed!r}")
        for name in ("model", "data", "target_modules", "memory_config", "end_of_turn"):
            value = getattr(self, name)
            optional = name in ("memory_config", "end_of_turn")
            if not (value is None and optional) and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name} must be a non-empty string{' or none' if optional else ''}, got {value!r}")
        from qlora_lab.finetune.chat_format import TRAIN_ON
        from qlora_lab.finetune.hub_data import DATA_FORMATS

        if self.data_format not in ("auto", *DATA_FORMATS):
            raise ValueError(f"data_format must be auto or one of {', '.join(DATA_FORMATS)}, got {self.data_format!r}")
        if self.train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {self.train_on!r}")

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.warmup_ratio * self.max_steps)

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps


#: The Guanaco 7B recipe (the QLoRA repository's ``scripts/finetune_guanaco_7b.sh``
#: and COURSE.md): NF4 + double quantization, bf16 compute, LoRA r=64, alpha=16,
#: dropout 0.1 on all linear layers, paged AdamW 32-bit, lr 2e-4, constant
#: schedule after 3% warmup, max grad norm 0.3, effective batch 16 (the script
#: uses 4 x 4; 1 x 16 is the same batch with a quarter of the activation
#: memory), gradient checkpointing, group by length, 1875 steps. One
#: difference from the script: with transformers' ``constant`` schedule the
#: script's ``warmup_ratio`` is silently ignored (only ``constant_with_warmup``
#: warms up); we warm up, as the recipe intends.
GUANACO_7B = TrainConfig(
    model="huggyllama/llama-7b", method="qlora", compute_dtype="bfloat16", r=64, lora_alpha=16.0,
    lora_dropout=0.1, max_length=512, batch_size=1, gradient_accumulation_steps=16, max_steps=1875,
    learning_rate=2e-4, warmup_ratio=0.03, max_grad_norm=0.3, optimizer="paged_adamw_32bit",
    eval_every=187, save_every=500, requires_gpu=True, memory_config="llama-7b",
)

#: The same recipe scaled to SmolLM2-135M on two CPU cores: the same method,
#: data type, target layers, schedule shape and clipping; a smaller rank (16)
#: with alpha = 2r, a larger learning rate and batch, and far fewer steps, so
#: that a run fits in a few minutes. float32 compute: CPUs have no fast bf16.
SMOLLM2_CPU = TrainConfig(
    model="smollm2", method="qlora", compute_dtype="float32", r=16, lora_alpha=32.0, lora_dropout=0.05,
    max_length=128, batch_size=8, gradient_accumulation_steps=1, max_steps=150, learning_rate=1e-3,
    warmup_ratio=0.03, max_grad_norm=0.3, optimizer="adamw", gradient_checkpointing=False,
    eval_every=50, eval_examples=64, eval_batch_size=16, save_every=50, requires_gpu=False,
)

PRESETS: dict[str, TrainConfig] = {"llama-7b-gpu": GUANACO_7B, "smollm2-cpu": SMOLLM2_CPU}


#: Settings that had another name before; an old name gets a hint, not a silent alias.
RENAMED_SETTINGS = {"lora_r": "r"}


def renamed_hint(names) -> str:
    """`` (lora_r is now r, ...)`` for the old names among ``names``, else ``""``."""
    old = [f"{n} is now {RENAMED_SETTINGS[n]}" for n in sorted(names) if n in RENAMED_SETTINGS]
    return f" ({'; '.join(old)}: the LoRA settings use peft's LoraConfig names)" if old else ""


def preset(name: str, **overrides: Any) -> TrainConfig:
    """A copy of preset ``name`` with ``overrides`` applied (unknown keys are errors)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)}{renamed_hint(unknown)}; valid settings: "
                         f"{sorted(fields)}")
    config = dataclasses.replace(PRESETS[name], **overrides)
    config.validate()
    return config
