"""After finetuning, part 2: merging the adapter and exporting the model.

Serving base + adapter needs code that knows about adapters. A merged model
does not: ``W = W0 + (alpha / r) B A`` folded into every adapted layer gives
a plain checkpoint that any runtime loads. With QLoRA there is a catch, and
the seminar lists it among the limitations ("cannot merge with a different
adapter"): the base ``W0`` is stored in NF4, and ``W0 + delta`` is not an NF4
tensor. Two ways out, both here:

* **dequantize, then merge** (:func:`merged_model`): the NF4 base is
  dequantized to float, the adapter added, and the result kept in float
  (written in 16 or 32 bits). That is exactly the function the adapter was
  trained with, up to float rounding: the merged model's logits equal
  base + adapter within a stated tolerance. It costs the 4-bit saving.
* **merge into the 4-bit weights and quantize again**
  (:func:`merge_into_4bit`): the update is mostly smaller than the NF4 grid's
  steps, so quantizing ``W0 + delta`` again rounds nearly all of it away and
  moves the rest of the weights too. :func:`merge_into_4bit` reports by how much;
  the chapter measures what that does to the exact-match score.

Exports:

* ``format="hf"`` (:func:`save_hf`): a stock transformers directory
  (safetensors, ``config.json``, the tokenizer with its chat template) that
  ``AutoModelForCausalLM.from_pretrained`` loads;
* ``format="gguf"`` (:func:`qlora_lab.after.gguf.write_gguf`): one
  file for llama.cpp and Ollama, in float16 or Q8_0, plus an Ollama
  ``Modelfile``; transformers' GGUF loader reads it back for the checks.

Nothing existing is overwritten: the output goes to a new directory, written
beside its final place and renamed in only when complete.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qlora_lab.after.chat import adapter_config, base_model_name, check_tokenizer_files
from qlora_lab.lora import load_adapter, lora_modules, merge_lora
from qlora_lab.qlora import LinearNF4, quantize_model
from qlora_lab.support.atomic import atomic_directory
from qlora_lab.support.modules import replace_module

FORMATS = ("hf", "gguf")
GGUF_TYPES = ("f16", "q8_0")
BASES = ("nf4", "float")


# --------------------------------------------------------------------------- #
# Dequantize, merge
# --------------------------------------------------------------------------- #
def dequantized_linear(layer: LinearNF4, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """An ``nn.Linear`` holding ``layer``'s dequantized weight (QLoRA Eq. (6))."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device=layer.weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(layer.dequantized_weight().to(dtype))
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    linear.weight.requires_grad_(False)
    return linear


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every :class:`LinearNF4` of ``model`` (also those under a LoRA
    adapter) by its dequantized ``nn.Linear``, in place; returns how many."""
    names = [name for name, m in model.named_modules() if isinstance(m, LinearNF4)]
    for name in names:
        replace_module(model, name, dequantized_linear(model.get_submodule(name), dtype))
    return len(names)


def load_base(adapter_dir: str | os.PathLike, model: str | None = None, base: str = "nf4"):
    """``(model, tokenizer)``: the adapter's base (or ``model``) as the merge
    starts from it: ``base="nf4"`` quantized to NF4 + double quantization and
    dequantized again (the weights the adapter was trained beside),
    ``base="float"`` the float weights as stored."""
    from qlora_lab.models import load_model

    if base not in BASES:
        raise ValueError(f"base must be one of {BASES} ('nf4': the dequantized 4-bit weights the adapter was "
                         f"trained with; 'float': the 16/32-bit checkpoint), got {base!r}")
    adapter_config(adapter_dir)
    name = model or base_model_name(adapter_dir)
    check_tokenizer_files(name)
    loaded, tokenizer = load_model(name)
    if base == "nf4":
        quantize_model(loaded)
        dequantize_model(loaded)
    return loaded, tokenizer


def merged_model(adapter_dir: str | os.PathLike, model: str | None = None, base: str = "nf4",
                 loaded=None, tokenizer=None):
    """``(merged model, tokenizer)``: :func:`load_base`, the adapter loaded and
    merged into every layer it adapts, and the adapters unloaded, which leaves
    a plain transformers model. ``loaded``/``tokenizer``: a base already
    prepared by :func:`load_base` (it is changed in place)."""
    if loaded is None:
        loaded, tokenizer = load_base(adapter_dir, model, base)
    try:
        load_adapter(loaded, adapter_dir)
    except ValueError as err:
        raise ValueError(f"The adapter at {adapter_dir} does not fit this base model: {err}") from None
    merge_lora(loaded, unload=True)
    for p in loaded.parameters():
        p.requires_grad_(False)
    return loaded.eval(), tokenizer


@dataclass(frozen=True)
class RequantizeReport:
    """What :func:`merge_into_4bit` did to the weights: sums over every merged layer."""

    layers: int
    update_norm: float            # || (alpha/r) B A ||
    kept_update_norm: float       # || requantized - W0 ||: the part of the update that survived
    error_norm: float             # || requantized - (W0 + update) ||: what quantizing again lost
    unchanged_fraction: float     # weights whose 4-bit code did not change

    def __str__(self) -> str:
        return (f"{self.layers} layers: update norm {self.update_norm:.4g}, after re-quantizing the weights moved "
                f"by {self.kept_update_norm:.4g}, error against W0 + update {self.error_norm:.4g} "
                f"({self.error_norm / self.update_norm:.1%} of the update); {self.unchanged_fraction:.1%} of the "
                f"4-bit codes unchanged")


@torch.no_grad()
def merge_into_4bit(model: nn.Module) -> RequantizeReport:
    """Merge every adapter whose base is a :class:`LinearNF4` into the 4-bit
    weight: dequantize ``W0``, add the update, quantize to NF4 again (same
    data type, block size and double quantization), and put the new 4-bit
    layer where the adapter was. In place; returns a :class:`RequantizeReport`."""
    adapters = {n: m for n, m in lora_modules(model).items() if isinstance(m.base, LinearNF4)}
    if not adapters:
        raise ValueError("merge_into_4bit needs a model whose LoRA adapters sit on LinearNF4 layers "
                         "(load the adapter into a quantized base: qlora_lab.after.chat.load_with_adapter).")
    update2 = kept2 = error2 = 0.0
    same = total = 0
    for name, layer in adapters.items():
        base = layer.base
        w0 = base.dequantized_weight().float()
        delta = layer.delta_weight().float()
        dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        dense.weight.copy_(w0 + delta)
        if base.bias is not None:
            dense.bias.copy_(base.bias)
        new = LinearNF4.from_linear(dense, base.quant_type, base.double_quant, base.blocksize, base.compute_dtype)
        w1 = new.dequantized_weight().float()
        update2 += delta.square().sum().item()
        kept2 += (w1 - w0).square().sum().item()
        error2 += (w1 - w0 - delta).square().sum().item()
        for shift, mask in ((4, 0x0F), (0, 0x0F)):  # the high and the low nibble of every byte
            same += int((((new.weight >> shift) & mask) == ((base.weight >> shift) & mask)).sum())
        total += 2 * base.weight.numel()
        replace_module(model, name, new)
    return RequantizeReport(len(adapters), update2 ** 0.5, kept2 ** 0.5, error2 ** 0.5, same / total)


# --------------------------------------------------------------------------- #
# Writing: a new directory, complete or absent
# --------------------------------------------------------------------------- #
@contextlib.contextmanager
def new_directory(out: str | os.PathLike):
    """Yield a staging directory that becomes ``out`` when the block succeeds
    (:func:`qlora_lab.support.atomic.atomic_directory`). ``out`` must not
    exist, even empty: an export never replaces or mixes into earlier files."""
    target = Path(out).expanduser()
    if target.exists():
        raise FileExistsError(f"{target} already exists; an export never overwrites files: choose a new --out "
                              f"directory or remove this one yourself.")
    with atomic_directory(target) as staging:
        yield staging


def save_hf(model: nn.Module, tokenizer, out: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` and ``tokenizer`` (with its chat template) as a stock
    transformers directory (``model.safetensors``, ``config.json``,
    ``generation_config.json``, tokenizer files) into the new directory ``out``.
    ``dtype`` (e.g. ``torch.float16``) converts a copy of the weights first."""
    if lora_modules(model):
        raise ValueError("the model still has LoRA adapters; merge them first (merged_model or merge_lora(unload=True))")
    if any(isinstance(m, LinearNF4) for m in model.modules()):
        raise ValueError("the model has qlora_lab 4-bit layers, which transformers cannot load; dequantize_model first")
    if tokenizer is None:
        raise ValueError("save_hf needs the tokenizer: a model directory without one cannot be used")
    with new_directory(out) as staging:
        if dtype is not None and dtype != next(model.parameters()).dtype:
            import copy

            model = copy.deepcopy(model).to(dtype)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return Path(out).expanduser()


def ollama_modelfile(gguf_name: str, tokenizer) -> str:
    """An Ollama ``Modelfile`` for the exported GGUF file: greedy decoding, the
    end-of-turn token as the stop word, and a ChatML prompt template when the
    model uses ChatML (SmolLM2 does; Ollama reads other templates from the file)."""
    lines = [f"FROM ./{gguf_name}", "PARAMETER temperature 0", f'PARAMETER stop "{tokenizer.eos_token}"']
    if "<|im_start|>" in (tokenizer.chat_template or ""):
        lines.append('TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                     '{{ end }}<|im_start|>assistant\n"""')
    return "\n".join(lines) + "\n"


def export(adapter_dir: str | os.PathLike, out: str | os.PathLike, format: str = "hf", model: str | None = None,
           base: str = "nf4", gguf_type: str = "f16", dtype: torch.dtype | None = None) -> Path:
    """``python -m qlora_lab export``: merge the adapter into its base
    (:func:`merged_model`) and write it to the new directory ``out`` as a
    transformers directory (``format="hf"``) or as a GGUF file with an Ollama
    Modelfile (``format="gguf"``, ``gguf_type`` ``"f16"`` or ``"q8_0"``).
    Every argument is checked before the model is loaded."""
    from qlora_lab.after.gguf import write_gguf

    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose 'hf' (a transformers directory) or 'gguf' "
                         f"(one file for llama.cpp and Ollama)")
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r}; choose one of {GGUF_TYPES}")
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")
    target = Path(out).expanduser()
    if target.exists():
        raise FileExistsError(f"{target} already exists; an export never overwrites files: choose a new --out "
                              f"directory or remove this one yourself.")
    merged, tokenizer = merged_model(adapter_dir, model, base)
    if format == "hf":
        return save_hf(merged, tokenizer, target, dtype)
    name = f"{target.name}.{gguf_type}.gguf"
    base_name = model or base_model_name(adapter_dir)
    with new_directory(target) as staging:
        write_gguf(merged, tokenizer, staging / name, gguf_type, name=target.name,
                   tokenizer_pre="smollm" if "smollm" in base_name.lower() else "default")
        (staging / "Modelfile").write_text(ollama_modelfile(name, tokenizer))
    return target / name
