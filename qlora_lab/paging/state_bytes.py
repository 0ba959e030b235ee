"""How many bytes an optimizer's state takes, whatever the optimizer (chapter 06):
torch's AdamW, bitsandbytes' 8-bit optimizers and
:class:`qlora_lab.paging.paged_adamw.PagedAdamW`, whose paged state counts in
full wherever its pages are: paging moves memory, it does not save it.
Chapter 09 counts each rank's share of a sharded state with it
(:mod:`qlora_lab.beyond.fsdp`).
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from qlora_lab.paging.paged_tensor import PagedTensor
from qlora_lab.support.counting import distinct_tensors, local_bytes

__all__ = ["optimizer_state_bytes"]


def optimizer_state_bytes(optimizer: Optimizer, *, by_key: bool = False) -> int | dict[str, int]:
    """Bytes of optimizer state: the sum of the sizes of the tensors in
    ``optimizer.state`` (``numel * element_size``; of a tensor FSDP shards,
    the shard this process holds).

    Works for any ``torch.optim.Optimizer``: torch's AdamW (``step``,
    ``exp_avg``, ``exp_avg_sq``), bitsandbytes' 8-bit optimizers (``state1``,
    ``state2`` in uint8, ``absmax1``, ``absmax2``, and the quantization maps
    ``qmap1``, ``qmap2``, which are one tensor shared by all parameters and so
    counted once), and :class:`PagedAdamW` (a :class:`PagedTensor` counts its
    logical size, ``numel * itemsize``, wherever its pages are: paging moves
    memory, it does not save it). Non-tensor entries (bitsandbytes keeps
    ``step`` as an int) take no tensor memory and are skipped.

    With ``by_key=True``: ``{state key: bytes}`` instead of the total.
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer_state_bytes takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    totals: dict[str, int] = {}
    key_of: dict[int, str] = {}  # each plain tensor's first state key, to file its bytes under
    tensors = []
    for values in optimizer.state.values():
        for key, value in values.items():
            if isinstance(value, PagedTensor):
                totals[key] = totals.get(key, 0) + value.nbytes
            elif isinstance(value, torch.Tensor):
                key_of.setdefault(id(value), key)
                tensors.append(value)
    for t in distinct_tensors(tensors):  # the course's one rule for "the same tensor" (support.counting)
        totals[key_of[id(t)]] = totals.get(key_of[id(t)], 0) + local_bytes(t)
    return totals if by_key else sum(totals.values())
