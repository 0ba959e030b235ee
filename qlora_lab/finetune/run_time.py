"""How long a run will take, and how to spend a card's spare memory (chapter 07).

Both are estimates made before anything runs, from the model's shapes:

1. **Work.** A forward pass costs two floating-point operations per weight of
   every matrix product for each token (a multiply and an add), plus the
   attention scores and their weighted sum (:func:`forward_flops_per_token`).
   QLoRA's base is frozen, so the backward pass computes the gradient of each
   layer's *input* (as much work as the forward) but not of its weights
   (LoRA's are a fraction of a percent); gradient checkpointing runs the
   forward a second time. A step therefore costs three forwards with
   checkpointing, two without (:func:`train_flops_per_token`), where full
   finetuning, which needs the weights' gradients too, costs four with it.
2. **Time** = work / (the GPU's peak x the fraction of it the run achieves)
   (:func:`time_estimate`). The peaks are datasheet figures
   (:data:`DATASHEET_TFLOPS`); the fraction is not known before a run has been
   measured on that card, so the course shows a range (:data:`UTILIZATIONS`).
   Dequantizing the 4-bit weights, the optimizer and the data loader are not
   in the FLOP count: they are part of why the fraction is below one.
3. **Headroom** (:func:`headroom`): chapter 03's memory estimate for larger
   micro-batches and longer sequences, and which fit a card. A larger
   micro-batch with fewer accumulation steps keeps the recipe's effective
   batch of 16 and keeps the GPU busier; a longer ``max_length`` cuts fewer
   conversations short.
"""

from __future__ import annotations

from dataclasses import dataclass

DATASHEET_TFLOPS = {"NVIDIA L4 (24 GB)": 121.0, "NVIDIA A10 (24 GB)": 125.0, "GeForce RTX 4090 (24 GB)": 165.2}
"""Dense bfloat16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets (L4,
A10) and the Ada architecture whitepaper (RTX 4090): half the figures they give
"with sparsity", which training does not use."""
UTILIZATIONS = (0.25, 0.5)
"""The fraction of the peak a run is assumed to achieve, low and high: an
assumption until the run is measured on the card (``make gpu-smoke`` prints tokens/s)."""


def forward_flops_per_token(config) -> float:
    """Floating-point operations of one token's forward pass through the model
    of ``config`` (a :class:`~qlora_lab.finetune.recipe.TrainConfig`): 2 per
    weight of every linear layer and of the output layer, and for each layer's
    causal attention 2 x 2 x (on average half the sequence) x the query width."""
    from qlora_lab.finetune.plan import model_config_source
    from qlora_lab.support.model_config import count_parameters, model_shape

    source = model_config_source(config)
    counts, shape = count_parameters(source), model_shape(source)
    matmul = counts.block_linear + shape.vocab * shape.hidden
    attention = shape.layers * 2 * 2 * (config.max_length / 2) * shape.q_dim
    return 2 * matmul + attention


def train_flops_per_token(config) -> float:
    """One training token: the forward, the backward to the inputs (as much
    again), and with gradient checkpointing the forward once more."""
    return (3 if config.gradient_checkpointing else 2) * forward_flops_per_token(config)


def run_tokens(config) -> int:
    """The tokens a run processes at most: every step's examples at
    ``max_length`` (shorter conversations are fewer tokens)."""
    return config.max_steps * config.effective_batch_size * config.max_length


@dataclass(frozen=True)
class TimeEstimate:
    gpu: str
    utilization: float
    tokens_per_second: float
    hours: float


def time_estimate(config, gpu: str, utilization: float) -> TimeEstimate:
    """The run's time on ``gpu`` (a key of :data:`DATASHEET_TFLOPS`) at the
    fraction ``utilization`` of its peak."""
    if gpu not in DATASHEET_TFLOPS:
        raise ValueError(f"gpu must be one of {', '.join(DATASHEET_TFLOPS)}, got {gpu!r}")
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization is a fraction of the peak, in (0, 1]; got {utilization!r}")
    per_second = DATASHEET_TFLOPS[gpu] * 1e12 * utilization / train_flops_per_token(config)
    return TimeEstimate(gpu, utilization, per_second, run_tokens(config) / per_second / 3600)


def time_text(config) -> str:
    """The estimate for each card of :data:`DATASHEET_TFLOPS` at both :data:`UTILIZATIONS`."""
    low, high = UTILIZATIONS
    lines = [f"time estimate for {config.max_steps} steps x {config.effective_batch_size} examples x at most "
             f"{config.max_length} tokens ({run_tokens(config) / 1e6:.2f}M tokens, "
             f"{train_flops_per_token(config) / 1e9:.1f} GFLOP each):",
             f"{'GPU':<26}{'peak TFLOP/s':>13}{'tokens/s':>17}{'hours':>13}"]
    for gpu, peak in DATASHEET_TFLOPS.items():
        slow, fast = time_estimate(config, gpu, low), time_estimate(config, gpu, high)
        lines.append(f"{gpu:<26}{peak:>13.1f}{slow.tokens_per_second:>9,.0f}-{fast.tokens_per_second:<7,.0f}"
                     f"{fast.hours:>7.1f}-{slow.hours:.1f}")
    lines.append(f"An estimate: the work of the model's matrix products and attention at {low:.0%}-{high:.0%} of "
                 f"the datasheet peak; measure tokens/s on your card with make gpu-smoke.")
    return "\n".join(lines)


def headroom(config, gpu_gb: int, batches=(1, 2, 4, 8), lengths=(1024, 2048)) -> list[dict]:
    """Chapter 03's estimate (:func:`qlora_lab.finetune.plan.run_estimate`) of
    ``config`` at each micro-batch in ``batches`` (its ``max_length``) and each
    sequence length in ``lengths`` (micro-batch 1), and whether it fits a
    ``gpu_gb`` card."""
    import dataclasses

    from qlora_lab import memory
    from qlora_lab.finetune.plan import run_estimate

    shapes = [(b, config.max_length) for b in batches] + [(1, n) for n in lengths]
    rows = []
    for batch, length in shapes:
        trial = dataclasses.replace(config, batch_size=batch, max_length=length,
                                    gradient_accumulation_steps=max(1, config.effective_batch_size // batch))
        peak = run_estimate(trial).peak
        rows.append({"batch": batch, "max_length": length, "accumulation": trial.gradient_accumulation_steps,
                     "bytes": peak, "fits": peak <= memory.gpu_capacity_bytes(gpu_gb)})
    return rows
