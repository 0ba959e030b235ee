"""Loading a checkpoint straight into 4 bits, one tensor at a time (QLoRA, Sec. 3).

QLoRA's promise is a 7B model finetuned in 5-6 GB. That is the GPU side; the
host has to *get* the model there, and the obvious way, loading the 16-bit
model and quantizing it afterwards, first holds every 16-bit weight in host
memory: LLaMA-7B in bfloat16 is 13.5 GB, more than the roughly 12.7 GB of RAM
of a free Colab machine. transformers avoids this for bitsandbytes by
quantizing while it loads (``BitsAndBytesConfig``); :func:`load_quantized`
does the same for the course's own layers:

1. The model is built from its ``config.json`` on the meta device (accelerate's
   ``init_empty_weights``): every parameter has a shape and no memory. Buffers
   that are computed rather than stored (the rotary frequencies) are real.
2. The tensors are read from the safetensors files one at a time. A weight of
   a linear layer of the transformer blocks is moved to the device, cast to
   the storage dtype, quantized (:func:`qlora_lab.quant.nf4.quantize_4bit`: NF4 +
   double quantization in blocks of 64, QLoRA's recipe) and put into the model
   as a :class:`qlora_lab.qlora.LinearNF4`; everything else (embeddings, norms,
   the ``lm_head``, which QLoRA keeps in 16 bits) is copied to the device in
   the storage dtype. The 16-bit tensor is dropped before the next is read.
3. Every file is opened (``safetensors.safe_open``) for one tensor and closed
   again. safetensors memory-maps the file and returns a tensor that reads
   from the mapping; pages that were read stay resident as long as the mapping
   lives, and they count in the process's memory. One mapping per tensor keeps
   at most one tensor's pages resident, however large the shard.

Host memory therefore peaks at the runtime, the 4-bit model if it is loaded
onto the CPU (nothing of it if the device is a GPU), and one tensor with its
quantization temporaries: :func:`load_memory` is that account, measured
against the real peak by ``tests/finetune/test_streaming.py`` and ``bench/streaming_load.py``.

The result is the model that ``load_model`` + :func:`qlora_lab.qlora.quantize_model`
give, buffer for buffer: the same weights quantized by the same function in
the same dtype. :mod:`qlora_lab.support.checkpoints` writes sharded
checkpoints of random weights to load (the course cannot download a 7B
model) and measures a load's host memory in a fresh process.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["INDEX_NAME", "SINGLE_FILE_NAME", "LoadMemory", "StreamingReport", "checkpoint_files", "checkpoint_tensors",
           "load_memory", "load_quantized", "meta_model"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
QUANTIZE_TEMPORARY_BYTES = 13
"""Bytes per weight that :func:`qlora_lab.fast.nf4.quantize_4bit` allocates on top
of its input: the float32 scaled values (4), the int32 look-up cells reused
for the comparison (4), the float32 thresholds (4) and the uint8 codes (1)."""

_DTYPE_OF_NAME = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                  "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                  "BOOL": torch.bool}


# --------------------------------------------------------------------------- #
# What is in a checkpoint directory
# --------------------------------------------------------------------------- #
def checkpoint_files(directory: str | Path) -> dict[str, Path]:
    """``{tensor name: file}`` of the safetensors checkpoint in ``directory``:
    the shards named by ``model.safetensors.index.json``, else
    ``model.safetensors``, else every ``*.safetensors`` file (adapters aside).
    A directory without safetensors is an error that says what to do."""
    from safetensors import safe_open

    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"There is no checkpoint directory {directory}.")
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a 'weight_map'): {err}") from err
        missing = sorted({name for name in weight_map.values() if not (directory / name).is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not in {directory}: {', '.join(missing[:3])}; "
                                    f"the download is incomplete.")
        return {tensor: directory / name for tensor, name in weight_map.items()}
    files = [directory / SINGLE_FILE_NAME] if (directory / SINGLE_FILE_NAME).is_file() else sorted(
        p for p in directory.glob("*.safetensors") if not p.name.startswith("adapter_"))
    if not files:
        pickles = sorted(p.name for p in [*directory.glob("*.bin"), *directory.glob("*.pt"), *directory.glob("*.pth")])
        found = f"; it holds {', '.join(pickles[:3])}, which are pickle files" if pickles else ""
        raise ValueError(
            f"{directory} has no safetensors checkpoint ({SINGLE_FILE_NAME} or {INDEX_NAME}){found}. The course's "
            f"streaming loader reads safetensors only (a pickle file can run code when it is loaded): convert the "
            f"model once where you trust it (transformers' save_pretrained writes safetensors), or use "
            f"--backend bitsandbytes.")
    names: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                names[key] = path
    return names


def checkpoint_tensors(directory: str | Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``{tensor name: (dtype, shape)}`` read from the files' headers only."""
    shapes = {}
    for path in sorted(set(checkpoint_files(directory).values())):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                shapes[name] = (_DTYPE_OF_NAME.get(entry["dtype"], torch.uint8), tuple(entry["shape"]))
    return shapes


# --------------------------------------------------------------------------- #
# The loader
# --------------------------------------------------------------------------- #
@dataclass
class StreamingReport:
    """What :func:`load_quantized` did."""

    tensors: int = 0
    quantized_layers: int = 0
    quantized_weights: int = 0
    bytes_read: int = 0
    largest_tensor_bytes: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        skipped = f", {len(self.skipped)} unused tensors skipped" if self.skipped else ""
        return (f"streamed {self.tensors} tensors ({self.bytes_read / 1e9:.2f} GB read, largest "
                f"{self.largest_tensor_bytes / 1e6:.1f} MB), quantized {self.quantized_layers} linear layers "
                f"({self.quantized_weights:,} weights) in {self.seconds:.1f} s{skipped}")


def meta_model(config, dtype: torch.dtype):
    """The model of ``config`` (a transformers config) with every parameter on
    the meta device; buffers that are computed (rotary frequencies) are real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    # fork_rng: building the skeleton must not move the caller's random stream.
    with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _read(path: Path, name: str) -> torch.Tensor:
    """One tensor, through a mapping of its file that ends with the tensor
    (see the module docstring, point 3)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return f.get_tensor(name)


def _set_tensor(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    else:
        module._buffers[attr] = value


@torch.no_grad()
def load_quantized(path: str | Path, *, dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu", quant_type: str = "nf4", double_quant: bool = True,
                   blocksize: int = 64, skip: tuple[str, ...] = ("lm_head",),
                   progress: Callable[[int, int], None] | None = None):
    """Build the model in ``path`` in 4 bits without ever holding its 16-bit
    weights: ``(model, StreamingReport)``; see the module docstring.

    ``dtype`` is the storage dtype of everything that is not quantized (and
    the dtype each weight is cast to before it is quantized, as
    ``load_model(dtype=...)`` + ``quantize_model`` would); ``compute_dtype``
    (default ``dtype``) that of the 4-bit layers' matmuls. Linear layers whose
    name is in ``skip`` (or ends with ``"." + entry``) keep their weights, as in
    :func:`qlora_lab.qlora.quantize_model`. ``progress(done, total)`` is
    called after each tensor. The model is in eval mode on ``device``.
    """
    from qlora_lab.fast.nf4 import quantize_4bit
    from qlora_lab.qlora import LinearNF4, linear_layer_names

    started = time.perf_counter()
    directory = Path(path).expanduser()
    files = checkpoint_files(directory)
    device = torch.device(device)
    compute_dtype = compute_dtype or dtype
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json, so it is not a transformers model directory.")
    from transformers import AutoConfig

    from qlora_lab.support.loading import quiet_loading
    from qlora_lab.support.modules import replace_module

    with quiet_loading():
        model = meta_model(AutoConfig.from_pretrained(directory), dtype)
    targets = set(linear_layer_names(model, tuple(skip)))
    known = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
    report = StreamingReport()
    # File by file, tensors in the order they were listed (usually the order in the file).
    ordered = sorted(files, key=lambda n: str(files[n]))
    for done, name in enumerate(ordered, start=1):
        module_name, _, attr = name.rpartition(".")
        if name not in known:
            report.skipped.append(name)  # e.g. rotary_emb.inv_freq of old LLaMA checkpoints: computed, not stored
            continue
        tensor = _read(files[name], name)
        size = tensor.numel() * tensor.element_size()
        report.tensors += 1
        report.bytes_read += size
        report.largest_tensor_bytes = max(report.largest_tensor_bytes, size)
        module = model.get_submodule(module_name) if module_name else model
        if module_name in targets and attr == "weight":
            weight = tensor.to(device).to(dtype)
            packed, state = quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
            del weight
            replace_module(model, module_name, LinearNF4(module.in_features, module.out_features, packed, state,
                                                         module.bias, compute_dtype))
            report.quantized_layers += 1
            report.quantized_weights += tensor.numel()
        else:
            target = dtype if tensor.dtype.is_floating_point else tensor.dtype
            # copy=True: the parameter gets its own memory, not a view of the file's mapping.
            _set_tensor(module, attr, tensor.to(device=device, dtype=target, copy=True))
        del tensor
        if progress is not None:
            progress(done, len(ordered))

    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ValueError(f"the checkpoint in {directory} has no tensor for {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''} ({len(missing)} in all); is it the model its "
                         f"config.json describes?")
    model.to(device)  # the computed buffers
    model.config._name_or_path = str(directory)
    if (directory / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    model.eval()
    report.seconds = time.perf_counter() - started
    return model, report


# --------------------------------------------------------------------------- #
# How much host memory a load needs
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class LoadMemory:
    """Host memory of :func:`load_quantized`, in bytes (without the runtime)."""

    resident: int
    """What stays on the host: the 4-bit model when the device is the CPU, else 0."""
    transient: int
    """The largest tensor while it is read, cast and quantized."""

    @property
    def total(self) -> int:
        return self.resident + self.transient


def load_memory(config: Any, *, file_dtype: torch.dtype = torch.bfloat16, dtype: torch.dtype = torch.bfloat16,
                device: str = "cuda", blocksize: int = 64, double_quant: bool = True) -> LoadMemory:
    """The host memory :func:`load_quantized` needs for ``config`` (a config,
    dict, path or shipped name as in :func:`qlora_lab.memory.estimate`), with
    its weights stored as ``file_dtype`` and loaded as ``dtype`` onto
    ``device``. A quantized weight of ``n`` values costs, at its peak, the
    mapped file bytes, the cast copy and :data:`QUANTIZE_TEMPORARY_BYTES` per
    value (on the host only when ``device`` is the CPU); any other tensor
    costs its file bytes and, on the CPU, its copy."""
    from qlora_lab import memory
    from qlora_lab.support.model_config import count_parameters, model_shape

    counts = count_parameters(config)
    shape = model_shape(config)
    f, s = file_dtype.itemsize, dtype.itemsize
    on_cpu = torch.device(device).type == "cpu"
    largest_linear = max(o * i for o, i in counts.block_linear_shapes)
    largest_other = shape.vocab * shape.hidden
    linear = largest_linear * (f + (s + QUANTIZE_TEMPORARY_BYTES if on_cpu else 0))
    other = largest_other * (f + (s if on_cpu else 0))
    resident = 0
    if on_cpu:
        resident = sum(memory.nf4_storage_bytes(o * i, blocksize, double_quant) for o, i in counts.block_linear_shapes)
        resident += counts.other * s
    return LoadMemory(resident=resident, transient=max(linear, other))
