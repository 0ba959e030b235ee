"""Checkpoints of random weights, and the host memory of loading one.

The course cannot download a 7B model, and its tests need sharded
checkpoints: :func:`write_random_checkpoint` writes one for any Llama-style
config, in the layout transformers writes (``config.json``, shards named
``model-00001-of-0000N.safetensors``, ``model.safetensors.index.json``),
one tensor at a time, so that writing LLaMA-7B (13.5 GB in bfloat16) holds
one tensor in memory, not the model. :func:`measure_load` loads a checkpoint
in a fresh process and reads the kernel's high-water mark of its resident
set, as chapter 03 measures a training step.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qlora_lab.finetune.streaming import INDEX_NAME, checkpoint_tensors, load_quantized, meta_model
from qlora_lab.support.atomic import atomic_directory

__all__ = ["measure_load", "write_random_checkpoint"]

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                       make: Callable[[str, tuple[int, ...]], torch.Tensor]) -> int:
    """Write a safetensors file whose tensors are produced one at a time by
    ``make(name, shape)``: the header first (offsets follow from the shapes),
    then each tensor's bytes. Returns the bytes of tensor data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        size = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape in tensors:
            tensor = make(name, shape).to(dtype).contiguous()
            f.write(memoryview(tensor.view(torch.uint8).numpy()))
            del tensor
    return offset


def write_random_checkpoint(config: Any, directory: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                            max_shard_bytes: int = 2 * 10**9, seed: int = 0,
                            overwrite: bool = False) -> dict[str, Any]:
    """Write a checkpoint of ``config`` (a transformers config or anything
    :func:`qlora_lab.support.model_config.read_model_config` takes) with random weights into
    ``directory``: ``config.json``, safetensors shards of at most
    ``max_shard_bytes`` (a tensor larger than that gets a shard of its own)
    named as transformers names them, and ``model.safetensors.index.json``.

    Weights are N(0, ``initializer_range``) (0.02 by default), norms are ones;
    each tensor is drawn in float32 from a generator seeded with ``seed`` and
    its position, cast to ``dtype`` and written before the next is drawn, so
    memory holds one tensor at a time. The directory appears complete or not
    at all (:func:`qlora_lab.support.atomic.atomic_directory`; a non-empty
    one is replaced only with ``overwrite=True``). Returns ``{"files",
    "total_bytes", "largest_tensor_bytes"}``."""
    from qlora_lab.support.model_config import read_model_config

    directory = Path(directory).expanduser()
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    config = read_model_config(config)
    skeleton = meta_model(config, dtype)
    head = skeleton.get_output_embeddings()
    tied = {f"{n}.weight" for n, m in skeleton.named_modules() if m is head} if getattr(
        config, "tie_word_embeddings", False) else set()
    # A tied output head shares the embedding's tensor: transformers stores it once.
    named = [(n, tuple(p.shape)) for n, p in skeleton.named_parameters() if n not in tied]
    norms = set()
    for module_name, module in skeleton.named_modules():
        if "norm" in type(module).__name__.lower():
            norms.update(f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False))
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in named:
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    position = {name: i for i, (name, _) in enumerate(named)}

    def make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name in norms:
            return torch.ones(shape)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + position[name])
        return torch.empty(shape).normal_(0.0, std, generator=generator)

    with atomic_directory(directory, overwrite=overwrite) as staging:
        weight_map, total = {}, 0
        for k, tensors in enumerate(shards, start=1):
            filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            total += _write_safetensors(staging / filename, tensors, dtype, make)
            weight_map.update({name: filename for name, _ in tensors})
        (staging / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                       indent=2))
        config.save_pretrained(staging)
    largest = max(dtype.itemsize * int(torch.Size(s).numel()) for _, s in named)
    return {"files": len(shards), "total_bytes": total, "largest_tensor_bytes": largest}


def load_worker(spec: dict) -> dict:
    """Runs inside the fresh process started by :func:`measure_load`."""
    import qlora_lab  # noqa: F401  (before bitsandbytes)
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    from transformers import AutoConfig

    from qlora_lab.qlora import memory_footprint
    from qlora_lab.support.measure import PeakTracker, release_freed_memory

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    meta_model(AutoConfig.from_pretrained(spec["path"]), dtype)  # imports the model's code before the baseline
    tracker = PeakTracker()
    release_freed_memory()
    runtime = tracker.current()
    started = time.perf_counter()
    with tracker:
        if spec["backend"] == "qlora_lab":
            model, _ = load_quantized(spec["path"], dtype=dtype, device=spec["device"], quant_type=spec["quant_type"],
                                      double_quant=spec["double_quant"])
        else:
            from qlora_lab.finetune.backends import bitsandbytes_config
            from qlora_lab.models import load_model

            model = load_model(spec["path"], dtype=dtype, with_tokenizer=False, quantization_config=bitsandbytes_config(
                spec["quant_type"], spec["double_quant"], dtype))
    seconds = time.perf_counter() - started
    release_freed_memory()
    return {"runtime_bytes": runtime, "peak_bytes": tracker.peak, "resident_bytes": tracker.current(),
            "model_bytes": memory_footprint(model), "seconds": seconds, "how": tracker.how}


def measure_load(path: str | Path, *, backend: str = "qlora_lab", dtype: torch.dtype = torch.float32,
                 device: str = "cpu", quant_type: str = "nf4", double_quant: bool = True,
                 threads: int | None = None, timeout: float = 3600.0) -> dict[str, Any]:
    """Load the checkpoint in ``path`` with ``backend`` (``"qlora_lab"``:
    :func:`load_quantized`; ``"bitsandbytes"``: transformers with
    ``BitsAndBytesConfig``) in a fresh Python process and measure its host
    memory, as chapter 03 measures a training step
    (:func:`qlora_lab.memory.measured_step.measure_training_step`): the resident set after
    the imports (``runtime_bytes``), the kernel's high-water mark over the
    load (``peak_bytes``, the whole process), the resident set afterwards,
    the model's tensor bytes (``model_bytes``) and the seconds. Adds
    ``largest_tensor_bytes`` and ``checkpoint_bytes`` from the files' headers."""
    from qlora_lab.support.measure import measure_in_fresh_process

    tensors = checkpoint_tensors(path)
    spec = {"path": str(Path(path).expanduser()), "backend": backend, "dtype": str(dtype).removeprefix("torch."),
            "device": str(device), "quant_type": quant_type, "double_quant": double_quant, "threads": threads}
    result = measure_in_fresh_process("qlora_lab.support.checkpoints:load_worker", spec, threads=threads or None,
                                      timeout=timeout, what="loading")
    sizes = [dt.itemsize * int(torch.Size(shape).numel()) for dt, shape in tensors.values()]
    return {**result, "largest_tensor_bytes": max(sizes), "checkpoint_bytes": sum(sizes)}
