"""What autograd keeps for the backward pass: the activation part of
chapter 03's memory model (:mod:`qlora_lab.memory`), derived for a Llama
decoder layer (pre-RMSNorm, rotary attention with grouped query heads,
SwiGLU MLP) and checked tensor by tensor against autograd in the tests.

:func:`activation_breakdown` is one decoder layer per token,
:func:`head_breakdown` what lies outside the layers (final norm, loss),
:func:`rope_table_bytes` the rotary tables all layers share. The estimate
multiplies them by the tokens of a batch and, with gradient checkpointing,
keeps only each layer's input plus one layer being recomputed.
"""

from __future__ import annotations

from typing import Any

import torch

from qlora_lab.finetune.recipe import GUANACO_7B
from qlora_lab.support.checks import as_dtype, check_choice, check_positive
from qlora_lab.support.model_config import model_shape

METHODS = ("full16", "lora16", "qlora")
"""The finetuning methods of the memory model: full 16-bit finetuning,
16-bit LoRA, QLoRA."""

ATTENTION_KINDS = ("sdpa", "eager")
"""``sdpa``: a fused kernel (flash / memory-efficient) that saves q, k, v, the
output and a log-sum-exp; ``eager``: the textbook softmax(QK^T)V that saves the
(seq_len x seq_len) attention probabilities of every head."""

GUANACO_LORA_R = GUANACO_7B.r
"""The LoRA rank of the Guanaco recipe (QLoRA, Sec. 5), read from the recipe
itself (:data:`qlora_lab.finetune.recipe.GUANACO_7B`), where it is written once."""

FP32 = 4
INT64 = 8


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`METHODS`, else a ValueError listing them."""
    check_choice("method", method, METHODS)
    return method


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
    method = check_method(method)
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
    check_positive("seq_len", seq_len)
    c = as_dtype(compute_dtype, "compute_dtype").itemsize
    a = as_dtype(adapter_dtype, "adapter_dtype").itemsize if adapter_dtype is not None else c
    h, i, q, kv, heads = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim, shape.heads
    frozen = method != "full16"

    parts = {"rmsnorm": 2 * (FP32 * h + FP32 + (0 if frozen else c * h))}
    if attention == "sdpa":
        parts["attention"] = c * q + 2 * c * kv + FP32 * heads
    else:
        repeated = q if shape.kv_heads < heads else kv
        probs = (FP32 + (c if c != FP32 else 0)) * heads * seq_len
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
        check_positive("lora_r", lora_r)
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
    method = check_method(method)
    c = as_dtype(compute_dtype, "compute_dtype").itemsize
    trained = method == "full16"
    return {
        "final rmsnorm": FP32 * shape.hidden + FP32 + (c * shape.hidden if trained else 0),
        "lm_head input": c * shape.hidden if trained else 0,
        "token ids": INT64 * (2 if trained else 1),
        "log-probs": FP32 * shape.vocab,
        "loss backward": 2 * FP32 * shape.vocab,
    }


def rope_table_bytes(config: Any, seq_len: int, compute_dtype: torch.dtype | str = torch.bfloat16) -> int:
    """The rotary cos and sin tables (``seq_len x head_dim`` each), computed
    once per forward pass and kept by every layer's q and k products."""
    shape = model_shape(config)
    return 2 * seq_len * shape.head_dim * as_dtype(compute_dtype, "compute_dtype").itemsize
