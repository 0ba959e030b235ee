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

:func:`train_fsdp` is :func:`qlora_lab.finetune.train.train`'s loop, sharded: it runs under ``torchrun
--standalone --nproc_per_node N -m qlora_lab finetune --fsdp ...`` (gloo on CPUs, nccl on GPUs).
Step ``s`` consists of the same ``gradient_accumulation_steps`` micro-batches as in one process;
rank r takes every N-th of them, starting at r. Each micro-batch's loss is divided by the
labelled tokens of the whole step and multiplied by N, which FSDP's reduce-scatter (a mean over
the ranks) divides out again, so the summed gradient, the clipped norm and the update are those
of the single-process run, up to the order of float additions. The adapter is gathered and
written once, by rank 0, in peft's format; checkpoints hold the full (unsharded) optimizer
state, so a run resumes with any world size that divides the batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from qlora_lab.beyond import distributed
from qlora_lab.fast.loss import causal_lm_loss
from qlora_lab.finetune import data as data_lib
from qlora_lab.finetune import evaluate
from qlora_lab.finetune import train as train_lib
from qlora_lab.lora import WEIGHTS_NAME, lora_modules, save_adapter
from qlora_lab.lora.peft_format import KEY_PREFIX
from qlora_lab.qlora import LinearNF4
from qlora_lab.support import resume as resume_lib

__all__ = ["SHARDED_BUFFERS", "check_world_size", "make_shardable", "parameter_bytes", "shard_model",
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
    :func:`train_fsdp` multiplies each loss by the world size before backward."""
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
    local = full = 0
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = tensor.element_size()
        if isinstance(tensor, DTensor):
            local += tensor.to_local().numel() * size
        else:
            local += tensor.numel() * size
        full += tensor.numel() * size
    return {"local": local, "full": full}


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                value = value.to_local() if isinstance(value, DTensor) else value
                total += value.numel() * value.element_size()
    return total


# --------------------------------------------------------------------------- #
# The adapter and checkpoints: gathered, written once
# --------------------------------------------------------------------------- #
def _gathered_adapter(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA matrix whole, on the CPU (a collective: all ranks call it)."""
    out = {}
    for name, layer in lora_modules(model).items():
        for which in ("A", "B"):
            p = getattr(layer, f"lora_{which}")
            out[f"{name}.lora_{which}"] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
    return out


def save_sharded_adapter(model: nn.Module, path: str | os.PathLike | None, base_model: str | None) -> None:
    """Gather the adapter from every rank; rank 0 writes it to ``path`` (the
    other ranks may pass None) in peft's format
    with :func:`qlora_lab.lora.save_adapter` (the whole matrices swapped in
    for the shards while it writes)."""
    full = _gathered_adapter(model)
    if dist.get_rank() == 0:
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


def _save_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler, state: dict, config) -> None:
    """``checkpoint-<step>`` as :func:`qlora_lab.finetune.train.save_checkpoint` writes
    it (adapter, ``training_state.pt``, trainer state last, one rename), with
    the optimizer state gathered whole and every rank's random state."""
    final = out_dir / f"{resume_lib.CHECKPOINT_PREFIX}{step}"
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
    rng = distributed.gather_to_rank0({"torch": torch.get_rng_state(), "python": random.getstate()})
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=out_dir)) if dist.get_rank() == 0 else None
    save_sharded_adapter(model, staging / resume_lib.ADAPTER_DIR if staging else None, config.model)
    if dist.get_rank() == 0:
        torch.save({"optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rng,
                    "world_size": dist.get_world_size()}, staging / "training_state.pt")
        (staging / resume_lib.TRAINER_STATE).write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        found = sorted(out_dir.glob(f"{resume_lib.CHECKPOINT_PREFIX}*"), key=lambda p: int(p.name.split("-")[-1]))
        for old in found[:-config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


# --------------------------------------------------------------------------- #
# The loop, sharded
# --------------------------------------------------------------------------- #
def train_fsdp(config, out_dir: str | os.PathLike, *, resume: bool = False, progress: str = "log",
               dist_backend: str = "auto", splits: dict | None = None) -> train_lib.TrainResult | None:
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
    if progress not in ("bar", "log", "none"):
        raise ValueError(f"progress must be 'bar', 'log' or 'none', got {progress!r}")
    info = distributed.check_environment()  # before anything is loaded
    distributed.choose_backend(dist_backend)
    out_dir = Path(out_dir)
    if resume and resume_lib.latest_checkpoint(out_dir) is None:
        raise FileNotFoundError(f"--resume: there is no complete checkpoint in {out_dir}; start without --resume")
    if not resume and (resume_lib.latest_checkpoint(out_dir) or (out_dir / resume_lib.ADAPTER_DIR).exists()):
        raise FileExistsError(f"{out_dir} already holds a run (checkpoints or a final adapter); pass --resume to "
                              f"continue it, or choose another output directory")
    if splits is None:
        splits = data_lib.load_dataset(config.data, splits=("train", "validation"))
    with distributed.process_group(dist_backend) as (info, device):
        return _train_loop(config, out_dir, resume, progress, splits, info, device)


def _train_loop(config, out_dir: Path, resume: bool, progress: str, splits: dict, info: dict,
                device: torch.device) -> train_lib.TrainResult:
    rank, world = info["rank"], info["world_size"]
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model, tokenizer = train_lib.build_model(config, device, backend="qlora_lab")
    check_world_size(model, world, config.gradient_accumulation_steps)
    full_bytes = parameter_bytes(model)["full"]
    shard_model(model)
    rank_bytes = parameter_bytes(model)["local"]
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    train_examples, report = data_lib.tokenize_records(splits["train"], tokenizer, config.max_length)
    if not train_examples:
        raise ValueError(f"no training example survives tokenization ({report})")
    eval_examples, _ = data_lib.tokenize_records(splits.get("validation", [])[: config.eval_examples], tokenizer,
                                                 config.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else data_lib.end_of_turn_id(tokenizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = train_lib.build_optimizer(config, trainable, device)
    scheduler = train_lib.constant_schedule_with_warmup(optimizer, config.warmup_steps)
    schedule = train_lib.BatchSchedule([len(e["input_ids"]) for e in train_examples], config.batch_size,
                                       config.seed, config.group_by_length)
    result = train_lib.TrainResult(config=config, backend="qlora_lab+fsdp")
    state = {"step": 0, "history": [], "evaluations": [], "config": dataclasses.asdict(config)}
    found = resume_lib.newest_intact_checkpoint(out_dir) if resume else None  # every file read back, damage named
    if found is not None:
        checkpoint, saved, state = found
        load_sharded_adapter(model, checkpoint / resume_lib.ADAPTER_DIR)
        set_optimizer_state_dict(model, optimizer, saved["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(saved["scheduler"])
        rng = saved["rng"][rank] if len(saved["rng"]) == world else saved["rng"][0]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        result.resumed_from = state["step"]

    def say(text: str) -> None:
        if rank == 0 and progress != "none":
            print(text, flush=True)

    def run_evaluation(step: int) -> None:
        # Every rank runs the same evaluation (FSDP gathers each layer on all
        # ranks together), so every rank gets the same number.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            entry = {"step": step}
            if eval_examples:
                entry["eval_loss"] = evaluate.evaluation_loss(model, eval_examples, pad_id, config.eval_batch_size)
        state["evaluations"].append(entry)
        say(f"eval at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if k != "step"))

    say(f"FSDP over {world} processes ({info['backend']}): {full_bytes / 1e6:.2f} MB of parameters and buffers, "
        f"{rank_bytes / 1e6:.2f} MB on rank 0")
    if state["step"] == 0:
        run_evaluation(0)
    model.train()
    started = time.perf_counter()
    per_rank = config.gradient_accumulation_steps // world
    for step in range(state["step"] + 1, config.max_steps + 1):
        step_start = time.perf_counter()
        micro = [schedule[(step - 1) * config.gradient_accumulation_steps + i]
                 for i in range(config.gradient_accumulation_steps)]
        batches = [data_lib.collate([train_examples[j] for j in idx], pad_id) for idx in micro]
        n_labelled = sum(evaluate.labelled_tokens(b["labels"]) for b in batches)  # the whole step's
        mine = batches[rank::world]
        assert len(mine) == per_rank
        local_loss, tokens = 0.0, 0
        for batch in mine:
            tokens += int(batch["attention_mask"].sum())
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = causal_lm_loss(model, **batch, num_items_in_batch=n_labelled)
            (loss * world).backward()  # FSDP averages over ranks; the step needs the sum
            local_loss += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = distributed.all_reduce_sum(local_loss)
        tokens = int(distributed.all_reduce_sum(float(tokens)))
        seconds = time.perf_counter() - step_start
        entry = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens,
                 "seconds": seconds}
        state["history"].append(entry)
        state["step"] = step
        if step % config.eval_every == 0 or step == config.max_steps:
            say(f"step {step:>5}/{config.max_steps}  loss {step_loss:.4f}  lr {lr:.2e}  "
                f"{tokens / seconds:,.0f} tokens/s")
            run_evaluation(step)
        if step % config.save_every == 0 and step < config.max_steps:
            _save_checkpoint(out_dir, step, model, optimizer, scheduler, state, config)

    result.adapter_dir = out_dir / resume_lib.ADAPTER_DIR
    save_sharded_adapter(model, result.adapter_dir if rank == 0 else None, config.model)
    memory = distributed.gather_to_rank0({"parameter_bytes": rank_bytes,
                                          "optimizer_state_bytes": _optimizer_state_bytes(optimizer)})
    if rank == 0:
        metrics = {"config": dataclasses.asdict(config), "history": state["history"],
                   "evaluations": state["evaluations"], "backend": result.backend, "world_size": world,
                   "dist_backend": info["backend"], "full_parameter_bytes": full_bytes, "ranks": memory}
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    dist.barrier()
    result.history, result.evaluations = state["history"], state["evaluations"]
    result.seconds = time.perf_counter() - started
    result.model, result.tokenizer = model, tokenizer
    return result


# --------------------------------------------------------------------------- #
# What fits: the estimate of chapter 03 per GPU
# --------------------------------------------------------------------------- #
#: (GPUs, GiB per GPU) of the table: two or four consumer cards, two workstation cards.
SETUPS = ((2, 24), (2, 48), (4, 24))

#: Answer.AI's published runs of FSDP-QLoRA: (model, GPUs, GiB) -> (batch, tokens, what they report).
PUBLISHED = {
    ("llama-2-70b", 2, 24): (2, 2048, "trained (Answer.AI): gradient checkpointing + CPU offload, ~55 GB host RAM"),
    ("llama-2-70b", 4, 40): (2, 512, "trained (Answer.AI's README example, 4 x A100 40 GB): no CPU offload"),
}
PUBLISHED_SOURCES = (
    "Answer.AI, 'You can now train a 70b language model at home' (2024-03-06), "
    "https://www.answer.ai/posts/2024-03-06-fsdp-qlora.html; the command and the host RAM from "
    "https://github.com/AnswerDotAI/fsdp_qlora (README: 'Finetune Llama-2 70B on Dual 24GB GPUs' and "
    "'Example: Llama 70B 4-A100 40GB Training')",
)


def fits_table(models: tuple[str, ...] = ("llama-65b", "llama-2-70b"), setups=SETUPS, **estimate_kwargs) -> str:
    """One GPU's peak memory under FSDP-QLoRA (:func:`qlora_lab.memory.estimate`
    with ``world_size``; default: the Guanaco recipe, batch 1 x 512 tokens)
    for each model and setup, the headroom left on the card (GiB), and
    Answer.AI's published run where there is one, estimated at its own batch."""
    from qlora_lab.memory import estimate

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
            lines.append(row("", f"{n} x {gib} GB", estimate(name, "qlora", world_size=n, **estimate_kwargs), gib))
        for (model, n, gib), (batch, tokens, note) in PUBLISHED.items():
            if model == name:
                e = estimate(name, "qlora", world_size=n, **{**estimate_kwargs, "batch": batch, "seq_len": tokens})
                lines.append(row("", f"{n} x {gib} GB", e, gib, f"batch {batch} x {tokens}: {note}"))
    return "\n".join(lines)
