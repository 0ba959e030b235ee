"""Counting parameters and bytes, written once.

Plumbing, not course material. Every place that asks "how many parameters"
or "how many bytes" (the memory model, the paged optimizer's accounting, the
benchmarks) asks these functions, so that a tied weight or a shared tensor
is counted the same way everywhere:

* :func:`tensor_bytes`: ``numel x element size`` of one tensor (of the whole
  tensor, for a tensor FSDP shards over several processes);
* :func:`local_part` and :func:`local_bytes`: what of a tensor this process
  holds: its shard of a ``DTensor`` (FSDP, chapter 09), all of any other;
* :func:`distinct_tensors`: tensors with their repeats left out (a tied
  output head, a quantization map shared by every parameter): two tensors
  are the same when their local parts start at the same address with the
  same number of elements and dtype on the same device;
* :func:`total_bytes`: the bytes of the distinct tensors (``local=True``:
  of this process's parts of them);
* :func:`parameter_count`: a module's parameters (each once), all of them or
  only the trainable ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements of ``t`` (not of its whole storage)."""
    return t.numel() * t.element_size()


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a ``DTensor``; any other tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def local_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements of ``t`` that this process holds (:func:`local_part`)."""
    return tensor_bytes(local_part(t))


def distinct_tensors(tensors: Iterable[torch.Tensor | None]) -> Iterator[torch.Tensor]:
    """The non-empty tensors of ``tensors``, each once (None and non-tensors skipped)."""
    seen: set[tuple] = set()
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        part = local_part(t)
        key = (str(part.device), part.data_ptr(), part.numel(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        yield t


def total_bytes(tensors: Iterable[torch.Tensor | None], *, local: bool = False) -> int:
    """Bytes of :func:`distinct_tensors` of ``tensors``: whole, or (``local``)
    only the parts this process holds."""
    size = local_bytes if local else tensor_bytes
    return sum(size(t) for t in distinct_tensors(tensors))


def parameter_count(module: torch.nn.Module, *, trainable: bool | None = None) -> int:
    """Elements of ``module``'s parameters (``parameters()`` yields a tied
    tensor once): all of them, or only those that do (``trainable=True``) or
    do not (``False``) require a gradient."""
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)
