"""The Guanaco recipe as a training loop (QLoRA, Sec. 5 and Appendix B).

What one optimizer step does (:func:`train`):

1. ``gradient_accumulation_steps`` micro-batches go forward and backward;
   each adds its summed token loss divided by the number of labelled tokens
   in the *whole* accumulated batch, so the step sees the mean loss per
   labelled token however the batch was split;
2. the gradient norm of the adapters is clipped to ``max_grad_norm`` (0.3 in
   the recipe: small, because adapter gradients come in bursts);
3. the optimizer steps (paged AdamW 32-bit from bitsandbytes on CUDA, as in the
   paper; on CPU torch's AdamW, or the course's own paged AdamW of chapter 06);
4. the learning rate follows a constant schedule after a linear warmup.

Around the steps: evaluation (validation loss, and optionally the exact-match
score of the scored tasks, both from :mod:`qlora_lab.finetune.evaluate`) before
training, every ``eval_every`` steps and at the end; a checkpoint every
``save_every`` steps, written all at once (:mod:`qlora_lab.support.resume`), so
a run that is killed loses at most the steps since its last checkpoint; and
``resume=True`` continues from the newest checkpoint to the same final
adapter, bit for bit on CPU, as a run that was never interrupted. That works
because everything random is either restored (the random number generators,
saved in the checkpoint) or a pure function of the step (the order of the
batches, computed from the seed and the epoch: :class:`BatchSchedule`).

The settings come from :mod:`qlora_lab.finetune.recipe` (``train.preset(...)``), the
data from :mod:`qlora_lab.finetune.hub_data`, the parts of a step from
:mod:`qlora_lab.finetune.step`. The same code runs SmolLM2 on a laptop CPU and
a 7B model on one GPU: only the device decides a code path (compute dtype,
optimizer, and the backend: :mod:`qlora_lab.finetune.backends`).

The loop is written once. What differs when it runs in N processes under
FSDP (chapter 09) is asked of a ``processes`` object: :class:`OneProcess` here,
:class:`qlora_lab.beyond.fsdp.Sharded` there, which takes its share of the
micro-batches, sums losses over the processes, gathers the adapter before it
is written and lets one process write.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from qlora_lab.fast.loss import causal_lm_loss
from qlora_lab.finetune import adapter_files, backends, batching, chat_format, evaluate, hub_data
from qlora_lab.finetune.recipe import PRESETS, TrainConfig, preset  # the run's settings; train.preset(...) is the usual call
from qlora_lab.finetune.step import (BatchSchedule, build_model, build_optimizer, compute_dtype_for,
                                     constant_schedule_with_warmup, load_optimizer_state, paged_states, preflight,
                                     PreflightWarning, resolve_device)
from qlora_lab.support.resume import (ADAPTER_DIR, checkpoints, newest_intact_checkpoint, restore_rng_state, rng_state,
                                      save_checkpoint)

__all__ = ["PRESETS", "OneProcess", "TrainConfig", "TrainResult", "BatchSchedule", "build_model", "build_optimizer",
           "compute_dtype_for", "constant_schedule_with_warmup", "preset", "PreflightWarning", "resolve_device", "train"]


# --------------------------------------------------------------------------- #
# One process, or N: what the loop asks of them
# --------------------------------------------------------------------------- #
class OneProcess:
    """The loop run by one process: it takes every micro-batch and writes every
    file. :class:`qlora_lab.beyond.fsdp.Sharded` answers the same questions
    for N processes."""

    writes = True  # this process writes checkpoints, the adapter and metrics.json
    device: torch.device | None = None  # None: the config's (CUDA when there is one)
    backend: str | None = None  # None: the config's backend, resolved for the device

    def label(self, backend: str) -> str:
        return backend

    def prepare(self, model, config: TrainConfig) -> str | None:
        """Called once the model is built; returns a line to print, if any."""
        return None

    def my_share(self, batches: list) -> list:
        return batches

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def sum(self, value: float) -> float:
        return value

    def norm(self, grad_norm: torch.Tensor) -> float:
        return float(grad_norm)

    def adapter_writer(self, model, base_model: str) -> Callable[[Path], None]:
        return lambda path: adapter_files.save_adapter(model, path, base_model_name_or_path=base_model, overwrite=True)

    def training_state(self, model, optimizer, scheduler) -> dict:
        return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}

    def restore(self, model, optimizer, scheduler, checkpoint: Path, saved: dict) -> None:
        adapter_files.load_adapter(model, checkpoint / ADAPTER_DIR)
        load_optimizer_state(optimizer, saved["optimizer"])  # bitsandbytes' paged states paged again
        scheduler.load_state_dict(saved["scheduler"])
        restore_rng_state(saved["rng"])

    def barrier(self) -> None:
        pass

    def metrics(self, model, optimizer, device: torch.device) -> dict:
        if device.type != "cuda":
            return {}
        # PyTorch's allocations only: bitsandbytes' paged states are in unified memory (see gpu-smoke)
        free, total = torch.cuda.mem_get_info(device)
        return {"peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated(device),
                "gpu_used_bytes_at_end": total - free, **paged_states(optimizer)}


# --------------------------------------------------------------------------- #
# The loop
# --------------------------------------------------------------------------- #
@dataclass
class TrainResult:
    """What a run did: the per-step history, the evaluations, where the adapter is."""

    config: TrainConfig
    backend: str = "qlora_lab"
    history: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)
    adapter_dir: Path | None = None
    resumed_from: int = 0
    seconds: float = 0.0
    data: str = ""
    epochs: float = 0.0
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)

    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]


def train(config: TrainConfig, out_dir: str | os.PathLike, *, resume: bool = False, model=None, tokenizer=None,
          splits: dict[str, list[dict]] | None = None, progress: str = "bar",
          on_evaluation: Callable[[dict], None] | None = None,
          on_step: Callable[[dict], None] | None = None, processes: OneProcess | None = None) -> TrainResult:
    """Finetune with ``config``; write checkpoints and the final adapter under
    ``out_dir``. See the module docstring for the step.

    ``model``/``tokenizer``: a loaded base model (not yet quantized or adapted)
    instead of ``config.model``; ``splits``: ``{"train": records, "validation": records}``
    instead of ``config.data``.
    ``progress``: ``"bar"`` (tqdm, with loss and tokens/s), ``"log"`` (one line
    per evaluation) or ``"none"``. ``resume``: continue from the newest
    checkpoint in ``out_dir`` (an error if there is none). ``on_evaluation`` and
    ``on_step`` are called with each evaluation's and each step's record
    (after the step's checkpoint, if any, is written). ``processes``: who runs
    the loop, :class:`OneProcess` by default; the same loop sharded over
    several processes is :func:`qlora_lab.beyond.fsdp.train_fsdp` (chapter 09).
    """
    config.validate()
    if progress not in ("bar", "log", "none"):
        raise ValueError(f"progress must be 'bar', 'log' or 'none', got {progress!r}")
    processes = processes or OneProcess()
    out_dir = Path(out_dir)
    found = None  # (checkpoint, training state, trainer state), every file read back before the run trusts it
    if resume:
        found = newest_intact_checkpoint(out_dir)
        if found is None:
            raise FileNotFoundError(f"--resume: there is no complete checkpoint in {out_dir}; start without --resume")
    elif out_dir.exists() and (checkpoints(out_dir) or (out_dir / ADAPTER_DIR).exists()):
        raise FileExistsError(f"{out_dir} already holds a run (checkpoints or a final adapter); pass resume=True "
                              f"(--resume) to continue it, or choose another output directory")
    device = processes.device or resolve_device(config)
    backend = processes.backend or backends.resolve_backend(config.backend, device, model_given=model is not None)
    backends.check_backend(config, backend)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = processes.writes and progress != "none"

    # Data first: a malformed line must stop the run before the model is loaded.
    splits, data_read = (hub_data.load_splits(config.data, config.data_format) if splits is None
                         else (splits, hub_data.describe("given in memory", splits)))
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model, tokenizer = build_model(config, device, model, tokenizer, backend=backend)
    note = processes.prepare(model, config)
    eot_id = chat_format.end_of_turn_id(tokenizer, config.end_of_turn)
    train_examples, report = chat_format.tokenize_records(splits["train"], tokenizer, config.max_length, eot_id,
                                                          config.train_on)
    epochs = preflight(config, train_examples, report, tokenizer, eot_id)  # warnings, each with its fix
    eval_records = splits.get("validation", [])[: config.eval_examples]
    eval_examples, _ = chat_format.tokenize_records(eval_records, tokenizer, config.max_length, eot_id,
                                                    config.train_on)
    score_records = evaluate.scored_records(splits.get("validation", []))[: config.score_examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot_id

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(config, trainable, device)
    scheduler = constant_schedule_with_warmup(optimizer, config.warmup_steps)
    schedule = BatchSchedule([len(e["input_ids"]) for e in train_examples], config.batch_size, config.seed,
                             config.group_by_length)
    result = TrainResult(config=config, backend=processes.label(backend), data=data_read, epochs=epochs)
    state = {"step": 0, "history": [], "evaluations": [], "config": dataclasses.asdict(config)}

    if found is not None:
        checkpoint, saved, state = found
        processes.restore(model, optimizer, scheduler, checkpoint, saved)
        result.resumed_from = state["step"]

    def run_evaluation(step: int) -> None:
        # Evaluation must not disturb the training's random stream (resume
        # restores the stream as it is after the evaluation). Under FSDP every
        # process runs it (each layer is gathered on all of them together).
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            entry = {"step": step}
            if eval_examples:
                entry["eval_loss"] = evaluate.evaluation_loss(model, eval_examples, pad_id, config.eval_batch_size)
            if score_records:
                scored = evaluate.score(model, tokenizer, score_records, config.max_new_tokens,
                                        config.eval_batch_size)
                entry["exact_match"] = scored.accuracy
        state["evaluations"].append(entry)
        if on_evaluation is not None:
            on_evaluation(entry)
        if say and progress == "log":
            parts = [f"{k} {v:.4f}" for k, v in entry.items() if k != "step"]
            print(f"eval at step {step}: " + ", ".join(parts), flush=True)

    if note and say:
        print(note, flush=True)
    bar = None
    if progress == "bar" and processes.writes:
        bar = tqdm(total=config.max_steps, initial=state["step"], desc="finetune", unit="step",
                   dynamic_ncols=True, file=sys.stderr)
    if state["step"] == 0:
        run_evaluation(0)

    model.train()
    started = time.perf_counter()
    for step in range(state["step"] + 1, config.max_steps + 1):
        step_start = time.perf_counter()
        micro = [schedule[(step - 1) * config.gradient_accumulation_steps + i]
                 for i in range(config.gradient_accumulation_steps)]
        batches = [batching.collate([train_examples[j] for j in idx], pad_id) for idx in micro]
        n_labelled = sum(evaluate.labelled_tokens(b["labels"]) for b in batches)  # the whole step's
        step_loss, tokens = 0.0, 0
        for batch in processes.my_share(batches):
            tokens += int(batch["attention_mask"].sum())
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = causal_lm_loss(model, **batch, num_items_in_batch=n_labelled)
            processes.backward(loss)
            step_loss += loss.item()
        grad_norm = processes.norm(torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss, tokens = processes.sum(step_loss), int(processes.sum(float(tokens)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels run asynchronously: the step ends when they do
        seconds = time.perf_counter() - step_start
        entry = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                 "tokens": tokens, "seconds": seconds}
        state["history"].append(entry)
        state["step"] = step
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens / seconds:,.0f}")
        elif say and progress == "log" and (step % config.eval_every == 0 or step == config.max_steps):
            print(f"step {step:>5}/{config.max_steps}  loss {step_loss:.4f}  lr {lr:.2e}  "
                  f"{tokens / seconds:,.0f} tokens/s", flush=True)
        if step % config.eval_every == 0 or step == config.max_steps:
            run_evaluation(step)
        if step % config.save_every == 0 and step < config.max_steps:
            write_adapter = processes.adapter_writer(model, config.model)  # under FSDP: every process gathers
            training_state = processes.training_state(model, optimizer, scheduler)
            if processes.writes:
                save_checkpoint(out_dir, step, write_adapter, training_state, state, config.keep_checkpoints)
            processes.barrier()
        if on_step is not None:
            on_step(entry)
    if bar is not None:
        bar.close()

    result.adapter_dir = out_dir / ADAPTER_DIR
    write_adapter = processes.adapter_writer(model, config.model)
    metrics = {"config": dataclasses.asdict(config), "history": state["history"],
               "evaluations": state["evaluations"], "backend": result.backend,
               **processes.metrics(model, optimizer, device)}
    if processes.writes:
        write_adapter(result.adapter_dir)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    processes.barrier()
    result.history, result.evaluations = state["history"], state["evaluations"]
    result.seconds = time.perf_counter() - started
    result.model, result.tokenizer = model, tokenizer
    return result
