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
    :func:`activation_breakdown` for the derivation. With gradient
    checkpointing (the recipe's setting) only each layer's input is kept,
    plus one layer's activations while it is recomputed in the backward pass.

What the paper measured, and how this model compares
----------------------------------------------------
* Sec. 1: full 16-bit finetuning of LLaMA-65B needs "more than 780 GB". Here:
  12 bytes x 65.29e9 parameters + activations = 784 GB.
* Abstract and Sec. 4-5: QLoRA finetunes 65B "on a single 48GB GPU" and
  33B "on 24 GB consumer GPUs". Here, at the Figure 6 setting (batch 1,
  512 tokens, gradient checkpointing): 44.9 GB and 23.9 GB; GPUs are sized
  in binary units (:func:`gpu_capacity_bytes`): 51.5e9 and 25.8e9 bytes.
* Sec. 2, "Memory Requirement of Parameter-Efficient Finetuning", for
  LLaMA-7B: "the 4-bit base model consumes 5,048 MB", LoRA weights of 0.2%
  of the model "take up only 26 MB" (here: 13.5e6 parameters x 2 bytes =
  27 MB). The 4-bit base computed from the bits alone is 3,866 MB; the
  paper's figure is a measurement of its software stack in 2023 and includes
  more than the ideal storage (its 567 MB of "LoRA input gradients" at batch
  1, and 18 MB per sequence with gradient checkpointing, are given without
  a sequence length and could not be matched).
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
  (:func:`paper_comparison`). The finetuning totals of :func:`estimate` are
  6.1/10.6/23.9/44.9 GB: +22%, +6%, +14%, +10% above the column.

Every figure is in bytes; tables print decimal gigabytes (1 GB = 10^9 bytes).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

METHODS = ("full16", "lora16", "qlora")
"""The finetuning methods :func:`estimate` knows."""

OPTIMIZER_TEMPORARIES = ("fused", "foreach", "per-tensor")
"""How much scratch memory the Adam step needs; see :func:`estimate`."""

ATTENTION_KINDS = ("sdpa", "eager")
"""``sdpa``: a fused kernel (flash / memory-efficient) that saves q, k, v, the
output and a log-sum-exp; ``eager``: the textbook softmax(QK^T)V that saves the
(seq_len x seq_len) attention probabilities of every head."""

CONFIG_DIR = Path(__file__).with_name("configs")
SHIPPED_CONFIGS = {
    "llama-7b": "llama-7b.json",
    "llama-13b": "llama-13b.json",
    "llama-33b": "llama-33b.json",
    "llama-30b": "llama-33b.json",  # Meta's name for the same 32.5B model
    "llama-65b": "llama-65b.json",
    "llama-2-70b": "llama-2-70b.json",  # grouped-query attention (8 key/value heads); chapter 09
}
"""LLaMA configurations shipped with the course (Touvron et al., 2023, Table 2:
hidden 4096/5120/6656/8192, 32/40/60/80 layers, 32/40/52/64 heads; FFN width
11008/13824/17920/22016; vocabulary 32000; RMSNorm eps 1e-6; context 2048;
untied input and output embeddings)."""

LLAMA_SIZES = ("llama-7b", "llama-13b", "llama-33b", "llama-65b")

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

PAPER_FULL16_65B_GB = 780
"""QLoRA, Sec. 1: 16-bit finetuning of LLaMA-65B "requires more than 780 GB"."""

GPU_SIZES_GB = (24, 48, 80)
"""Consumer (24 GB), the paper's professional GPU (48 GB) and an A100/H100 (80 GB)."""


def gpu_capacity_bytes(size_gb: int) -> int:
    """Bytes in a GPU sold as ``size_gb`` GB: GPU memory comes in binary
    units (a "48 GB" card has 48 GiB, which nvidia-smi reports in MiB), so
    ``size_gb * 2**30``. Everything else here is in decimal GB."""
    return size_gb * 2**30


GUANACO_LORA_R = 64
GB = 10**9

_REQUIRED_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_FP32 = 4
_INT64 = 8

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


# --------------------------------------------------------------------------- #
# Configs
# --------------------------------------------------------------------------- #
def load_config(config: Any):
    """A transformers ``PretrainedConfig`` from ``config``: a config object, a
    dict (with ``model_type``), a path to a config JSON file or to a model
    directory holding ``config.json``, or a shipped name such as ``"llama-7b"``
    (see :data:`SHIPPED_CONFIGS`)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, Mapping):
        values = dict(config)
        model_type = values.pop("model_type", None)
        if model_type is None:
            raise ValueError("the config dict has no 'model_type'; add one, e.g. {'model_type': 'llama', ...}")
        try:
            return AutoConfig.for_model(model_type, **values)
        except ValueError as err:
            raise ValueError(f"transformers does not know model_type {model_type!r}: {err}") from None
    if isinstance(config, (str, os.PathLike)):
        name = str(config)
        if name.lower() in SHIPPED_CONFIGS:
            return AutoConfig.from_pretrained(CONFIG_DIR / SHIPPED_CONFIGS[name.lower()])
        path = Path(name).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ValueError(f"{path} has no config.json; pass a model directory or a config JSON file")
            return AutoConfig.from_pretrained(path)
        if path.is_file():
            try:
                values = json.loads(path.read_text())
            except ValueError as err:
                raise ValueError(f"{path} is not a JSON config file ({err})") from None
            return load_config(values)
        raise ValueError(
            f"no config called {name!r}: pass a config object, a dict, a path to a config JSON file "
            f"or model directory, or one of {sorted(SHIPPED_CONFIGS)}"
        )
    raise TypeError(
        f"config must be a transformers config, a dict, a path or a shipped name, not {type(config).__name__}"
    )


@dataclass(frozen=True)
class ModelShape:
    """The dimensions the activation model needs, read from a config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def model_shape(config: Any) -> ModelShape:
    """Read :class:`ModelShape` from a config, naming any missing field."""
    config = load_config(config)
    values = {}
    for name in _REQUIRED_FIELDS:
        value = getattr(config, name, None)
        if value is None:
            raise ValueError(
                f"the {type(config).__name__} has no '{name}', which the memory model needs "
                f"(it needs {', '.join(_REQUIRED_FIELDS)}); pass a decoder-only causal-LM config that defines it"
            )
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"config field '{name}' must be a positive integer, got {value!r}")
        values[name] = value
    heads = values["num_attention_heads"]
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or values["hidden_size"] // heads
    return ModelShape(
        hidden=values["hidden_size"],
        intermediate=values["intermediate_size"],
        layers=values["num_hidden_layers"],
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=values["vocab_size"],
    )


# --------------------------------------------------------------------------- #
# Parameters, counted on the meta device
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a causal LM, counted on the meta device (no weights)."""

    total: int
    """Every parameter once (tied embeddings count once)."""
    block_linear_shapes: tuple[tuple[int, int], ...]
    """``(out_features, in_features)`` of every linear layer that QLoRA
    quantizes and LoRA adapts: all of them except the output embedding."""
    largest: int = 0
    """Elements of the largest parameter tensor."""

    @property
    def block_linear(self) -> int:
        return sum(o * i for o, i in self.block_linear_shapes)

    @property
    def other(self) -> int:
        """Parameters kept in 16 bits under QLoRA: embeddings, lm_head, norms, biases."""
        return self.total - self.block_linear

    def lora(self, r: int) -> int:
        """LoRA parameters at rank ``r`` on every block linear layer: ``r (in + out)`` each."""
        return sum(r * (o + i) for o, i in self.block_linear_shapes)

    def largest_lora(self, r: int) -> int:
        """Elements of the largest LoRA matrix (``A`` is r x in, ``B`` is out x r)."""
        return r * max((max(o, i) for o, i in self.block_linear_shapes), default=0)


def _config_key(config) -> str:
    return config.to_json_string(use_diff=False)


@functools.lru_cache(maxsize=32)
def _count_from_json(key: str) -> ParameterCount:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D
    from transformers.utils import logging as hf_logging

    values = json.loads(key)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise ValueError(f"transformers cannot build a causal LM from this config: {err}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    output = model.get_output_embeddings()
    skip = {id(output)} if output is not None else set()
    shapes = []
    for module in model.modules():
        if id(module) in skip:
            continue
        if isinstance(module, torch.nn.Linear):
            shapes.append((module.out_features, module.in_features))
        elif isinstance(module, Conv1D):  # GPT-2 style linear layers, weight stored (in, out)
            shapes.append((module.weight.shape[1], module.weight.shape[0]))
    total = sum(p.numel() for p in model.parameters())
    largest = max((p.numel() for p in model.parameters()), default=0)
    return ParameterCount(total=total, block_linear_shapes=tuple(shapes), largest=largest)


def count_parameters(config: Any) -> ParameterCount:
    """Count a causal LM's parameters by building it on the ``meta`` device:
    every module and shape exists, no memory is allocated for weights.

    >>> count_parameters("llama-7b").total
    6738415616
    """
    config = load_config(config)
    model_shape(config)  # clear error for missing fields before transformers' own
    return _count_from_json(_config_key(config))


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
        return packed + blocks * _FP32
    return packed + blocks + math.ceil(blocks / nested_blocksize) * _FP32 + _FP32


# --------------------------------------------------------------------------- #
# Activations
# --------------------------------------------------------------------------- #
def _dtype(value, name: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[value.lower()]
    raise ValueError(f"{name} must be a torch dtype or one of {sorted(_DTYPE_NAMES)}, got {value!r}")


def activation_breakdown(
    config: Any,
    method: str,
    *,
    seq_len: int = 512,
    lora_r: int = GUANACO_LORA_R,
    compute_dtype: torch.dtype | str = torch.bfloat16,
    adapter_dtype: torch.dtype | str | None = None,
    lora_dropout: float = 0.0,
    dropout_mask_bytes: int = 1,
    attention: str = "sdpa",
) -> dict[str, int]:
    """Bytes that autograd saves per token in one Llama decoder layer.

    ``h`` hidden size, ``i`` MLP width, ``q = heads * head_dim``, ``kv =
    kv_heads * head_dim``, ``c`` bytes of the compute dtype:

    * ``rmsnorm`` (two per layer). ``x.to(float32)``, ``x * rsqrt(mean(x^2)
      + eps)``, ``weight * y.to(input dtype)``: the multiply keeps the fp32
      input (4h) and the rsqrt (4 bytes); the weight multiply also keeps its
      c-byte input when the weight is trained (full16), not when frozen.
    * ``linear inputs``. ``y = x W^T`` keeps ``x`` to form ``dW``: q/k/v share
      one input (c h), o_proj takes the attention output (c q), gate/up share
      one input (c h), down_proj takes the SwiGLU product (c i). Frozen 4-bit
      and 16-bit base layers keep nothing (bitsandbytes' ``MatMul4Bit`` saves
      only the packed weight); their LoRA adapters keep the same inputs for
      ``dA``, so the sum is the same. Only when the adapters run in another
      dtype than the compute dtype (peft casts the input per module) or use
      dropout does every adapter keep its own copy of its input (5h + q + i
      values in the adapter dtype), and with dropout also its own mask of
      ``dropout_mask_bytes`` per value: 1 for CUDA's fused dropout (a bool
      mask); PyTorch on a CPU keeps the mask in the input's dtype.
    * ``attention``. The rotary embedding keeps only cos and sin, shared by
      all layers (:func:`rope_table_bytes`). ``sdpa`` keeps post-RoPE q (c q), k and v (c kv
      each, before repeating to all heads) and an fp32 log-sum-exp per head;
      its output is the o_proj input above. ``eager`` keeps q, the
      head-repeated k and v, and the attention probabilities: fp32 softmax
      output (4 heads seq_len) and its c-byte cast.
    * ``mlp``. SiLU keeps its input (gate output), the product keeps both
      factors (SiLU output and up output): 3 c i.
    * ``lora``. Each of the block's 7 adapters (q, k, v, o, gate, up, down)
      keeps ``x A`` (r values in the adapter dtype) for ``dB``.

    For LLaMA-7B in bf16 with sdpa this is 186,504 bytes per token and layer
    for full16 and 171,016 for (Q)LoRA at r = 64: freezing the weights saves
    only 8% of the activation memory, because the gradient with respect to
    the input must still flow through every layer, and LoRA's ``dA`` needs
    the same inputs that ``dW`` needed.

    The tests check these sums against the tensors autograd actually saves
    (``torch.autograd.graph.saved_tensors_hooks``), byte for byte.
    """
    shape = model_shape(config)
    method = _check_method(method)
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
    _check_positive("seq_len", seq_len)
    c = _dtype(compute_dtype, "compute_dtype").itemsize
    a = _dtype(adapter_dtype, "adapter_dtype").itemsize if adapter_dtype is not None else c
    h, i, q, kv, heads = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim, shape.heads
    frozen = method != "full16"

    parts = {"rmsnorm": 2 * (_FP32 * h + _FP32 + (0 if frozen else c * h))}
    if attention == "sdpa":
        parts["attention"] = c * q + 2 * c * kv + _FP32 * heads
    else:
        repeated = q if shape.kv_heads < heads else kv
        probs = (_FP32 + (c if c != _FP32 else 0)) * heads * seq_len
        parts["attention"] = c * q + 2 * c * repeated + probs
    parts["mlp"] = 3 * c * i
    separate_copies = frozen and (lora_dropout > 0 or a != c)
    if not separate_copies:
        parts["linear inputs"] = c * (2 * h + q + i)
    else:
        per_element = a + (dropout_mask_bytes if lora_dropout > 0 else 0)
        attention_output = c * q if attention == "sdpa" else 0
        parts["linear inputs"] = per_element * (5 * h + q + i) + attention_output
    if frozen:
        _check_positive("lora_r", lora_r)
        parts["lora"] = 7 * a * lora_r
    return parts


def head_breakdown(config: Any, method: str, *, compute_dtype: torch.dtype | str = torch.bfloat16) -> dict[str, int]:
    """Bytes per token outside the decoder layers.

    * ``final rmsnorm``: as in a layer (4h + 4, plus c h when trained).
    * ``lm_head input``: kept only when the lm_head is trained (full16).
    * ``token ids``: int64 targets kept by the loss, and the input ids kept by
      the embedding when it is trained.
    * ``log-probs``: transformers upcasts the logits to fp32 for the loss
      (``ForCausalLMLoss``); log-softmax keeps its fp32 output (4 V).
    * ``loss backward``: not saved, but alive at the start of the backward
      pass, when every saved activation still is: the gradient of the
      log-probabilities and that of the fp32 logits (8 V).
    """
    shape = model_shape(config)
    method = _check_method(method)
    c = _dtype(compute_dtype, "compute_dtype").itemsize
    trained = method == "full16"
    return {
        "final rmsnorm": _FP32 * shape.hidden + _FP32 + (c * shape.hidden if trained else 0),
        "lm_head input": c * shape.hidden if trained else 0,
        "token ids": _INT64 * (2 if trained else 1),
        "log-probs": _FP32 * shape.vocab,
        "loss backward": 2 * _FP32 * shape.vocab,
    }


def rope_table_bytes(config: Any, seq_len: int, compute_dtype: torch.dtype | str = torch.bfloat16) -> int:
    """The rotary cos and sin tables (``seq_len x head_dim`` each), computed
    once per forward pass and kept by every layer's q and k products."""
    shape = model_shape(config)
    return 2 * seq_len * shape.head_dim * _dtype(compute_dtype, "compute_dtype").itemsize


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
        This is what :func:`measure_training_step` measures."""
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
        lines.append(f"  {'total':<12}{self.total / GB:>9.2f} GB")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def as_dict(self) -> dict:
        out = asdict(self)
        out["total"] = self.total
        out["peak"] = self.peak
        return out


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods are {', '.join(METHODS)}")
    return method


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")


def _model_name(config, original) -> str:
    if isinstance(original, str) and original.lower() in SHIPPED_CONFIGS:
        return original.lower()
    name = getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "")
    return Path(name).name if name else config.model_type


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
    world_size: int = 1,
) -> MemoryEstimate:
    """Memory needed to finetune a causal LM with ``method`` (per GPU when
    ``world_size`` > 1: see :func:`fsdp_per_gpu`).

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
    per-adapter dropout copies and masks (see :func:`activation_breakdown`).

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
    config = load_config(config)
    shape = model_shape(config)
    method = _check_method(method)
    _check_positive("seq_len", seq_len)
    _check_positive("batch", batch)
    _check_positive("lora_r", lora_r)
    _check_positive("blocksize", blocksize)
    _check_positive("optimizer_state_bytes", optimizer_state_bytes)
    if optimizer_temporaries not in OPTIMIZER_TEMPORARIES:
        raise ValueError(f"optimizer_temporaries must be one of {OPTIMIZER_TEMPORARIES}, "
                         f"got {optimizer_temporaries!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    w = _dtype(weight_dtype, "weight_dtype").itemsize
    c = _dtype(compute_dtype, "compute_dtype").itemsize
    a = _dtype(adapter_dtype, "adapter_dtype").itemsize
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

    settings = {}
    if world_size != 1 or isinstance(world_size, bool):
        shared = fsdp_per_gpu(counts, shape, method, world_size, weights=weights, adapters=adapters,
                              gradients=gradients, optimizer=optimizer, weight_bytes=w,
                              blocksize=blocksize, double_quant=double_quant)
        weights, adapters, gradients, optimizer = (shared[k] for k in ("weights", "adapters", "gradients",
                                                                        "optimizer"))
        settings = {"world_size": world_size, "gathered_bytes": shared["gathered"]}

    return MemoryEstimate(
        model=_model_name(config, original),
        method=method,
        seq_len=seq_len,
        batch=batch,
        gradient_checkpointing=gradient_checkpointing,
        lora_r=None if method == "full16" else lora_r,
        parameters=counts.total,
        trainable_parameters=trainable,
        weights=weights,
        adapters=adapters,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        optimizer_temporaries=scratch,
        settings={
            "weight_dtype": str(_dtype(weight_dtype, "weight_dtype")),
            "compute_dtype": str(_dtype(compute_dtype, "compute_dtype")),
            "adapter_dtype": str(_dtype(adapter_dtype, "adapter_dtype")),
            "optimizer_state_bytes": optimizer_state_bytes,
            "lora_dropout": lora_dropout,
            "dropout_mask_bytes": dropout_mask_bytes,
            "attention": attention,
            "optimizer_temporaries": optimizer_temporaries,
            "blocksize": blocksize,
            "double_quant": double_quant,
            **settings,
        },
    )


def fsdp_per_gpu(counts: ParameterCount, shape, method: str, world_size: int, *, weights: int, adapters: int,
                 gradients: int, optimizer: int, weight_bytes: int, blocksize: int = 64,
                 double_quant: bool = True) -> dict[str, int]:
    """One GPU's share of the model's state under FSDP over ``world_size``
    GPUs (chapter 09, :mod:`qlora_lab.fsdp`): 1/N of the weights, adapters,
    gradients and optimizer states, plus the units FSDP gathers whole while
    they compute: the root unit (embeddings, final norm, output head), whole
    for the entire step, and two decoder layers (the one running and the next,
    prefetched). ``"weights"`` includes the gathered bytes, also returned
    alone as ``"gathered"``. Activations are per GPU already (each GPU runs
    its own micro-batches)."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer (the number of GPUs), got {world_size!r}")
    layers = shape.layers
    if method == "qlora":
        block = sum(nf4_storage_bytes(o * i, blocksize, double_quant) for o, i in counts.block_linear_shapes)
    else:
        block = counts.block_linear * weight_bytes
    root = counts.other * weight_bytes  # embeddings, head and norms (the layers' norms are a rounding error)
    layer = block // layers + adapters // layers
    gathered = root + 2 * layer
    if method == "full16":
        gathered += gradients // layers  # one layer's gradient, whole, before its reduce-scatter
    share = {name: math.ceil(value / world_size) for name, value in
             (("weights", weights), ("adapters", adapters), ("gradients", gradients), ("optimizer", optimizer))}
    share["weights"] += gathered
    share["gathered"] = gathered
    return share


def estimates_table(estimates: list[MemoryEstimate]) -> str:
    """Several estimates side by side, one row each, in GB."""
    width = max([len("model"), *(len(e.model) for e in estimates)]) + 2
    header = f"{'model':<{width}}{'method':<8}" + "".join(f"{n:>12}" for n in MemoryEstimate.COMPONENTS)
    rows = [header + f"{'total':>10}"]
    for e in estimates:
        rows.append(f"{e.model:<{width}}{e.method:<8}"
                    + "".join(f"{v / GB:>12.2f}" for v in e.components().values()) + f"{e.total / GB:>10.2f}")
    return "\n".join(rows)


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
    config = load_config(config)
    shape = model_shape(config)
    if bits not in (4, 16):
        raise ValueError(f"bits must be 4 (NF4 + double quantization) or 16, got {bits!r}")
    if context is None:
        context = getattr(config, "max_position_embeddings", None)
        if context is None:
            raise ValueError("the config has no 'max_position_embeddings'; pass context=")
    _check_positive("context", context)
    _check_positive("batch", batch)
    counts = count_parameters(config)
    if bits == 4:
        weights = sum(nf4_storage_bytes(o * i) for o, i in counts.block_linear_shapes) + counts.other * 2
    else:
        weights = counts.total * 2
    adapters = 0
    if lora_r is not None:
        _check_positive("lora_r", lora_r)
        adapters = counts.lora(lora_r) * _dtype(adapter_dtype, "adapter_dtype").itemsize
    c = _dtype(compute_dtype, "compute_dtype").itemsize
    kv_cache = 2 * shape.layers * shape.kv_dim * context * batch * c
    return Footprint(model=_model_name(config, original), bits=bits, context=context, batch=batch,
                     weights=weights, adapters=adapters, kv_cache=kv_cache)


def paper_comparison(**settings) -> list[dict]:
    """Table 6's Memory column next to this model, row by row, in GB.

    For every row: the paper's figure; the model's weights (with adapters
    for the 4-bit Guanaco models); the deployment footprint of
    :func:`deployment_footprint` (weights, adapters, key/value cache for the
    full 2048-token context, batch 1) and its deviation; and for the 4-bit
    rows the QLoRA finetuning ``total`` of :func:`estimate` (``settings``
    are passed to it) and its deviation.
    """
    rows = []
    for label, name, bits, paper in PAPER_TABLE6:
        footprint = deployment_footprint(name, bits=bits, lora_r=GUANACO_LORA_R if bits == 4 else None)
        row = {
            "model": label,
            "config": name,
            "bits": bits,
            "paper_gb": paper,
            "weights_gb": (footprint.weights + footprint.adapters) / GB,
            "deployment_gb": footprint.total / GB,
            "deployment_vs_paper": footprint.total / GB / paper - 1,
            "finetuning_gb": None,
            "finetuning_vs_paper": None,
        }
        if bits == 4:
            total = estimate(name, "qlora", **settings).total
            row["finetuning_gb"] = total / GB
            row["finetuning_vs_paper"] = total / GB / paper - 1
        rows.append(row)
    return rows


def paper_comparison_table(**settings) -> str:
    """:func:`paper_comparison` as a printable table."""
    lines = [f"{'Table 6 model':<20}{'bits':>5}{'paper':>8}{'weights':>9}{'deploy':>9}{'dev':>7}"
             f"{'finetune':>10}{'dev':>7}"]
    for row in paper_comparison(**settings):
        tune = "" if row["finetuning_gb"] is None else \
            f"{row['finetuning_gb']:>10.2f}{row['finetuning_vs_paper']:>+7.0%}"
        lines.append(f"{row['model']:<20}{row['bits']:>5}{row['paper_gb']:>8}{row['weights_gb']:>9.2f}"
                     f"{row['deployment_gb']:>9.2f}{row['deployment_vs_paper']:>+7.0%}{tune}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# The chart
# --------------------------------------------------------------------------- #
COMPONENT_COLORS = {
    "weights": "#4c72b0", "adapters": "#55a868", "gradients": "#c44e52",
    "optimizer": "#8172b2", "activations": "#ccb974",
}


def _display_name(name: str) -> str:
    return "LLaMA-" + name[len("llama-"):].upper() if name.startswith("llama-") else name


def plot_breakdown(models=LLAMA_SIZES, methods=METHODS, gpus=GPU_SIZES_GB, ax=None, ymax_gb: float = 100,
                   **settings):
    """Stacked bars of the five components of :func:`estimate` for every
    model and method, with dashed lines at the GPU sizes
    (:func:`gpu_capacity_bytes`). Returns the matplotlib ``Figure``.

    The y axis is linear and stops at ``ymax_gb``: bars that go past it
    (full finetuning needs hundreds of GB) are cut there and labelled with
    their total. ``settings`` are passed to :func:`estimate`."""
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 3.5))
    else:
        fig = ax.figure
    width = 0.8 / len(methods)
    positions, labels = [], []
    for x, name in enumerate(models):
        for m_index, method in enumerate(methods):
            e = estimate(name, method, **settings)
            position = x + (m_index - (len(methods) - 1) / 2) * width
            positions.append(position)
            labels.append(method)
            bottom = 0.0
            for component, value in e.components().items():
                ax.bar(position, value / GB, width * 0.92, bottom=bottom, color=COMPONENT_COLORS[component])
                bottom += value / GB
            if bottom > ymax_gb:
                ax.text(position, ymax_gb * 0.98, f"{bottom:.0f}", ha="center", va="top", fontsize=6,
                        rotation=90, color="white")
    for gb in gpus:
        level = gpu_capacity_bytes(gb) / GB
        ax.axhline(level, color="black", lw=0.8, ls="--")
        ax.text(-0.45, level, f"{gb} GB GPU", fontsize=7, va="bottom", ha="left")
    ax.set_xticks(positions)
    ax.set_xticklabels(labels, fontsize=6, rotation=90)
    below = blended_transform_factory(ax.transData, ax.transAxes)
    for x, name in enumerate(models):
        ax.text(x, -0.2, _display_name(name), transform=below, ha="center", va="top", fontsize=8)
    ax.set_ylim(0, ymax_gb)
    ax.set_xlim(-0.5, len(models) - 0.5)
    ax.set_ylabel("memory (GB)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=color) for color in COMPONENT_COLORS.values()]
    ax.legend(handles, list(COMPONENT_COLORS), fontsize=7, ncol=5, loc="upper center", frameon=False,
              bbox_to_anchor=(0.5, 1.12))
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- #
# Measurement
# --------------------------------------------------------------------------- #
MEASUREMENT_ENV = {
    # Fixed mmap threshold: every block above 64 KiB is mmapped and handed back
    # to the kernel when freed, so the resident set size follows live tensors
    # instead of keeping freed heap pages. (glibc otherwise raises the
    # threshold as large blocks are freed and serves them from the heap.)
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
}

DEFAULT_BUILDERS = {
    "qlora": "qlora_lab.memory:bitsandbytes_qlora_model",
    "full16": "qlora_lab.memory:bf16_full_model",
}


@dataclass(frozen=True)
class StepMeasurement:
    """Resident memory of a fresh process that trains one step, in bytes."""

    method: str
    seq_len: int
    batch: int
    gradient_checkpointing: bool
    lora_r: int | None
    builder: str
    runtime: int
    """Resident set after importing Python, torch, transformers, peft and
    bitsandbytes: the baseline subtracted from everything below."""
    model: int
    """Resident set added by building the model and its optimizer."""
    peak: int
    """Highest resident set during one training step (forward, backward,
    optimizer step), above the runtime baseline."""
    how: str
    seconds: float
    """Time spent in the measuring process after its imports."""
    build_seconds: float
    step_seconds: float

    def ratio(self, estimate_: MemoryEstimate) -> float:
        """``estimate.peak / measured peak``."""
        return estimate_.peak / self.peak


def _rss_bytes(field_name: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field_name}")
    return int(match.group(1)) * 1024


def release_freed_memory() -> None:
    """Collect garbage and ask glibc to hand freed heap pages back to the
    kernel (``malloc_trim``), so that the resident set shows live memory."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakTracker:
    """Peak resident set from the kernel's high-water mark (Linux: reset by
    writing 5 to /proc/self/clear_refs), or from polling with psutil every
    millisecond where that is not available (a spike shorter than a
    millisecond can then be missed).

    ``with tracker: ...`` sets ``tracker.peak`` (bytes, the whole process);
    ``tracker.current()`` is the resident set now."""

    def __init__(self):
        self.kernel = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kernel = True
        except OSError:
            pass
        self.how = "kernel high-water mark (VmHWM after clear_refs)" if self.kernel else "psutil polling every 1 ms"

    def current(self) -> int:
        if self.kernel:
            return _rss_bytes("VmRSS")
        import psutil

        return psutil.Process().memory_info().rss

    def __enter__(self):
        if self.kernel:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            import psutil

            self._process = psutil.Process()
            self._max = self._process.memory_info().rss
            self._stop = threading.Event()

            def poll():
                while not self._stop.is_set():
                    self._max = max(self._max, self._process.memory_info().rss)
                    time.sleep(0.001)

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.kernel:
            self.peak = _rss_bytes("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self.current())
        return False


# The names bench/ and older code use.
_release_freed_memory = release_freed_memory
_PeakTracker = PeakTracker


def bitsandbytes_qlora_model(model_dir: str | None = None, lora_r: int = GUANACO_LORA_R, lora_alpha: int = 16):
    """SmolLM2 (or the model in ``model_dir``) loaded by transformers in NF4
    with double quantization and fp32 compute (``BitsAndBytesConfig``), with
    peft LoRA adapters (no dropout) on every linear layer except the lm_head:
    the ``bitsandbytes`` backend of :mod:`qlora_lab.backends`."""
    import qlora_lab  # noqa: F401  (before bitsandbytes)
    from qlora_lab.backends import bitsandbytes_config, peft_lora
    from qlora_lab.models import load_model, smollm2_cache_path

    model = load_model(str(model_dir or smollm2_cache_path()), dtype=torch.float32, with_tokenizer=False,
                       quantization_config=bitsandbytes_config("nf4", True, torch.float32))
    return peft_lora(model, lora_r, lora_alpha)


def bf16_full_model(model_dir: str | None = None, lora_r: int | None = None, lora_alpha: int | None = None):
    """SmolLM2 (or the model in ``model_dir``) in bfloat16, every parameter
    trainable: full 16-bit finetuning."""
    from transformers import AutoModelForCausalLM

    from qlora_lab.models import quiet_loading, smollm2_cache_path

    path = model_dir or smollm2_cache_path()
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _own_parameter_memory(model) -> None:
    """Give every plain parameter its own memory.

    transformers loads float32 weights from a safetensors file as views of
    the memory-mapped file when no conversion is needed (here: the fp32
    embedding and norms of the 4-bit model). The mapping then stays alive,
    and every page of the file that loading touched counts in the resident
    set: 415 MB of SmolLM2's 538 MB file, for a 113 MB embedding. A copy
    releases it."""
    seen = set()
    for p in model.parameters():
        if type(p) is torch.nn.Parameter and id(p) not in seen:
            seen.add(id(p))
            p.data = p.data.clone()
    release_freed_memory()


def _import_builder(spec: str):
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"builder must be 'package.module:function', got {spec!r}")
    return getattr(importlib.import_module(module_name), function_name)


def _measure_here(spec: dict) -> dict:
    """Runs inside the fresh process started by :func:`measure_training_step`."""
    import qlora_lab  # noqa: F401
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    started = time.perf_counter()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    builder = _import_builder(spec["builder"])
    tracker = PeakTracker()
    release_freed_memory()
    runtime = tracker.current()

    phase = time.perf_counter()
    model = builder(model_dir=spec["model_dir"], lora_r=spec["lora_r"], lora_alpha=16)
    _own_parameter_memory(model)
    build_seconds = time.perf_counter() - phase
    model.train()
    model.config.use_cache = False
    if spec["gradient_checkpointing"]:
        # transformers 5 name; it also makes the embedding output require grad
        # so that a frozen (PEFT) model still backpropagates into the layers.
        model.activation_checkpointing_enable({"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    vocab = model.config.vocab_size

    def step(tokens: torch.Tensor) -> None:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if spec["warmup"]:
        # A short step creates the optimizer states and initialises the
        # kernels, so that the measured step is a steady-state one.
        step(torch.randint(0, vocab, (1, 8)))
    else:
        # Create the optimizer states without a forward pass (zero gradients).
        for p in trainable:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    release_freed_memory()
    model_bytes = tracker.current() - runtime
    tokens = torch.randint(0, vocab, (spec["batch"], spec["seq_len"]))
    release_freed_memory()
    phase = time.perf_counter()
    with tracker:
        step(tokens)
    step_seconds = time.perf_counter() - phase
    return {
        "runtime": runtime,
        "model": model_bytes,
        "peak": tracker.peak - runtime,
        "how": tracker.how,
        "seconds": time.perf_counter() - started,
        "build_seconds": build_seconds,
        "step_seconds": step_seconds,
    }


def measure_training_step(
    method: str,
    seq_len: int = 256,
    batch: int = 1,
    gradient_checkpointing: bool = False,
    lora_r: int = GUANACO_LORA_R,
    *,
    builder: str | None = None,
    model_dir: str | os.PathLike | None = None,
    seed: int = 0,
    warmup: bool = False,
    threads: int | None = None,
    timeout: float = 600.0,
) -> StepMeasurement:
    """Measure the memory of one training step in a fresh Python process.

    How: a new interpreter (so nothing else lives in its memory) imports
    torch, transformers, peft and bitsandbytes and records its resident set
    size (``VmRSS``): the runtime baseline. It then builds the model with
    ``builder``, runs one short warm-up step (8 tokens: creates the AdamW
    states, initialises kernels) and records the resident set again (the
    model and its optimizer states). It resets the kernel's high-water mark
    (``/proc/self/clear_refs``), trains one step on ``batch x seq_len``
    random tokens (forward with the loss, backward, ``AdamW.step``) and
    reads the high-water mark (``VmHWM``). ``peak`` is that mark minus the
    runtime baseline: weights, adapters, optimizer states, gradients,
    activations and every temporary buffer, as the operating system saw them.
    glibc is told to return every freed block above 64 KiB to the kernel
    (:data:`MEASUREMENT_ENV`), so the resident set follows live tensors.
    Without ``/proc`` (macOS) the peak comes from polling with psutil.

    ``builder`` is ``"package.module:function"``; the function takes
    ``model_dir``, ``lora_r`` and ``lora_alpha`` and returns a model whose
    trainable parameters have ``requires_grad``. The defaults
    (:data:`DEFAULT_BUILDERS`) are transformers + bitsandbytes + peft for
    ``qlora`` and a bf16 model for ``full16``; the course's own QLoRA layer
    (chapter 05) plugs in here. Compare with :func:`estimate` under the
    same dtypes: for ``qlora``, fp32 weights, compute and adapters; for
    ``full16``, bf16 everything and ``optimizer_state_bytes=4`` (PyTorch's
    AdamW keeps its two states in the parameter's dtype); see
    :data:`MEASUREMENT_SETTINGS`.

    ``warmup=True`` runs an 8-token training step before the measured one;
    by default the AdamW states are created from zero gradients instead,
    which is cheaper and measures the same (within 1% on SmolLM2).
    ``threads`` sets the process's torch threads (two measurements can then
    run side by side on two cores).
    """
    method = _check_method(method)
    _check_positive("seq_len", seq_len)
    _check_positive("batch", batch)
    _check_positive("lora_r", lora_r)
    builder = builder or DEFAULT_BUILDERS.get(method)
    if builder is None:
        raise ValueError(f"there is no default builder for {method!r}; pass builder='package.module:function'")
    module_name, _, function_name = builder.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"builder must be 'package.module:function', got {builder!r}")
    spec = {
        "builder": builder, "model_dir": None if model_dir is None else str(model_dir), "lora_r": lora_r,
        "seq_len": seq_len, "batch": batch, "gradient_checkpointing": gradient_checkpointing, "seed": seed,
        "warmup": warmup, "threads": threads,
    }
    code = ("import json, sys\n"
            "from qlora_lab.memory import _measure_here\n"
            "print('QLORA_LAB_RESULT ' + json.dumps(_measure_here(json.loads(sys.argv[1]))))\n")
    env = {**os.environ, **MEASUREMENT_ENV}
    if threads is not None:
        _check_positive("threads", threads)
        env["OMP_NUM_THREADS"] = str(threads)
    try:
        done = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                              env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"measuring {method} took longer than {timeout} s; use a shorter seq_len") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("QLORA_LAB_RESULT ")]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"the measuring process failed (exit code {done.returncode}):\n{tail}")
    result = json.loads(lines[-1].split(" ", 1)[1])
    return StepMeasurement(method=method, seq_len=seq_len, batch=batch,
                           gradient_checkpointing=gradient_checkpointing,
                           lora_r=None if method == "full16" else lora_r, builder=builder, **result)


MEASUREMENT_SETTINGS = {
    "qlora": {"weight_dtype": torch.float32, "compute_dtype": torch.float32, "adapter_dtype": torch.float32,
              "optimizer_state_bytes": 8, "optimizer_temporaries": "per-tensor"},
    "full16": {"weight_dtype": torch.bfloat16, "compute_dtype": torch.bfloat16, "adapter_dtype": torch.bfloat16,
               "optimizer_state_bytes": 4, "optimizer_temporaries": "per-tensor"},
}
"""The :func:`estimate` settings that describe what the default builders do
on a CPU: QLoRA with fp32 compute (bitsandbytes' 4-bit layers dequantize to
the compute dtype; fp32 is the CPU-safe choice) and fp32 LoRA and Adam
states; full finetuning in bf16 with PyTorch's AdamW, whose two states are
bf16 too; PyTorch's AdamW on a CPU updates one tensor at a time."""
