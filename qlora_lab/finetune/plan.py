"""What a run will need, known before it starts: the dry run (chapter 07).

``python -m qlora_lab finetune --dry-run`` answers, on any machine, GPU or not,
for the run a configuration describes:

* how much GPU memory a training step takes: chapter 03's estimate for the
  run's method, rank, batch, sequence length, checkpointing, dropout, dtypes
  and optimizer (:func:`run_estimate`). The same tensors live on the device
  whichever backend (:mod:`qlora_lab.finetune.backends`) builds them;
* how much host memory loading the model takes, which does depend on the
  backend (:func:`load_host_bytes`): the course's streaming loader holds one
  tensor at a time (:func:`qlora_lab.finetune.streaming.load_memory`),
  transformers keeps the 16-bit checkpoint's pages mapped while it loads;
* which common GPUs the estimate fits (:func:`memory_plan`).

:func:`memory_estimate_text` and :func:`memory_plan_text` are the dry run's
two tables as the command line prints them.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from qlora_lab.finetune.backends import BACKENDS, compute_dtype, resolve_backend

__all__ = ["COMMON_GPUS_GB", "HOST_RUNTIME_BYTES", "load_host_bytes", "memory_estimate_text", "memory_plan",
           "memory_plan_text", "model_config_source", "run_estimate"]


# --------------------------------------------------------------------------- #
# What a run needs: GPU memory (chapter 03's estimate) and host memory to load
# --------------------------------------------------------------------------- #
COMMON_GPUS_GB = (12, 16, 24, 40, 48, 80)
HOST_RUNTIME_BYTES = 450 * 10**6
"""Resident set of Python with torch (CPU build), transformers, peft and
bitsandbytes imported, measured on the course's machine; CUDA's libraries
and context add more on a GPU machine (not measured here)."""


def model_config_source(config):
    """Where the model's config can be read without a download: SmolLM2's
    cache, a local directory, else ``memory_config`` (a shipped config)."""
    from qlora_lab.models import SMOLLM2_NAMES, smollm2_cache_path

    if config.model.lower() in SMOLLM2_NAMES:
        return smollm2_cache_path()
    if Path(config.model).expanduser().is_dir():
        return Path(config.model).expanduser()
    return config.memory_config or config.model


def run_estimate(config, device_type: str = "cuda"):
    """:func:`qlora_lab.memory.estimate` for the run ``config`` describes on
    ``device_type``: its method, rank, batch, sequence length, checkpointing and
    dropout; weights and activations in its compute dtype (what is not
    quantized is stored in it), float32 adapters (both backends keep them so),
    32-bit Adam states, and the optimizer's scratch memory (none for
    bitsandbytes' fused paged AdamW, per tensor for torch's on a CPU). The same
    tensors live on the device whichever backend builds them."""
    from qlora_lab import memory

    dtype = compute_dtype(config, torch.device(device_type))
    optimizer = config.optimizer if config.optimizer != "auto" else (
        "paged_adamw_32bit" if device_type == "cuda" else "adamw")
    return memory.estimate(
        model_config_source(config), config.method, lora_r=config.r, seq_len=config.max_length,
        batch=config.batch_size, gradient_checkpointing=config.gradient_checkpointing, weight_dtype=dtype,
        compute_dtype=dtype, adapter_dtype=torch.float32, optimizer_state_bytes=8, lora_dropout=config.lora_dropout,
        optimizer_temporaries="fused" if optimizer == "paged_adamw_32bit" else "per-tensor",
        blocksize=config.blocksize, double_quant=config.double_quant)


def _file_dtype(source) -> torch.dtype:
    """The dtype the checkpoint stores its weights in: read from the files when
    they are here, else the config's ``torch_dtype``, else bfloat16."""
    from qlora_lab.finetune import streaming
    from qlora_lab.support.model_config import read_model_config

    if isinstance(source, Path):
        with contextlib.suppress(ValueError, OSError):  # no safetensors here: fall back to the config
            tensors = streaming.checkpoint_tensors(source)
            return max(tensors.values(), key=lambda entry: math.prod(entry[1]))[0]
    named = getattr(read_model_config(source), "dtype", None)
    return named if isinstance(named, torch.dtype) else getattr(torch, str(named or "bfloat16"), torch.bfloat16)


def load_host_bytes(config, backend: str, device_type: str = "cuda") -> int:
    """Peak host memory of loading the run's model with ``backend`` onto
    ``device_type``, the runtime (:data:`HOST_RUNTIME_BYTES`) included.

    ``qlora_lab`` (qlora): :func:`qlora_lab.finetune.streaming.load_memory`, one tensor
    at a time. ``bitsandbytes``: transformers reads the shards through memory
    maps and keeps them mapped while it loads; measured on the CPU
    (``tests/finetune/test_streaming.py``), every page of the 16-bit checkpoint ends up
    resident (clean file pages, which the kernel may reclaim, but which count
    in the process's memory), plus the 4-bit model when the device is the CPU.
    ``lora16`` on either backend holds the 16-bit model.
    """
    from qlora_lab.finetune import streaming
    from qlora_lab.support.model_config import count_parameters

    source = model_config_source(config)
    file_dtype = _file_dtype(source)
    dtype = compute_dtype(config, torch.device(device_type))
    counts = count_parameters(source)
    if config.method == "lora16":
        return HOST_RUNTIME_BYTES + counts.total * max(file_dtype.itemsize, dtype.itemsize)
    if backend == "qlora_lab":
        need = streaming.load_memory(source, file_dtype=file_dtype, dtype=dtype, device=device_type,
                                     blocksize=config.blocksize, double_quant=config.double_quant)
        return HOST_RUNTIME_BYTES + need.total
    resident = streaming.load_memory(source, file_dtype=file_dtype, dtype=dtype, device=device_type).resident
    return HOST_RUNTIME_BYTES + counts.total * file_dtype.itemsize + resident


def memory_plan(config, device_type: str = "cuda") -> list[dict]:
    """For each backend: the GPU estimate (:func:`run_estimate`), the host
    memory of the load (:func:`load_host_bytes`) and which of
    :data:`COMMON_GPUS_GB` the estimate fits (chapter 07's rule: the
    estimated peak of a step within the card's ``size * 2**30`` bytes)."""
    from qlora_lab import memory

    estimate = run_estimate(config, device_type)
    default = resolve_backend("auto", torch.device(device_type))
    rows = []
    for backend in (default, *[b for b in BACKENDS if b != default]):
        rows.append({"backend": backend, "default": backend == default, "estimate": estimate,
                     "host_bytes": load_host_bytes(config, backend, device_type),
                     "fits": {gb: estimate.peak <= memory.gpu_capacity_bytes(gb) for gb in COMMON_GPUS_GB}})
    return rows


# --------------------------------------------------------------------------- #
# The dry run's tables
# --------------------------------------------------------------------------- #
def memory_estimate_text(config, device_type: str = "cuda") -> str:
    """The memory estimate of chapter 03 for this run (:func:`run_estimate`), beside
    full 16-bit finetuning of the same model."""
    from qlora_lab import memory

    try:
        breakdown = run_estimate(config, device_type)
    except (ValueError, OSError) as err:  # a model whose config cannot be read here
        return f"(no memory estimate: {err})"
    full = memory.estimate(model_config_source(config), "full16", seq_len=config.max_length,
                           batch=config.batch_size, gradient_checkpointing=config.gradient_checkpointing)
    compute = breakdown.settings["compute_dtype"].removeprefix("torch.")
    text = (f"memory estimate for {breakdown.model} ({config.method}, r={config.r}, batch {config.batch_size} x "
            f"{config.max_length} tokens, checkpointing {'on' if config.gradient_checkpointing else 'off'}, "
            f"{compute} compute, float32 adapters, 32-bit Adam states, on {device_type}):\n{breakdown}\n"
            f"full 16-bit finetuning of the same model would peak at about {full.peak / 1e9:.1f} GB")
    return text


def memory_plan_text(config, device_type: str = "cuda") -> str:
    """The dry run's table: for each backend, the GPU estimate, the host memory
    of the load, and which common GPUs the estimate fits."""
    try:
        rows = memory_plan(config, device_type)
    except (ValueError, OSError) as err:
        return f"(no per-backend table: {err})"
    names = [r["backend"] + (" (default)" if r["default"] else "") for r in rows]
    width = max(len("backend"), *map(len, names)) + 2
    lines = [f"what each backend needs for {rows[0]['estimate'].model} on {device_type}:",
             f"{'backend':<{width}}{'step peak':>13}{'host for the load':>19}"
             + "".join(f"{gb:>4} GB" for gb in COMMON_GPUS_GB)]
    for name, r in zip(names, rows):
        lines.append(f"{name:<{width}}{r['estimate'].peak / 1e9:>10.2f} GB{r['host_bytes'] / 1e9:>16.2f} GB"
                     + "".join(f"{'fits' if r['fits'][gb] else 'no':>7}" for gb in COMMON_GPUS_GB))
    lines.append(f"Step peak: a training step's peak memory on the device (chapter 03), the same tensors with either "
                 f"backend; a GPU fits when it is within the card's size (GiB). Host: the load's peak, {HOST_RUNTIME_BYTES / 1e9:.2f} GB of runtime "
                 f"included; qlora_lab streams one tensor at a time, transformers (bitsandbytes) keeps the 16-bit "
                 f"checkpoint's pages mapped while it loads (measured on the CPU).")
    return "\n".join(lines)
