"""What fits where: one GPU's memory under FSDP-QLoRA (appendix, chapter 09).

The estimate of chapter 03 (:func:`qlora_lab.memory.estimate`) with
``world_size``: each of N GPUs holds 1/N of the 4-bit weights, of the adapters,
their gradients and optimizer states, plus one whole decoder layer gathered at a
time and its own activations. :func:`fits_table` sets that beside consumer and
workstation cards, and beside Answer.AI's published runs of FSDP-QLoRA.
"""

from __future__ import annotations

__all__ = ["PUBLISHED", "PUBLISHED_SOURCES", "SETUPS", "fits_table"]

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
