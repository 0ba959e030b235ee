"""The chapters' interactive figures: each view is ``(figure, text)`` at given knob values.

A view only calls the functions a chapter builds (``quant.int8``,
``quant.zeropoint``, ``quant.codes``, ``quant.blockwise``,
``quant.double_quant``, ``memory``) and draws what they return;
:func:`qlora_lab.explore.widgets.explore` puts knobs on it. Every number in
a view's text is printed at a precision that does not depend on the CPU's
last bits, so that the default output is stable under nbval.

=====================  =======  ==============================================
view                   chapter  knobs
=====================  =======  ==============================================
:func:`int_grid`       01       bits, scheme (absmax / zero-point), outlier
:func:`code_grid`      02       data type (Int4, FP4, NF4, NF3), block size
:func:`constants_cost` 03       block sizes, double quantization, model size
:func:`rank_view`      04       rank of the best low-rank update
:func:`memory_budget`  06, 07   GPU, model, batch, length, rank, paging
=====================  =======  ==============================================
"""

from __future__ import annotations

import math

import torch

from qlora_lab.memory.costs import GB, estimate, gpu_capacity_bytes, nf4_storage_bytes
from qlora_lab.quant import blockwise, codes, int8, zeropoint
from qlora_lab.quant.double_quant import expected_bits_per_parameter
from qlora_lab.support.model_config import count_parameters

CODES = {"Int4": codes.int4_code, "FP4": codes.fp4_code, "NF4": lambda: codes.normal_float_code(4),
         "NF3": lambda: codes.normal_float_code(3)}
"""The data types of chapter 02's view, by the name its knob shows."""

COMPONENT_COLORS = {"weights": "C0", "adapters": "C2", "gradients": "C1", "optimizer": "C3", "activations": "C4"}


def _figure(width: float = 7.0, height: float = 3.0):
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def int_grid(x: torch.Tensor, bits: int = 8, scheme: str = "absmax", outlier: float = 1.0):
    """Chapter 01: the integer grid of ``bits``-bit absmax or zero-point
    quantization over ``x``, whose last value is replaced by ``outlier`` times
    the largest magnitude of the others (1: no outlier)."""
    x = x.detach().float().flatten().clone()
    rest = x[:-1]
    x[-1] = float(outlier) * rest.abs().max()
    if scheme == "absmax":
        q, scale = int8.absmax_quantize(x, bits)
        x_hat = int8.absmax_dequantize(q, scale)
        qmax = 2 ** (bits - 1) - 1
        grid = int8.absmax_dequantize(torch.arange(-qmax, qmax + 1, dtype=torch.int8), scale)
    elif scheme == "zero-point":
        q, scale, zero = zeropoint.zeropoint_quantize(x, bits)
        x_hat = zeropoint.zeropoint_dequantize(q, scale, zero)
        levels = torch.arange(-2 ** (bits - 1), 2 ** (bits - 1), dtype=torch.int16).to(torch.int8)  # bits <= 8
        grid = zeropoint.zeropoint_dequantize(levels, scale, zero)
    else:
        raise ValueError(f"scheme must be 'absmax' or 'zero-point', got {scheme!r}")
    error = (x_hat[:-1] - rest).abs().mean().item() / rest.abs().mean().item()
    used = torch.unique(q[:-1]).numel()
    fig, ax = _figure(7.0, 2.6)
    for g in grid.tolist():
        ax.axvline(g, color="0.85", lw=0.6, zorder=0)
    ax.scatter(rest.numpy(), torch.zeros_like(rest).numpy(), s=12, label="values", zorder=2)
    ax.scatter([x[-1].item()], [0], s=40, color="C3", marker="x", label="the outlier", zorder=3)
    ax.scatter(x_hat.numpy(), torch.full_like(x_hat, -0.5).numpy(), s=8, color="C1", label="dequantized", zorder=2)
    ax.set_yticks([])
    ax.set_ylim(-1, 0.6)
    ax.set_title(f"{bits}-bit {scheme}: {grid.numel()} levels (gray lines), {used} used by the other values")
    ax.legend(loc="upper left", fontsize=8, ncol=3)
    text = (f"{bits}-bit {scheme}, outlier {outlier:g}x the largest other value: {used} of {grid.numel()} levels "
            f"used by the other values; their mean |error| is {error:.1%} of their mean |value|")
    return fig, text


def code_grid(weights: torch.Tensor, data_type: str = "NF4", blocksize: int = 64):
    """Chapter 02: a data type's code values over the histogram of the weights
    divided by their block's absmax, the relative error of block-wise
    quantization and the bits each weight costs (code + float32 absmax)."""
    if data_type not in CODES:
        raise ValueError(f"data_type must be one of {sorted(CODES)}, got {data_type!r}")
    code = CODES[data_type]()
    w = weights.detach().float().flatten()
    indices, absmax = blockwise.quantize_blockwise(w, code, blocksize)
    w_hat = blockwise.dequantize_blockwise(indices, absmax, code, blocksize)
    error = ((w_hat - w).norm() / w.norm()).item()
    scaled = blockwise.scale_blocks(w, absmax, blocksize)
    bits = math.log2(code.numel())
    bits_per_weight = bits + 32 / blocksize
    fig, ax = _figure(7.0, 3.0)
    ax.hist(scaled.numpy(), bins=201, range=(-1, 1), color="0.6", density=True)
    for value in code.tolist():
        ax.axvline(value, color="C3", lw=1)
    ax.set_xlabel("weight / its block's absmax")
    ax.set_yticks([])
    ax.set_title(f"{data_type}, blocks of {blocksize}: {code.unique().numel()} values (red) over the weights")
    text = (f"{data_type}, blocks of {blocksize}: relative error {error:.3f}, {bits:g} + 32/{blocksize} = "
            f"{bits_per_weight:.3f} bits per weight")
    return fig, text


def constants_cost(model: str = "llama-65b", blocksize: int = 64, double_quant: bool = True,
                   nested_blocksize: int = 256):
    """Chapter 03: bits per parameter of NF4 with or without double
    quantization, and the weight memory of a LLaMA model in 16 bits and in 4."""
    bits = expected_bits_per_parameter(blocksize, double_quant, nested_blocksize)
    counts = count_parameters(model)
    numel = sum(o * i for o, i in counts.block_linear_shapes)
    stored = sum(nf4_storage_bytes(o * i, blocksize, double_quant, nested_blocksize)
                 for o, i in counts.block_linear_shapes)
    codes_bytes = sum((o * i + 1) // 2 for o, i in counts.block_linear_shapes)
    other = counts.other * 2
    fig, ax = _figure(7.0, 2.8)
    ax.barh(["16-bit", "NF4"], [numel * 2 / GB, codes_bytes / GB], color="C0", label="linear weights")
    ax.barh(["NF4"], [(stored - codes_bytes) / GB], left=[codes_bytes / GB], color="C3", label="block constants")
    ax.barh(["16-bit", "NF4"], [other / GB, other / GB], left=[numel * 2 / GB, stored / GB], color="0.6",
            label="embeddings, norms (16-bit)")
    ax.set_xlabel("GB")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"{model}: weights in 16 bits and in NF4{' + DQ' if double_quant else ''}")
    dq = f", second level blocks of {nested_blocksize}" if double_quant else ""
    text = (f"NF4 in blocks of {blocksize}{' with double quantization' + dq if double_quant else ''}: "
            f"{bits:.4f} bits per parameter, of which {bits - 4:.4f} are constants; {model}'s weights "
            f"{(stored + other) / GB:.2f} GB (16-bit: {(numel * 2 + other) / GB:.2f} GB)")
    return fig, text


def rank_view(delta: torch.Tensor, r: int = 8):
    """Chapter 04: the best rank-``r`` approximation of an update ``delta``
    (its ``r`` largest singular directions, Eckart-Young): how much of the
    update it misses and how many numbers a rank-``r`` adapter trains."""
    delta = delta.detach().float()
    s = torch.linalg.svdvals(delta)
    if not 1 <= r <= s.numel():
        raise ValueError(f"r must be from 1 to {s.numel()} for a {tuple(delta.shape)} update, got {r}")
    missed = (s[r:].square().sum() / s.square().sum()).sqrt().item()
    out_features, in_features = delta.shape
    fig, ax = _figure(7.0, 3.0)
    ax.plot(range(1, s.numel() + 1), s.numpy(), color="0.6")
    ax.plot(range(1, r + 1), s[:r].numpy(), color="C0", lw=3, label=f"kept by rank {r}")
    ax.set_xscale("log")
    ax.set_xlabel("index i (largest first)")
    ax.set_ylabel("singular value")
    ax.legend(fontsize=8)
    ax.set_title(f"rank {r}: the adapter keeps the {r} largest directions of the update")
    text = (f"rank {r}: {r * (in_features + out_features):,} trainable numbers (the full matrix: "
            f"{in_features * out_features:,}); the best rank-{r} update misses {missed:.1%} of the update's norm")
    return fig, text


def memory_budget(gpu_gb: int = 24, model: str = "llama-7b", batch: int = 1, seq_len: int = 512,
                  lora_r: int = 64, paged: bool = True):
    """Chapters 06 and 07: a QLoRA step's memory (``memory.estimate``) on a
    GPU of ``gpu_gb``. Without paging the whole peak must fit; with paging the
    optimizer state can wait in CPU memory while the device is full, so the
    rest of the peak must fit."""
    e = estimate(model, "qlora", lora_r, seq_len, batch, True)
    capacity = gpu_capacity_bytes(gpu_gb)
    needed = e.peak - e.optimizer if paged else e.peak
    fits = needed <= capacity
    fig, ax = _figure(7.0, 2.6)
    left = 0.0
    for name in e.COMPONENTS:
        value = getattr(e, name) / GB
        ax.barh(["step"], [value], left=[left], color=COMPONENT_COLORS[name], label=name)
        left += value
    ax.axvline(capacity / GB, color="black", ls="--", lw=1.2, label=f"{gpu_gb} GB card")
    ax.set_xlabel("GB")
    ax.legend(fontsize=8, ncol=3, loc="upper right")
    ax.set_xlim(0, max(left, capacity / GB) * 1.25)
    ax.set_title(f"{model}, QLoRA r={lora_r}, batch {batch} x {seq_len} tokens: "
                 f"{'fits' if fits else 'does not fit'}{' (paged)' if paged else ''}")
    verdict = "fits" if fits else "does not fit"
    text = (f"{model}, batch {batch} x {seq_len}, r={lora_r}: peak {e.peak / GB:.2f} GB (optimizer state "
            f"{e.optimizer / GB:.2f} GB); a {gpu_gb} GB card holds {capacity / GB:.1f} GB: {verdict}"
            f"{', with paging the optimizer state may wait in CPU memory' if paged else ', without paging'}")
    return fig, text
