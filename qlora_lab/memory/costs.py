"""What finetuning costs: a memory model for full 16-bit finetuning, 16-bit LoRA
and QLoRA, from SmolLM2 to LLaMA-65B, and a way to check it by measurement.

QLoRA's headline (Dettmers et al., 2023, Sec. 1) is a memory claim: "regular
16-bit finetuning of a LLaMA 65B parameter model requires more than 780 GB of
GPU memory", while QLoRA finetunes it "on a single 48GB GPU". This module
builds that account from first principles, one term at a time:

``weights``
    The frozen (or, for full finetuning, trained) model. ``full16`` and
    ``lora16`` store every parameter in 16 bits. ``qlora`` stores every linear
    layer of the transformer blocks in NF4 with double quantization (Sec. 3):
    4 bits per weight, one 8-bit constant per block of 64 and one fp32
    constant per 256 such blocks, ``4 + 8/64 + 32/(64*256) = 4.127`` bits
    per weight (counted exactly per tensor here, with the fp32 mean offset).
    Everything that is not a linear layer of a block (the embeddings, the
    ``lm_head``, the RMSNorm weights) stays in 16 bits: transformers' 4-bit
    loader leaves the output embedding and anything tied to it unquantized.
``adapters``
    LoRA on every linear layer of the blocks, not the ``lm_head`` (Sec. 4,
    "LoRA on all linear transformer block layers are required"; the released
    ``qlora.py`` builds its target list with ``find_all_linear_names``, which
    drops ``lm_head``), rank ``r = 64`` as in the Guanaco recipe. A linear
    layer of shape ``out x in`` gets ``r * (in + out)`` parameters. The
    paper stores them in BFloat16 (Eq. 5, ``L1^BF16 L2^BF16``; ``qlora.py``
    casts every ``LoraLayer`` to bfloat16 under ``--bf16``, which all the
    Guanaco scripts pass), so ``adapter_dtype`` defaults to bfloat16.
``gradients``
    One gradient per trainable parameter, in that parameter's dtype: every
    parameter for ``full16``, only the adapters for LoRA and QLoRA (the 4-bit
    weights get no gradient, Sec. 3).
``optimizer``
    Adam's two moments per trainable parameter. ``optimizer_state_bytes=8``
    is two 32-bit states: bitsandbytes' ``paged_adamw_32bit`` (the recipe's
    optimizer) keeps fp32 states even for bf16 parameters. Full 16-bit
    finetuning therefore costs ``2 + 2 + 8 = 12`` bytes per parameter before
    activations, and LLaMA-65B's 65.29e9 parameters come to 783 GB: the
    paper's "more than 780 GB". (PyTorch's own ``AdamW`` keeps its states in
    the parameter's dtype: pass ``optimizer_state_bytes=4`` for bf16
    parameters.) Paged optimizers move these states to CPU memory under a
    spike; they do not make them smaller, so they are counted in full.
``activations``
    What autograd saves for the backward pass, derived for a Llama decoder
    block (pre-RMSNorm, rotary attention with grouped query heads, SwiGLU
    MLP) and checked tensor by tensor against autograd in the tests; see
    :mod:`qlora_lab.memory.activations` for the derivation. With gradient
    checkpointing (the recipe's setting) only each layer's input is kept,
    plus one layer's activations while it is recomputed in the backward pass.

Every figure is in bytes; tables print decimal gigabytes (1 GB = 10^9 bytes).
The activation terms are derived in :mod:`qlora_lab.memory.activations`, the tables,
the chart and how these figures compare with the paper's are
:mod:`qlora_lab.memory.report`, and the measurement that checks the estimate is
:func:`qlora_lab.memory.measured_step.measure_training_step`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from qlora_lab.memory.activations import (FP32, GUANACO_LORA_R, METHODS, activation_breakdown, check_method,
                                          head_breakdown, rope_table_bytes)
from qlora_lab.support.checks import as_dtype, check_positive
from qlora_lab.support.model_config import count_parameters, model_name, model_shape, read_model_config

GB = 10**9

OPTIMIZER_TEMPORARIES = ("fused", "foreach", "per-tensor")
"""How much scratch memory the Adam step needs; see :func:`estimate`."""

LLAMA_SIZES = ("llama-7b", "llama-13b", "llama-33b", "llama-65b")

PAPER_FULL16_65B_GB = 780
"""QLoRA, Sec. 1: 16-bit finetuning of LLaMA-65B "requires more than 780 GB"."""

GPU_SIZES_GB = (24, 48, 80)
"""Consumer (24 GB), the paper's professional GPU (48 GB) and an A100/H100 (80 GB)."""


def gpu_capacity_bytes(size_gb: int) -> int:
    """Bytes in a GPU sold as ``size_gb`` GB: GPU memory comes in binary
    units (a "48 GB" card has 48 GiB, which nvidia-smi reports in MiB), so
    ``size_gb * 2**30``. Everything else here is in decimal GB."""
    return size_gb * 2**30


# --------------------------------------------------------------------------- #
# Storage of one NF4 + double-quantized tensor
# --------------------------------------------------------------------------- #
def nf4_storage_bytes(numel: int, blocksize: int = 64, double_quant: bool = True,
                      nested_blocksize: int = 256) -> int:
    """Bytes of a tensor of ``numel`` weights stored in 4 bits (QLoRA, Sec. 3).

    Two 4-bit codes per byte, plus one absmax per block of ``blocksize``:
    fp32 without double quantization (32/64 = 0.5 bit per weight), or with it
    an 8-bit code per block, one fp32 absmax per ``nested_blocksize`` blocks
    and one fp32 mean offset (8/64 + 32/(64*256) = 0.127 bit per weight).
    The 16-entry NF4 table and the 256-entry dynamic map are a few bytes per
    tensor and are not counted.
    """
    if numel <= 0:
        return 0
    blocks = math.ceil(numel / blocksize)
    packed = (numel + 1) // 2
    if not double_quant:
        return packed + blocks * FP32
    return packed + blocks + math.ceil(blocks / nested_blocksize) * FP32 + FP32


# --------------------------------------------------------------------------- #
# The estimate
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class MemoryEstimate:
    """Memory of finetuning one model with one method, in bytes."""

    model: str
    method: str
    seq_len: int
    batch: int
    gradient_checkpointing: bool
    lora_r: int | None
    parameters: int
    trainable_parameters: int
    weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    optimizer_temporaries: int = 0
    """Scratch memory of the optimizer step (see ``optimizer_temporaries`` in
    :func:`estimate`); not one of the five components, only in :attr:`peak`."""
    settings: dict = field(default_factory=dict, compare=False)

    COMPONENTS = ("weights", "adapters", "gradients", "optimizer", "activations")

    @property
    def total(self) -> int:
        """All five components added up: the height of a stacked bar of the breakdown."""
        return self.weights + self.adapters + self.gradients + self.optimizer + self.activations

    @property
    def peak(self) -> int:
        """The peak of a training step once the optimizer states exist.

        Backward frees each layer's activations as it produces that layer's
        gradients, so activations and gradients are never all alive at once.
        The step peaks either at the start of the backward pass (every
        activation, no gradient yet) or in the optimizer step (every
        gradient, plus the optimizer's scratch memory): ``weights + adapters
        + optimizer + max(activations, gradients + optimizer_temporaries)``.
        :func:`qlora_lab.memory.measured_step.measure_training_step` measures it."""
        return self.weights + self.adapters + self.optimizer + max(
            self.activations, self.gradients + self.optimizer_temporaries)

    def components(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.COMPONENTS}

    def table(self) -> str:
        """The breakdown as a small table in GB (10^9 bytes)."""
        ckpt = "on" if self.gradient_checkpointing else "off"
        lora = f", LoRA r={self.lora_r}" if self.lora_r else ""
        lines = [f"{self.model} / {self.method}{lora} (batch {self.batch} x {self.seq_len} tokens, "
                 f"gradient checkpointing {ckpt})"]
        for name, value in self.components().items():
            lines.append(f"  {name:<12}{value / GB:>9.2f} GB")
        lines.append(f"  {'total':<12}{self.total / GB:>9.2f} GB   (the five added up)")
        lines.append(f"  {'peak':<12}{self.peak / GB:>9.2f} GB   (a step's peak: activations and gradients "
                     f"are not all alive at once)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def as_dict(self) -> dict:
        out = asdict(self)
        out["total"] = self.total
        out["peak"] = self.peak
        return out


def estimate(
    config: Any,
    method: str,
    lora_r: int = GUANACO_LORA_R,
    seq_len: int = 512,
    batch: int = 1,
    gradient_checkpointing: bool = True,
    *,
    weight_dtype: torch.dtype | str = torch.bfloat16,
    compute_dtype: torch.dtype | str = torch.bfloat16,
    adapter_dtype: torch.dtype | str = torch.bfloat16,
    optimizer_state_bytes: int = 8,
    lora_dropout: float = 0.0,
    dropout_mask_bytes: int = 1,
    attention: str = "sdpa",
    optimizer_temporaries: str = "fused",
    blocksize: int = 64,
    double_quant: bool = True,
) -> MemoryEstimate:
    """Memory needed to finetune a causal LM with ``method`` on one GPU (one
    GPU's share under FSDP is chapter 09's
    :func:`qlora_lab.beyond.fits.estimate_per_gpu`).

    ``config`` is a transformers config, a dict, a path to a config JSON or
    model directory, or a shipped name (``"llama-7b"`` ... ``"llama-65b"``).
    ``method`` is ``"full16"`` (every weight trained, 16-bit weights and
    gradients), ``"lora16"`` (frozen 16-bit weights, LoRA on every block
    linear layer) or ``"qlora"`` (the same with NF4 + double-quantized
    weights, QLoRA Sec. 3). See the module docstring for every assumption.

    The defaults are the setting of the paper's memory breakdown (Fig. 6 in
    the appendix: batch size 1, sequence length 512) trained as the Guanaco
    recipe trains (gradient checkpointing, LoRA r = 64 on all linear layers,
    bf16 compute and adapters, 32-bit Adam states). ``weight_dtype`` is the
    storage of every 16-bit weight (and of the non-linear weights under
    QLoRA), ``compute_dtype`` that of the activations (QLoRA's "computation
    data type", Sec. 3), ``adapter_dtype`` that of the LoRA parameters and
    their gradients. ``attention`` picks the activation model of the
    attention (:data:`ATTENTION_KINDS`); ``lora_dropout`` > 0 adds the
    per-adapter dropout copies and masks (see
    :func:`qlora_lab.memory.activations.activation_breakdown`).

    ``optimizer_temporaries`` describes the scratch memory of the Adam step,
    which only :attr:`MemoryEstimate.peak` uses: ``"fused"`` (none: one
    kernel updates each tensor in place, as bitsandbytes' paged optimizers
    and ``torch.optim.AdamW(fused=True)`` do), ``"foreach"`` (PyTorch's
    default on GPUs: ``sqrt`` of every second moment at once, one state's
    worth of memory) or ``"per-tensor"`` (PyTorch's default on CPUs:
    ``exp_avg_sq.sqrt() / c`` makes two temporaries of the largest
    trainable tensor).
    """
    original = config
    config = read_model_config(config)
    shape = model_shape(config)
    method = check_method(method)
    for name, value in (("seq_len", seq_len), ("batch", batch), ("lora_r", lora_r), ("blocksize", blocksize),
                        ("optimizer_state_bytes", optimizer_state_bytes)):
        check_positive(name, value)
    if optimizer_temporaries not in OPTIMIZER_TEMPORARIES:
        raise ValueError(f"optimizer_temporaries must be one of {OPTIMIZER_TEMPORARIES}, "
                         f"got {optimizer_temporaries!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    w = as_dtype(weight_dtype, "weight_dtype").itemsize
    c = as_dtype(compute_dtype, "compute_dtype").itemsize
    a = as_dtype(adapter_dtype, "adapter_dtype").itemsize
    counts = count_parameters(config)

    if method == "qlora":
        weights = sum(nf4_storage_bytes(o * i, blocksize, double_quant) for o, i in counts.block_linear_shapes)
        weights += counts.other * w
    else:
        weights = counts.total * w
    if method == "full16":
        trainable, adapters, grad_bytes = counts.total, 0, w
    else:
        trainable = counts.lora(lora_r)
        adapters, grad_bytes = trainable * a, a
    gradients = trainable * grad_bytes
    optimizer = trainable * optimizer_state_bytes
    if optimizer_temporaries == "foreach":
        scratch = trainable * optimizer_state_bytes // 2
    elif optimizer_temporaries == "per-tensor":
        largest = counts.largest if method == "full16" else counts.largest_lora(lora_r)
        scratch = 2 * largest * grad_bytes
    else:
        scratch = 0

    per_layer = sum(activation_breakdown(
        config, method, seq_len=seq_len, lora_r=lora_r, compute_dtype=compute_dtype,
        adapter_dtype=adapter_dtype, lora_dropout=lora_dropout, dropout_mask_bytes=dropout_mask_bytes,
        attention=attention).values())
    head = sum(head_breakdown(config, method, compute_dtype=compute_dtype).values())
    if gradient_checkpointing:
        # Each layer's input is kept. The loss's buffers are gone before the
        # backward pass recomputes the first layer, so only the larger of the
        # two is alive on top of the kept inputs.
        per_token = shape.layers * c * shape.hidden + max(per_layer, head)
    else:
        per_token = shape.layers * per_layer + head
    activations = per_token * batch * seq_len + rope_table_bytes(config, seq_len, compute_dtype)

    return MemoryEstimate(
        model=model_name(config, original), method=method, seq_len=seq_len, batch=batch,
        gradient_checkpointing=gradient_checkpointing, lora_r=None if method == "full16" else lora_r,
        parameters=counts.total, trainable_parameters=trainable, weights=weights, adapters=adapters,
        gradients=gradients, optimizer=optimizer, activations=activations, optimizer_temporaries=scratch,
        settings={"weight_dtype": str(as_dtype(weight_dtype, "weight_dtype")),
                  "compute_dtype": str(as_dtype(compute_dtype, "compute_dtype")),
                  "adapter_dtype": str(as_dtype(adapter_dtype, "adapter_dtype")),
                  "optimizer_state_bytes": optimizer_state_bytes, "lora_dropout": lora_dropout,
                  "dropout_mask_bytes": dropout_mask_bytes, "attention": attention,
                  "optimizer_temporaries": optimizer_temporaries, "blocksize": blocksize, "double_quant": double_quant},
    )

