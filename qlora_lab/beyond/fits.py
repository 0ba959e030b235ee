"""What fits where: one GPU's memory under FSDP-QLoRA (appendix, chapter 09).

:func:`estimate_per_gpu` is the estimate of chapter 03
(:func:`qlora_lab.memory.estimate`) for one of N GPUs, as
:func:`fsdp_per_gpu` divides it: each GPU holds 1/N of the 4-bit weights, of
the adapters, their gradients and optimizer states, plus the units FSDP gathers
whole while they compute (:mod:`qlora_lab.beyond.fsdp`), and its own
activations. :func:`fits_table` sets that beside consumer and workstation
cards, and beside Answer.AI's published runs of FSDP-QLoRA.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from qlora_lab.memory import MemoryEstimate, count_parameters, estimate, nf4_storage_bytes
from qlora_lab.support.model_config import ModelShape, ParameterCount, model_shape, read_model_config

__all__ = ["PUBLISHED", "PUBLISHED_SOURCES", "SETUPS", "estimate_per_gpu", "fits_table", "fsdp_per_gpu"]

#: (GPUs, GiB per GPU) of the table: two or four consumer cards, two workstation cards.
SETUPS = ((2, 24), (2, 48), (4, 24))

#: Answer.AI's published runs of FSDP-QLoRA: (model, GPUs, GiB) -> (batch, tokens, what they report).
PUBLISHED = {
    ("llama-2-70b", 2, 24): (2, 512, "trained (fsdp_qlora README): gradient checkpointing + CPU offload, "
                                     ">128 GB CPU RAM"),
    ("llama-2-70b", 4, 40): (2, 512, "trained (Answer.AI's README example, 4 x A100 40 GB): no CPU offload"),
}
PUBLISHED_SOURCES = (
    "Answer.AI, 'You can now train a 70b language model at home' (2024-03-06), "
    "https://www.answer.ai/posts/2024-03-06-fsdp-qlora.html; the command and the host RAM from "
    "https://github.com/AnswerDotAI/fsdp_qlora (README: 'Finetune Llama-2 70B on Dual 24GB GPUs' and "
    "'Example: Llama 70B 4-A100 40GB Training')",
)


def _check_gpus(world_size: Any) -> int:
    """``world_size`` if it is a positive int (not a bool), else a ValueError."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer (the number of GPUs), got {world_size!r}")
    return world_size


def fsdp_per_gpu(counts: ParameterCount, shape: ModelShape, method: str, world_size: int, *, weights: int,
                 adapters: int, gradients: int, optimizer: int, weight_bytes: int, blocksize: int = 64,
                 double_quant: bool = True) -> dict[str, int]:
    """One GPU's share of the model's state under FSDP over ``world_size``
    GPUs (chapter 09, :mod:`qlora_lab.beyond.fsdp`): 1/N of the weights, adapters,
    gradients and optimizer states, plus the units FSDP gathers whole while
    they compute: the root unit (embeddings, final norm, output head), whole
    for the entire step, and two decoder layers (the one running and the next,
    prefetched). ``"weights"`` includes the gathered bytes, also returned
    alone as ``"gathered"``. Activations are per GPU already (each GPU runs
    its own micro-batches)."""
    _check_gpus(world_size)
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


def estimate_per_gpu(config: Any, method: str, world_size: int, **estimate_kwargs) -> MemoryEstimate:
    """:func:`qlora_lab.memory.estimate` (``estimate_kwargs`` are its
    arguments) for one of ``world_size`` GPUs under FSDP: weights, adapters,
    gradients and optimizer states as :func:`fsdp_per_gpu` shares them, the
    activations unchanged. ``settings`` adds ``"world_size"`` and
    ``"gathered_bytes"``. One GPU shards nothing: ``world_size=1`` is the
    estimate itself."""
    _check_gpus(world_size)
    whole = estimate(config, method, **estimate_kwargs)
    if world_size == 1:
        return whole
    config = read_model_config(config)
    weight_dtype = getattr(torch, whole.settings["weight_dtype"].removeprefix("torch."))
    shared = fsdp_per_gpu(count_parameters(config), model_shape(config), whole.method, world_size,
                          weights=whole.weights, adapters=whole.adapters, gradients=whole.gradients,
                          optimizer=whole.optimizer, weight_bytes=weight_dtype.itemsize,
                          blocksize=whole.settings["blocksize"], double_quant=whole.settings["double_quant"])
    return dataclasses.replace(
        whole, weights=shared["weights"], adapters=shared["adapters"], gradients=shared["gradients"],
        optimizer=shared["optimizer"],
        settings={**whole.settings, "world_size": world_size, "gathered_bytes": shared["gathered"]})


def fits_table(models: tuple[str, ...] = ("llama-65b", "llama-2-70b"), setups=SETUPS, **estimate_kwargs) -> str:
    """One GPU's peak memory under FSDP-QLoRA (:func:`estimate_per_gpu`;
    default: the Guanaco recipe, batch 1 x 512 tokens) for each model and
    setup, the headroom left on the card (GiB), and Answer.AI's published run
    where there is one, estimated at its own batch."""

    def row(label: str, setup: str, e, gib: int, note: str = "") -> str:
        room = (gib * 2**30 - e.peak) / 1e9
        gathered = e.settings.get("gathered_bytes")
        return (f"{label:<13}{setup:>10}{e.peak / 1e9:>8.1f} GB"
                f"{'-' if gathered is None else f'{gathered / 1e9:.2f} GB':>11}{room:>+10.1f} GB  "
                f"{'yes' if room > 0 else 'no':>4}  {note}").rstrip()

    lines = [f"{'model':<13}{'GPUs':>10}{'per GPU':>11}{'gathered':>11}{'headroom':>13}  fits"]
    for name in models:
        lines.append(row(name, "1 x 48 GB", estimate(name, "qlora", **estimate_kwargs), 48))
        for n, gib in setups:
            lines.append(row("", f"{n} x {gib} GB", estimate_per_gpu(name, "qlora", n, **estimate_kwargs), gib))
        for (model, n, gib), (batch, tokens, note) in PUBLISHED.items():
            if model == name:
                e = estimate_per_gpu(name, "qlora", n, **{**estimate_kwargs, "batch": batch, "seq_len": tokens})
                lines.append(row("", f"{n} x {gib} GB", e, gib, f"batch {batch} x {tokens}: {note}"))
    return "\n".join(lines)
