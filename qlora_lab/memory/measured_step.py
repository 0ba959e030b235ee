"""Chapter 03's check of the memory estimate: one training step of a real
model, measured in a fresh process.

Plumbing, not course material: :func:`measure_training_step` starts a worker
(:mod:`qlora_lab.support.measure`), which builds the model, creates its AdamW
states and reads the kernel's high-water mark of its resident set over one
step. :data:`MEASUREMENT_SETTINGS` are the :func:`qlora_lab.memory.estimate`
settings that describe what the default builders do, so that estimate and
measurement can be put side by side (notebook 03, ``tests/memory/test_memory.py``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from qlora_lab.memory.activations import GUANACO_LORA_R, check_method
from qlora_lab.support.checks import check_positive
from qlora_lab.support.measure import (PeakTracker, import_function, measure_in_fresh_process,
                                       own_parameter_memory, release_freed_memory)

DEFAULT_BUILDERS = {
    "qlora": "qlora_lab.finetune.backends:bitsandbytes_qlora_model",
    "full16": "qlora_lab.finetune.backends:bf16_full_model",
}
"""The model each method is measured on by default: transformers +
bitsandbytes + peft for QLoRA, a bf16 model for full finetuning."""


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

    def ratio(self, estimate) -> float:
        """``estimate.peak / measured peak``."""
        return estimate.peak / self.peak


def training_step_worker(spec: dict) -> dict:
    """Runs inside the fresh process started by :func:`measure_training_step`."""
    import qlora_lab  # noqa: F401
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    started = time.perf_counter()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    builder = import_function(spec["builder"])
    tracker = PeakTracker()
    release_freed_memory()
    runtime = tracker.current()

    phase = time.perf_counter()
    model = builder(model_dir=spec["model_dir"], lora_r=spec["lora_r"], lora_alpha=16)
    own_parameter_memory(model)
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
    (:data:`qlora_lab.support.measure.MEASUREMENT_ENV`), so the resident set follows live tensors.
    Without ``/proc`` (macOS) the peak comes from polling with psutil.

    ``builder`` is ``"package.module:function"``; the function takes
    ``model_dir``, ``lora_r`` and ``lora_alpha`` and returns a model whose
    trainable parameters have ``requires_grad``. The defaults
    (:data:`DEFAULT_BUILDERS`) are transformers + bitsandbytes + peft for
    ``qlora`` and a bf16 model for ``full16``; the course's own QLoRA layer
    (chapter 05) plugs in here. Compare with :func:`qlora_lab.memory.estimate` under the
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
    method = check_method(method)
    check_positive("seq_len", seq_len)
    check_positive("batch", batch)
    check_positive("lora_r", lora_r)
    builder = builder or DEFAULT_BUILDERS.get(method)
    if builder is None:
        raise ValueError(f"there is no default builder for {method!r}; pass builder='package.module:function'")
    if ":" not in builder.strip(":"):
        raise ValueError(f"builder must be 'package.module:function', got {builder!r}")
    spec = {
        "builder": builder, "model_dir": None if model_dir is None else str(model_dir), "lora_r": lora_r,
        "seq_len": seq_len, "batch": batch, "gradient_checkpointing": gradient_checkpointing, "seed": seed,
        "warmup": warmup, "threads": threads,
    }
    if threads is not None:
        check_positive("threads", threads)
    result = measure_in_fresh_process("qlora_lab.memory.measured_step:training_step_worker", spec, threads=threads,
                                      timeout=timeout, what=f"{method} measuring")
    return StepMeasurement(method=method, seq_len=seq_len, batch=batch,
                           gradient_checkpointing=gradient_checkpointing,
                           lora_r=None if method == "full16" else lora_r, builder=builder, **result)


MEASUREMENT_SETTINGS = {
    "qlora": {"weight_dtype": torch.float32, "compute_dtype": torch.float32, "adapter_dtype": torch.float32,
              "optimizer_state_bytes": 8, "optimizer_temporaries": "per-tensor"},
    "full16": {"weight_dtype": torch.bfloat16, "compute_dtype": torch.bfloat16, "adapter_dtype": torch.bfloat16,
               "optimizer_state_bytes": 4, "optimizer_temporaries": "per-tensor"},
}
"""The :func:`qlora_lab.memory.estimate` settings that describe what the default builders do
on a CPU: QLoRA with fp32 compute (bitsandbytes' 4-bit layers dequantize to
the compute dtype; fp32 is the CPU-safe choice) and fp32 LoRA and Adam
states; full finetuning in bf16 with PyTorch's AdamW, whose two states are
bf16 too; PyTorch's AdamW on a CPU updates one tensor at a time."""
