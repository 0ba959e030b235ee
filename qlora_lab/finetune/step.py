"""What a training step is made of, before the loop puts it together
(chapter 07; the loop is :mod:`qlora_lab.finetune.train`).

1. The device: CUDA when there is one; the 7B presets refuse a machine without.
2. The model: loaded, quantized, given adapters by the run's backend
   (:mod:`qlora_lab.finetune.backends`).
3. The optimizer: bitsandbytes' paged AdamW 32-bit on CUDA, as in the paper;
   on a CPU torch's AdamW, or the course's paged AdamW of chapter 06.
4. The learning rate: constant after a linear warmup.
5. The order of the batches: a pure function of the seed and the micro-batch's
   index (:class:`BatchSchedule`), so that nothing about it needs saving in a
   checkpoint and a resumed run sees the batches an uninterrupted one would.
6. How often the run sees each example (:func:`epochs_of`, which :func:`train`
   calls: a warning above :data:`MANY_EPOCHS`), and further checks of the
   tokenized examples (:func:`preflight`: whether they teach the model to stop,
   how many lost their end to truncation, whether the model had a chat
   template), not yet called by the loop.
"""

from __future__ import annotations

import warnings

import torch

from qlora_lab.finetune import batching
from qlora_lab.finetune.recipe import TrainConfig

__all__ = ["BatchSchedule", "build_model", "build_optimizer", "compute_dtype_for", "constant_schedule_with_warmup",
           "epochs_of", "load_optimizer_state", "paged_states", "preflight", "PreflightWarning",
           "resolve_device"]


# --------------------------------------------------------------------------- #
# Device, model, optimizer
# --------------------------------------------------------------------------- #
def resolve_device(config: TrainConfig) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if config.requires_gpu:
        raise RuntimeError(
            "This preset is the 7B recipe and needs a CUDA GPU (bfloat16 compute and bitsandbytes' paged "
            "AdamW); this machine has none. Run it with --dry-run to see the configuration and the memory "
            "estimate, or use --preset smollm2-cpu.")
    return torch.device("cpu")


def compute_dtype_for(config: TrainConfig, device: torch.device) -> torch.dtype:
    from qlora_lab.finetune.backends import compute_dtype

    return compute_dtype(config, device)


def build_model(config: TrainConfig, device: torch.device, model=None, tokenizer=None, backend: str | None = None):
    """Load (unless given), quantize (for ``qlora``), add LoRA adapters, and
    switch on gradient checkpointing with the run's backend
    (:func:`qlora_lab.finetune.backends.build_model`): ``(model, tokenizer)``."""
    from qlora_lab.finetune import backends

    backend = backend or backends.resolve_backend(config.backend, device, model_given=model is not None)
    built = backends.build_model(config, device, backend, model, tokenizer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the peak a run reports is its steps', not the load's
    return built


def build_optimizer(config: TrainConfig, params: list[torch.Tensor], device: torch.device):
    name = config.optimizer
    if name == "auto":
        name = "paged_adamw_32bit" if device.type == "cuda" else "adamw"
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                  weight_decay=config.weight_decay)
    if name == "paged_adamw_32bit":
        if device.type != "cuda":
            raise ValueError("optimizer paged_adamw_32bit is bitsandbytes' paged AdamW, which pages through CUDA "
                             "unified memory; on a CPU choose adamw (torch) or paged_adamw (the course's, chapter 06)")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW32bit(params, **kwargs)
    if name == "paged_adamw":
        from qlora_lab.paging.paged_adamw import PagedAdamW

        return PagedAdamW(params, page_bytes=1 << 20, **kwargs)
    return torch.optim.AdamW(params, foreach=False, **kwargs)


def load_optimizer_state(optimizer, state_dict: dict) -> int:
    """``optimizer.load_state_dict(state_dict)``, then, for bitsandbytes' paged
    optimizers, each large state tensor put back in paged memory. bitsandbytes
    allocates a state of 100,000 elements or more in CUDA unified memory
    (``get_state_buffer``), which is what lets it page; its ``load_state_dict``
    and ``to_gpu`` bring the loaded states back as ordinary device tensors, so
    a resumed run would hold all of them in GPU memory. Returns how many were
    put back (0 for every other optimizer, and on a CPU, where nothing pages)."""
    optimizer.load_state_dict(state_dict)
    if not getattr(optimizer, "is_paged", False):
        return 0
    import bitsandbytes.functional as F

    paged = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in list(state.items()):
                if (p.device.type != "cpu" and torch.is_tensor(value) and value.numel() >= 1e5
                        and not getattr(value, "is_paged", False)):
                    buffer = F.get_paged(*value.shape, dtype=value.dtype, device=p.device)
                    buffer.copy_(value)
                    optimizer.page_mng.paged_tensors.append(buffer)
                    state[key] = buffer
                    paged += 1
    return paged


def paged_states(optimizer) -> dict:
    """How many of the optimizer's state tensors there are, and how many are
    paged (bitsandbytes' paged optimizers mark theirs ``is_paged``)."""
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return {"optimizer_state_tensors": len(states),
            "optimizer_state_tensors_paged": sum(bool(getattr(t, "is_paged", False)) for t in states)}


def constant_schedule_with_warmup(optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate ``lr * min(1, step / warmup_steps)``: a linear warmup from
    0, then constant (transformers' ``constant_with_warmup``)."""
    def factor(step: int) -> float:
        return min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- #
# Data order: a pure function of (seed, micro-batch index)
# --------------------------------------------------------------------------- #
class BatchSchedule:
    """Micro-batch ``k`` of the run is batch ``k % n`` of epoch ``k // n``, where
    epoch ``e`` is ordered by :func:`qlora_lab.finetune.batching.make_batches` with seed
    ``seed + e``. Nothing about the data order needs saving in a checkpoint."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool):
        self.lengths, self.batch_size, self.seed, self.group_by_length = lengths, batch_size, seed, group_by_length
        self._epoch, self._batches = -1, []
        self.per_epoch = len(self._epoch_batches(0))

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            self._batches = batching.make_batches(self.lengths, self.batch_size, self.seed + epoch,
                                                  self.group_by_length)
            self._epoch = epoch
        return self._batches

    def __getitem__(self, k: int) -> list[int]:
        return self._epoch_batches(k // self.per_epoch)[k % self.per_epoch]


# --------------------------------------------------------------------------- #
# Epochs
# --------------------------------------------------------------------------- #
MANY_EPOCHS = 3
"""Above this many passes over the training examples a run warns: a model that
sees the same few examples again and again learns them by heart. The paper's
Guanaco 7B run sits at the edge, 3.05 (1,875 steps of 16 on the 9,846 samples
that the data card of ``timdettmers/openassistant-guanaco`` counts), and gets
the warning too; the 7B preset on the course's 1,600 examples would be 18.75."""


class PreflightWarning(UserWarning):
    """A warning of the checks a run makes before its first step (:func:`preflight`):
    the run goes on, and the message says what to change."""


def epochs_of(config: TrainConfig, n_examples: int) -> float:
    """How many times ``config.max_steps`` steps of ``config.effective_batch_size``
    examples go through ``n_examples`` training examples; warns above :data:`MANY_EPOCHS`."""
    if n_examples < 1:
        raise ValueError("no training example: check the data set and max_length (every example may be too long)")
    epochs = config.max_steps * config.effective_batch_size / n_examples
    if epochs > MANY_EPOCHS:
        warnings.warn(f"{config.max_steps} steps x {config.effective_batch_size} examples go {epochs:.1f} times "
                      f"through the {n_examples:,} training examples: above {MANY_EPOCHS} epochs a model learns "
                      f"the examples by heart; use more data or fewer steps", PreflightWarning, stacklevel=3)
    return epochs


def preflight(config: TrainConfig, examples: list[dict], report, tokenizer, eot_id: int) -> float:
    """The checks of a run's tokenized training ``examples`` (with the
    :class:`~qlora_lab.finetune.chat_format.TokenizeReport` of their tokenization),
    each a warning that says what to change (none left: a ValueError); returns :func:`epochs_of`.

    * **Stopping.** A model learns to end a reply only from end-of-turn tokens
      in the loss. Pipelines that pad with the end-of-sequence token and then
      mask every padding token by its value mask the real ones too, and the
      model never stops generating; the course masks padding by position, but
      truncation can still cut the end-of-turn tokens off.
    * **Truncation before the reply**: examples dropped because their first
      reply begins after ``max_length`` (an example cut inside its reply still
      trains on the reply's start; the stopping check counts what it loses).
    * **The chat template**: a base model without one trains in Guanaco's
      format, which chatting with it later must use too.
    """
    from qlora_lab.finetune.chat_format import GUANACO_CHAT_TEMPLATE, IGNORE_INDEX

    if not examples:
        raise ValueError(f"no training example survives tokenization ({report})")

    def note(text: str) -> None:
        warnings.warn(text, PreflightWarning, stacklevel=3)

    stopping = sum(any(t == eot_id and label != IGNORE_INDEX for t, label in zip(e["input_ids"], e["labels"]))
                   for e in examples)
    if stopping < len(examples) / 2:
        note(f"only {stopping:,} of the {len(examples):,} training examples have their end-of-turn token "
             f"({tokenizer.convert_ids_to_tokens(eot_id)!r}) in the loss, so the model may not learn to stop: "
             f"raise max_length (now {config.max_length}), or name the token that ends a reply with end_of_turn")
    if report.dropped:
        note(f"{len(report.dropped):,} examples have no reply within max_length={config.max_length} tokens and "
             f"are left out; raise max_length to train on them")
    if getattr(tokenizer, "chat_template", None) == GUANACO_CHAT_TEMPLATE:
        note("the model's tokenizer has no chat template of its own, so this run trains it in Guanaco's "
             "'### Human: ... ### Assistant:' format; chat with the adapter in the same format (python -m "
             "qlora_lab chat does), or finetune the model's instruct version to keep its template")
    return epochs_of(config, len(examples))
