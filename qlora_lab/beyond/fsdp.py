"""Beyond one GPU: QLoRA sharded with FSDP (appendix, chapter 09).

A 70B model in NF4 is about 35 GB of weights: more than one 24 GB card holds,
though two hold it easily. Fully Sharded Data Parallel (FSDP; Zhao et al.,
2023) gives each of N processes (one per GPU) 1/N of every parameter, of its
gradient and of its optimizer state. Before a layer runs forward (and again
before it runs backward) the processes *all-gather* its shards into the whole
layer, use it, and free it again; after backward they *reduce-scatter* the
gradients, so each process ends up with the summed gradient of its own shard
only, and the optimizer updates just that shard. At any moment a process holds
its shard of everything plus one whole layer. Meanwhile each process trains on
different micro-batches: FSDP is data parallelism with the memory of one model
spread over all the devices.

Two things make this work with 4-bit weights (Answer.AI's FSDP-QLoRA, 2024):

1. **The 4-bit weights must be parameters.** FSDP shards parameters; buffers
   are copied whole to every process. :class:`qlora_lab.qlora.LinearNF4` keeps
   its packed weight and per-block constants as buffers, so
   :func:`make_shardable` turns them into frozen parameters (``requires_grad``
   off). bitsandbytes faces the same problem with ``Params4bit`` and adds
   ``bnb_4bit_quant_storage``: FSDP's first version flattens all parameters of
   a unit into one tensor of one dtype, so the packed bytes had to be stored
   *as* that dtype (bfloat16 viewing the same bytes). PyTorch's FSDP2
   (``torch.distributed.fsdp.fully_shard``, used here) shards every parameter
   on its own as a ``DTensor``, so the packed ``uint8`` weight and its
   ``uint8`` (double-quantized) constants are sharded as they are.
2. **Shards should end on block boundaries.** FSDP cuts each tensor along its
   first dimension into N equal pieces. If the number of 64-weight blocks of
   every 4-bit weight is a multiple of N, rank r holds blocks
   ``[r B/N, (r+1) B/N)`` of the packed weight *and* exactly their constants:
   no padding, and every shard is a self-contained 4-bit tensor.
   :func:`check_world_size` refuses a world size for which that fails and
   names the ones that work.

:func:`shard_model` applies ``fully_shard`` to each decoder layer (the unit
that is gathered whole) and then to the whole model. The per-layer tables
(the 16-entry code, the 256-entry double-quantization code, the mean offset
and one float per 256 blocks) stay buffers: 4 bytes per 16,384 weights.

:func:`train_fsdp` runs :func:`qlora_lab.finetune.train.train`'s loop, the same code, with
:class:`Sharded` answering what differs for rank r of N: it runs under ``torchrun
--standalone --nproc_per_node N -m qlora_lab finetune --fsdp ...`` (gloo on CPUs, nccl on GPUs).
Step ``s`` consists of the same ``gradient_accumulation_steps`` micro-batches as in one process;
rank r takes every N-th of them, starting at r. Each micro-batch's loss is divided by the
labelled tokens of the whole step and multiplied by N, which FSDP's reduce-scatter (a mean over
the ranks) divides out again, so the summed gradient, the clipped norm and the update are those
of the single-process run, up to the order of float additions. The adapter is gathered and
written once, by rank 0, in peft's format (:mod:`qlora_lab.beyond.sharded_adapter`); checkpoints
are written by the same code as in one process (:func:`qlora_lab.support.resume.save_checkpoint`)
and hold the full (unsharded) optimizer state, so a run resumes with any world size that divides
the batch. What fits on how many GPUs is :mod:`qlora_lab.beyond.fits`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from qlora_lab.beyond import distributed
from qlora_lab.beyond.sharded_adapter import gathered_adapter, load_sharded_adapter, write_gathered
from qlora_lab.finetune import data as data_lib
from qlora_lab.finetune import train as train_lib
from qlora_lab.paging.state_bytes import optimizer_state_bytes
from qlora_lab.qlora import LinearNF4
from qlora_lab.support.counting import total_bytes
from qlora_lab.support.resume import ADAPTER_DIR, restore_rng_state, rng_state

__all__ = ["SHARDED_BUFFERS", "Sharded", "check_world_size", "make_shardable", "parameter_bytes", "shard_model",
           "train_fsdp", "valid_world_sizes"]

#: What FSDP shards of a :class:`LinearNF4`: the packed weight and its block constants.
SHARDED_BUFFERS = ("weight", "absmax", "absmax_indices")


def block_constants(layer: LinearNF4) -> torch.Tensor:
    """One constant per block: float32 ``absmax``, or uint8 ``absmax_indices`` (double quantization)."""
    return layer.absmax_indices if layer.double_quant else layer.absmax


# --------------------------------------------------------------------------- #
# 4-bit weights as parameters FSDP can shard
# --------------------------------------------------------------------------- #
def make_shardable(model: nn.Module) -> int:
    """Turn each :class:`LinearNF4`'s packed weight and block constants from
    buffers into frozen ``nn.Parameter``s (the same tensors, no copy), so that
    ``fully_shard`` shards them. Returns the number of layers changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, LinearNF4):
            for name in SHARDED_BUFFERS:
                if name in dict(module.named_buffers(recurse=False)):
                    tensor = getattr(module, name)
                    delattr(module, name)
                    module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
            changed += 1
    return changed


def valid_world_sizes(model: nn.Module, limit: int = 64) -> list[int]:
    """World sizes up to ``limit`` that split the blocks of every 4-bit weight evenly."""
    blocks = [block_constants(m).shape[0] for m in model.modules() if isinstance(m, LinearNF4)]
    common = math.gcd(*blocks) if blocks else 0
    return [n for n in range(1, limit + 1) if common % n == 0] if blocks else list(range(1, limit + 1))


def check_world_size(model: nn.Module, world_size: int, gradient_accumulation_steps: int = 1) -> None:
    """A ValueError unless ``world_size`` processes can shard ``model`` on
    block boundaries (see the module docstring) and share each step's
    ``gradient_accumulation_steps`` micro-batches equally."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"the world size must be a positive integer, got {world_size!r}")
    for name, module in model.named_modules():
        if isinstance(module, LinearNF4) and block_constants(module).shape[0] % world_size:
            raise ValueError(
                f"{world_size} processes cannot shard this model on block boundaries: {name} has "
                f"{block_constants(module).shape[0]} blocks of {module.blocksize} weights, not a multiple of {world_size}. "
                f"World sizes that work: {', '.join(map(str, valid_world_sizes(model)))}")
    if gradient_accumulation_steps % world_size:
        raise ValueError(
            f"each step's {gradient_accumulation_steps} micro-batches (gradient_accumulation_steps) cannot be "
            f"shared equally by {world_size} processes; make gradient_accumulation_steps a multiple of "
            f"{world_size} (e.g. --set gradient_accumulation_steps={world_size} with a batch_size "
            f"{world_size} times smaller keeps the effective batch)")


def shard_model(model: nn.Module, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` each decoder layer, then the whole model (embeddings,
    final norm, output head), in place. FSDP's reduce-scatter averages the
    gradients over the processes (gloo has no scaled sum to do otherwise), so
    :class:`Sharded` multiplies each loss by the world size before backward."""
    make_shardable(model)
    layer_types = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder-layer class (_no_split_modules); "
                         f"shard_model needs a transformers causal LM")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the parameters and buffers this process holds (``"local"``:
    its shards) and of the whole model (``"full"``), each tensor counted once."""
    tensors = [*model.parameters(), *model.buffers()]
    return {"local": total_bytes(tensors, local=True), "full": total_bytes(tensors)}


# --------------------------------------------------------------------------- #
# The loop, sharded: what rank r of N does differently
# --------------------------------------------------------------------------- #
class Sharded(train_lib.OneProcess):
    """:func:`qlora_lab.finetune.train.train`'s questions answered for rank
    ``r`` of ``N`` processes: the model sharded after it is built, every N-th
    micro-batch of a step, losses and token counts summed over the ranks, the
    adapter and the optimizer state gathered before rank 0 writes them."""

    backend = "qlora_lab"  # the course's LinearNF4, whose 4-bit tensors make_shardable turns into parameters

    def __init__(self, info: dict, device: torch.device):
        self.rank, self.world_size, self.dist_backend = info["rank"], info["world_size"], info["backend"]
        self.device = device
        self.writes = self.rank == 0
        self.full_bytes = self.rank_bytes = 0

    def label(self, backend: str) -> str:
        return f"{backend}+fsdp"

    def prepare(self, model, config) -> str:
        check_world_size(model, self.world_size, config.gradient_accumulation_steps)
        self.full_bytes = parameter_bytes(model)["full"]
        shard_model(model)
        self.rank_bytes = parameter_bytes(model)["local"]
        return (f"FSDP over {self.world_size} processes ({self.dist_backend}): {self.full_bytes / 1e6:.2f} MB of "
                f"parameters and buffers, {self.rank_bytes / 1e6:.2f} MB on rank 0")

    def my_share(self, batches: list) -> list:
        return batches[self.rank::self.world_size]  # check_world_size made the share equal

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.world_size).backward()  # FSDP averages the gradients over the ranks; the step needs their sum

    def sum(self, value: float) -> float:
        return distributed.all_reduce_sum(value)

    def norm(self, grad_norm: torch.Tensor) -> float:
        return float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)

    def adapter_writer(self, model, base_model: str) -> Callable[[Path], None]:
        full = gathered_adapter(model)  # a collective: every rank gathers, rank 0 writes
        return lambda path: write_gathered(model, full, path, base_model)

    def training_state(self, model, optimizer, scheduler) -> dict:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {"optimizer": get_optimizer_state_dict(model, optimizer, options=options),
                "scheduler": scheduler.state_dict(), "rng": distributed.gather_to_rank0(rng_state()),
                "world_size": self.world_size}

    def restore(self, model, optimizer, scheduler, checkpoint: Path, saved: dict) -> None:
        load_sharded_adapter(model, checkpoint / ADAPTER_DIR)
        set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(saved["scheduler"])
        rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]  # one process's checkpoint: one
        restore_rng_state(rngs[self.rank] if len(rngs) == self.world_size else rngs[0])

    def barrier(self) -> None:
        dist.barrier()

    def metrics(self, model, optimizer, device: torch.device) -> dict:
        ranks = distributed.gather_to_rank0({"parameter_bytes": self.rank_bytes,
                                             "optimizer_state_bytes": optimizer_state_bytes(optimizer)})
        return {"world_size": self.world_size, "dist_backend": self.dist_backend,
                "full_parameter_bytes": self.full_bytes, "ranks": ranks}


def train_fsdp(config, out_dir: str | os.PathLike, *, resume: bool = False, progress: str = "log",
               dist_backend: str = "auto", splits: dict | None = None) -> train_lib.TrainResult:
    """:func:`qlora_lab.finetune.train.train` under FSDP, in a process started by
    torchrun (see the module docstring). Every rank returns the same
    :class:`qlora_lab.finetune.train.TrainResult`; rank 0 writes the checkpoints, the
    adapter and ``metrics.json`` (which adds each rank's parameter and
    optimizer-state bytes, measured)."""
    config.validate()
    if config.backend == "bitsandbytes":
        raise ValueError("--fsdp shards the course's 4-bit layers (--backend qlora_lab); bitsandbytes' Linear4bit "
                         "needs bnb_4bit_quant_storage and accelerate's FSDP wrapper instead (see chapter 09)")
    if config.method != "qlora":
        raise ValueError(f"--fsdp is built for method qlora, got {config.method!r}")
    if config.score_examples:
        raise ValueError("--fsdp does not score generations (--score): generation would have to run in lock-step "
                         "on every rank; score the saved adapter afterwards with one process")
    distributed.check_environment()  # before anything is loaded
    distributed.choose_backend(dist_backend)
    if splits is None:
        splits = data_lib.load_dataset(config.data, splits=("train", "validation"))
    with distributed.process_group(dist_backend) as (info, device):
        return train_lib.train(config, out_dir, resume=resume, splits=splits, progress=progress,
                               processes=Sharded(info, device))
