"""The causal-LM loss without the logits nobody needs.

The reference is transformers' own: ``model(**batch, num_items_in_batch=n).loss``
projects every position's hidden state onto the whole vocabulary (SmolLM2:
49,152 entries), then ignores the positions labelled -100. With labels on the
assistant's tokens only (the course's labels, chapter 07), most positions are
ignored: on chapter 07's data about 3 in 4. :func:`causal_lm_loss` asks the model
for the logits of the labelled positions only (transformers' ``logits_to_keep``
with a boolean mask), then takes the same summed cross-entropy divided by the
same count. The hidden states, the loss and every gradient are the reference's up
to the rounding of the output layer's matrix product, which now has fewer rows
(tests/fast/test_fast.py states the tolerance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """``(batch, seq)`` booleans: True at position t when token t+1 is labelled,
    i.e. where the logits of position t enter the loss."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def causal_lm_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch: int | None = None) -> torch.Tensor:
    """The loss ``model(input_ids, attention_mask, labels=labels,
    num_items_in_batch=n).loss`` computes, with the output layer applied only at
    :func:`labelled_positions`. ``num_items_in_batch`` (the labelled tokens of the
    whole accumulated step) divides the summed loss; without it the mean over
    this batch's labelled tokens is taken, as transformers does."""
    keep = labelled_positions(labels)
    targets = labels[:, 1:][keep[:, :-1]]
    if targets.numel() == 0:
        raise ValueError("causal_lm_loss got a batch without a labelled token; every example needs one "
                         "(chat_format.tokenize_records drops those that have none)")
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets,
                           reduction="sum" if num_items_in_batch is not None else "mean")
    return loss / num_items_in_batch if num_items_in_batch is not None else loss
