"""Chapter 03's estimates shown: tables of the memory model's breakdowns, the
paper comparison as a table, and the stacked-bar chart of LLaMA 7B-65B under
full 16-bit finetuning, LoRA and QLoRA against 24, 48 and 80 GB GPUs.

The numbers come from :mod:`qlora_lab.memory`; this module sets them side by side
(with the paper's figures) and lays them out.

What the paper measured, and how the memory model compares
----------------------------------------------------------
* Sec. 1: full 16-bit finetuning of LLaMA-65B needs "more than 780 GB". Here:
  12 bytes x 65.29e9 parameters + activations = 784 GB.
* Abstract and Sec. 4-5: QLoRA finetunes 65B "on a single 48GB GPU" and
  33B "on 24 GB consumer GPUs". Here, at the Figure 6 setting (batch 1,
  512 tokens, gradient checkpointing), a step's peak: 44.1 GB and 23.3 GB; GPUs are sized
  in binary units (:func:`qlora_lab.memory.costs.gpu_capacity_bytes`): 51.5e9
  and 25.8e9 bytes.
* Sec. 2, "Memory Requirement of Parameter-Efficient Finetuning", for
  LLaMA-7B: "the 4-bit base model consumes 5,048 MB", LoRA weights of 0.2%
  of the model "take up only 26 MB" (here: 13.5e6 parameters x 2 bytes =
  27 MB). The 4-bit base computed from the bits alone is 3,866 MB; the
  paper's figure is a measurement of its software stack in 2023 and includes
  more than the ideal storage (its 567 MB of "LoRA input gradients" at batch
  1, and 18 MB per sequence with gradient checkpointing, are given without
  a sequence length and could not be matched).
* Table 6, column "Memory": the memory of the deployed model, not of its
  finetuning; :mod:`qlora_lab.memory.footprint` compares it like with like,
  and :func:`paper_comparison` sets the step peaks of
  :func:`qlora_lab.memory.costs.estimate` beside it.
"""

from __future__ import annotations

from qlora_lab.memory.activations import GUANACO_LORA_R, METHODS
from qlora_lab.memory.costs import GB, GPU_SIZES_GB, LLAMA_SIZES, MemoryEstimate, estimate, gpu_capacity_bytes
from qlora_lab.memory.footprint import PAPER_TABLE6, deployment_footprint


def estimates_table(estimates: list[MemoryEstimate]) -> str:
    """Several estimates side by side, one row each, in GB."""
    width = max([len("model"), *(len(e.model) for e in estimates)]) + 2
    header = f"{'model':<{width}}{'method':<8}" + "".join(f"{n:>12}" for n in MemoryEstimate.COMPONENTS)
    rows = [header + f"{'total':>10}"]
    for e in estimates:
        rows.append(f"{e.model:<{width}}{e.method:<8}"
                    + "".join(f"{v / GB:>12.2f}" for v in e.components().values()) + f"{e.total / GB:>10.2f}")
    return "\n".join(rows)


def paper_comparison(**settings) -> list[dict]:
    """Table 6's Memory column next to this model, row by row, in GB.

    For every row: the paper's figure; the model's weights (with adapters
    for the 4-bit Guanaco models); the deployment footprint of
    :func:`deployment_footprint` (weights, adapters, key/value cache for the
    full 2048-token context, batch 1) and its deviation; and for the 4-bit
    rows the ``peak`` of a QLoRA finetuning step by :func:`estimate`
    (``settings`` are passed to it) and its deviation.
    """
    rows = []
    for label, name, bits, paper in PAPER_TABLE6:
        footprint = deployment_footprint(name, bits=bits, lora_r=GUANACO_LORA_R if bits == 4 else None)
        row = {
            "model": label,
            "config": name,
            "bits": bits,
            "paper_gb": paper,
            "weights_gb": (footprint.weights + footprint.adapters) / GB,
            "deployment_gb": footprint.total / GB,
            "deployment_vs_paper": footprint.total / GB / paper - 1,
            "finetuning_gb": None,
            "finetuning_vs_paper": None,
        }
        if bits == 4:
            peak = estimate(name, "qlora", **settings).peak
            row["finetuning_gb"] = peak / GB
            row["finetuning_vs_paper"] = peak / GB / paper - 1
        rows.append(row)
    return rows


def paper_comparison_table(**settings) -> str:
    """:func:`paper_comparison` as a printable table."""
    lines = [f"{'Table 6 model':<20}{'bits':>5}{'paper':>8}{'weights':>9}{'deploy':>9}{'dev':>7}"
             f"{'finetune':>10}{'dev':>7}"]
    for row in paper_comparison(**settings):
        tune = "" if row["finetuning_gb"] is None else \
            f"{row['finetuning_gb']:>10.2f}{row['finetuning_vs_paper']:>+7.0%}"
        lines.append(f"{row['model']:<20}{row['bits']:>5}{row['paper_gb']:>8}{row['weights_gb']:>9.2f}"
                     f"{row['deployment_gb']:>9.2f}{row['deployment_vs_paper']:>+7.0%}{tune}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# The chart
# --------------------------------------------------------------------------- #
COMPONENT_COLORS = {
    "weights": "#4c72b0", "adapters": "#55a868", "gradients": "#c44e52",
    "optimizer": "#8172b2", "activations": "#ccb974",
}


def _display_name(name: str) -> str:
    return "LLaMA-" + name[len("llama-"):].upper() if name.startswith("llama-") else name


def plot_breakdown(models=LLAMA_SIZES, methods=METHODS, gpus=GPU_SIZES_GB, ax=None, ymax_gb: float = 100,
                   **settings):
    """Stacked bars of the five components of :func:`estimate` for every
    model and method, with dashed lines at the GPU sizes
    (:func:`gpu_capacity_bytes`). Returns the matplotlib ``Figure``.

    The y axis is linear and stops at ``ymax_gb``: bars that go past it
    (full finetuning needs hundreds of GB) are cut there and labelled with
    their total. ``settings`` are passed to :func:`estimate`."""
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 3.5))
    else:
        fig = ax.figure
    width = 0.8 / len(methods)
    positions, labels = [], []
    for x, name in enumerate(models):
        for m_index, method in enumerate(methods):
            e = estimate(name, method, **settings)
            position = x + (m_index - (len(methods) - 1) / 2) * width
            positions.append(position)
            labels.append(method)
            bottom = 0.0
            for component, value in e.components().items():
                ax.bar(position, value / GB, width * 0.92, bottom=bottom, color=COMPONENT_COLORS[component])
                bottom += value / GB
            if bottom > ymax_gb:
                ax.text(position, ymax_gb * 0.98, f"{bottom:.0f}", ha="center", va="top", fontsize=6,
                        rotation=90, color="white")
    for gb in gpus:
        level = gpu_capacity_bytes(gb) / GB
        ax.axhline(level, color="black", lw=0.8, ls="--")
        ax.text(-0.45, level, f"{gb} GB GPU", fontsize=7, va="bottom", ha="left")
    ax.set_xticks(positions)
    ax.set_xticklabels(labels, fontsize=6, rotation=90)
    below = blended_transform_factory(ax.transData, ax.transAxes)
    for x, name in enumerate(models):
        ax.text(x, -0.2, _display_name(name), transform=below, ha="center", va="top", fontsize=8)
    ax.set_ylim(0, ymax_gb)
    ax.set_xlim(-0.5, len(models) - 0.5)
    ax.set_ylabel("memory (GB)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=color) for color in COMPONENT_COLORS.values()]
    ax.legend(handles, list(COMPONENT_COLORS), fontsize=7, ncol=5, loc="upper center", frameon=False,
              bbox_to_anchor=(0.5, 1.12))
    fig.tight_layout()
    return fig
