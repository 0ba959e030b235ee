"""The adapter of a sharded run (appendix, chapter 09): under FSDP each rank holds
a shard of every LoRA matrix (:mod:`qlora_lab.beyond.fsdp`). To write the
adapter, every rank gathers the matrices whole (:func:`gathered_adapter`, a
collective) and rank 0 writes them in peft's format with
:func:`qlora_lab.lora.save_adapter` itself (:func:`write_gathered`); to resume,
:func:`load_sharded_adapter` reads the file and gives each rank its shard back.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from qlora_lab.lora import WEIGHTS_NAME, lora_modules, save_adapter
from qlora_lab.lora.peft_format import KEY_PREFIX

__all__ = ["gathered_adapter", "load_sharded_adapter", "save_sharded_adapter", "write_gathered"]


def gathered_adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA matrix whole, on the CPU (a collective: all ranks call it)."""
    out = {}
    for name, layer in lora_modules(model).items():
        for which in ("A", "B"):
            p = getattr(layer, f"lora_{which}")
            out[f"{name}.lora_{which}"] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
    return out


def write_gathered(model: nn.Module, full: dict[str, torch.Tensor], path: str | os.PathLike,
                   base_model: str | None) -> None:
    """Write the gathered matrices in peft's format with
    :func:`qlora_lab.lora.save_adapter` (swapped in for the shards while it writes)."""
    layers = lora_modules(model)
    sharded = {key: getattr(layers[key.rsplit(".", 1)[0]], key.rsplit(".", 1)[1]) for key in full}
    try:
        for key, tensor in full.items():
            module_name, attr = key.rsplit(".", 1)
            setattr(layers[module_name], attr, nn.Parameter(tensor, requires_grad=False))
        save_adapter(model, path, base_model_name_or_path=base_model, overwrite=True)
    finally:
        for key, param in sharded.items():
            module_name, attr = key.rsplit(".", 1)
            setattr(layers[module_name], attr, param)


def save_sharded_adapter(model: nn.Module, path: str | os.PathLike | None, base_model: str | None) -> None:
    """Gather the adapter from every rank; rank 0 writes it to ``path`` (the
    other ranks may pass None) in peft's format."""
    full = gathered_adapter(model)
    if dist.get_rank() == 0:
        write_gathered(model, full, path, base_model)
    dist.barrier()


@torch.no_grad()
def load_sharded_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Read an adapter written by :func:`save_sharded_adapter` and give each
    rank its shard of every matrix."""
    from safetensors.torch import load_file

    state = load_file(str(Path(path) / WEIGHTS_NAME))
    for name, layer in lora_modules(model).items():
        for which in ("A", "B"):
            key = f"{KEY_PREFIX}{name}.lora_{which}.weight"
            if key not in state:
                raise ValueError(f"{path} has no {key!r}: it is not this run's adapter")
            p = getattr(layer, f"lora_{which}")
            value = state[key].to(p.dtype)
            p.copy_(distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
                    if isinstance(p, DTensor) else value)
