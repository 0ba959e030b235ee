"""Greedy decoding, written once (chapters 00, 07 and 08).

Every reply the course prints is decoded greedily: the most likely next token,
again and again (``do_sample=False``), so that the same prompt always gets the
same reply and a printed reply can be checked. Chapter 00's first chat
(:func:`qlora_lab.models.hub.chat`), chapter 07's exact-match scores
(:func:`qlora_lab.finetune.evaluate.generate`) and chapter 08's streamed chat
(:func:`qlora_lab.after.chat.reply`) all call :func:`greedy`, the one place
that runs transformers' ``generate`` for them.
"""

from __future__ import annotations

import torch

__all__ = ["greedy"]


@torch.no_grad()
def greedy(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, max_new_tokens: int,
           stop_id: int | None = None, pad_id: int | None = None, streamer=None,
           min_new_tokens: int = 0) -> list[list[int]]:
    """The new tokens of each row of ``input_ids`` (a batch of prompts, padded on
    the left so that every row continues from the same position), decoded
    greedily for at most ``max_new_tokens`` and cut before ``stop_id`` (the
    end-of-turn token; None: the model's own ``eos_token_id``, not cut).
    ``pad_id`` fills the rows that stop early; ``streamer`` receives each new
    token as it is made (transformers' streamer protocol); ``min_new_tokens``
    keeps the stop token from ending a row earlier (a speed measurement wants
    exactly ``max_new_tokens``)."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    stop = {} if stop_id is None else {"eos_token_id": stop_id}
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad_id, streamer=streamer, min_new_tokens=min_new_tokens,
                         **stop)
    rows = out[:, input_ids.shape[1]:].tolist()
    if stop_id is not None:
        rows = [row[: row.index(stop_id)] if stop_id in row else row for row in rows]
    return rows
