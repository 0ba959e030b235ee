"""Instruction data, third step: batches (chapter 07).

The examples of :func:`qlora_lab.finetune.chat_format.tokenize_records` are
ordered by group-by-length batching that reproduces Hugging Face's
``get_length_grouped_indices`` exactly (the Guanaco recipe trains with
``group_by_length=True``: :func:`length_grouped_indices`, :func:`make_batches`)
and padded to a batch (:func:`collate`): right padding, ``-100`` labels on
padding.
"""

from __future__ import annotations

from typing import Sequence

import torch

from qlora_lab.finetune.chat_format import IGNORE_INDEX


def length_grouped_indices(lengths: Sequence[int], batch_size: int, seed: int,
                           mega_batch_mult: int | None = None) -> list[int]:
    """An order of the examples in which consecutive runs of ``batch_size`` have
    similar lengths (so little padding), yet random: identical to
    ``transformers.trainer_pt_utils.get_length_grouped_indices`` with a
    ``torch.Generator`` seeded with ``seed``.

    Randomly permute; cut into mega-batches of ``mega_batch_mult * batch_size``
    (default: ``min(len // (4 * batch_size), 50)``, at least 1); sort each by
    length, longest first; move the overall longest example to the very front
    (so running out of memory happens on step one, not hours later).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if mega_batch_mult is None:
        mega_batch_mult = max(min(len(lengths) // (batch_size * 4), 50), 1)
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(lengths), generator=generator)
    size = mega_batch_mult * batch_size
    megabatches = [indices[i: i + size].tolist() for i in range(0, len(lengths), size)]
    megabatches = [sorted(mb, key=lambda i: lengths[i], reverse=True) for mb in megabatches]
    maxima = [lengths[mb[0]] for mb in megabatches]
    longest = int(torch.argmax(torch.tensor(maxima)).item())
    megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return [i for mb in megabatches for i in mb]


def make_batches(lengths: Sequence[int], batch_size: int, seed: int, group_by_length: bool = True,
                 drop_last: bool = False) -> list[list[int]]:
    """Split example indices into batches for one epoch, deterministic for a seed
    (use ``seed + epoch`` for later epochs): grouped by length
    (:func:`length_grouped_indices`) or a plain random permutation."""
    if not lengths:
        raise ValueError("no examples to batch")
    if group_by_length:
        order = length_grouped_indices(lengths, batch_size, seed)
    else:
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def collate(examples: Sequence[dict], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example: ``input_ids`` padded with
    ``pad_token_id``, ``attention_mask`` 1 on real tokens and 0 on padding,
    ``labels`` ``-100`` on padding. Right padding for training (positions then
    start at 0 in every row); left padding is for generation."""
    if not examples:
        raise ValueError("collate got an empty batch")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max(len(e["input_ids"]) for e in examples)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        n = len(e["input_ids"])
        labels = e.get("labels", e["input_ids"])
        if len(labels) != n:
            raise ValueError(f"an example has {n} input_ids but {len(labels)} labels")
        pad = width - n
        rows = (list(e["input_ids"]), [1] * n, list(labels))
        fills = (pad_token_id, 0, IGNORE_INDEX)
        for key, row, fill in zip(out, rows, fills):
            out[key].append(row + [fill] * pad if padding_side == "right" else [fill] * pad + row)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
