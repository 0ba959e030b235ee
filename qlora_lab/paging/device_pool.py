"""A device's memory as a byte budget with an allocator: the "GPU" of chapter
06 (QLoRA, Sec. 3, "Paged Optimizers").

:class:`DevicePool` hands out :class:`Block` s until its capacity is used up.
When it is full it first asks the owners registered as :class:`Evictable`
(the optimizer's :class:`qlora_lab.paging.pager.Pager`) to move memory to the host,
as the CUDA driver evicts unified-memory pages when the GPU runs out; when that
cannot make room either it raises :class:`DeviceOutOfMemoryError`, worded like
PyTorch's CUDA out-of-memory error. On CPU the pool simulates a GPU; on CUDA
its blocks are real GPU memory under a budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from qlora_lab.support.checks import check_nbytes

__all__ = ["Block", "DeviceOutOfMemoryError", "DevicePool", "Evictable", "MemoryEvent", "format_size"]


def format_size(nbytes: int) -> str:
    """Bytes as PyTorch's CUDA allocator prints them in its out-of-memory
    message (``c10::CachingAllocator::format_size``): up to 1024 in bytes,
    then KiB, MiB, GiB with two decimals."""
    if nbytes <= 1024:
        return f"{nbytes} bytes"
    if nbytes <= 1048576:
        return f"{nbytes / 1024:.2f} KiB"
    if nbytes <= 1073741824:
        return f"{nbytes / 1048576:.2f} MiB"
    return f"{nbytes / 1073741824:.2f} GiB"


class DeviceOutOfMemoryError(torch.OutOfMemoryError):
    """An allocation did not fit in a :class:`DevicePool`.

    A subclass of ``torch.OutOfMemoryError`` (= ``torch.cuda.OutOfMemoryError``),
    so a training loop that catches the real CUDA error catches this one too.
    Attributes: ``requested``, ``capacity``, ``free`` (bytes) and ``usage``
    (bytes held per owner when the allocation failed).
    """

    def __init__(self, message: str, *, requested: int, capacity: int, free: int,
                 usage: dict[str, int]) -> None:
        super().__init__(message)
        self.requested = requested
        self.capacity = capacity
        self.free = free
        self.usage = dict(usage)


@dataclass(eq=False)
class Block:
    """One allocation of a :class:`DevicePool`: ``nbytes`` bytes of device
    memory (``tensor``, uint8) held by ``owner`` until ``pool.free(block)``."""

    nbytes: int
    owner: str
    label: str
    tensor: torch.Tensor = field(repr=False)
    freed: bool = False


@dataclass(frozen=True)
class MemoryEvent:
    """One line of a pool's event log: ``kind`` is "allocate", "free" or "oom";
    ``used`` is the pool's usage after the event; ``label`` says why (the pager
    writes e.g. "prefetch p0.exp_avg[1]" or "evict p2.exp_avg_sq[0]")."""

    kind: str
    owner: str
    nbytes: int
    used: int
    label: str


class Evictable(Protocol):
    """What a :class:`DevicePool` needs from an owner whose memory can move to
    the host: how much it could give back, and to give back at least
    ``nbytes`` (returning the bytes actually freed)."""

    owner: str

    def evictable_bytes(self) -> int: ...

    def evict(self, nbytes: int) -> int: ...


class DevicePool:
    """A device's memory as a byte budget with an allocator.

    On CPU (``torch_device="cpu"``) this *is* the simulated GPU: its blocks are
    ordinary CPU tensors, but only ``capacity`` bytes can be held at once, as
    on a GPU with that much memory. On CUDA the blocks are real GPU memory and
    ``capacity`` is a budget inside the GPU (``None``: the free GPU memory at
    construction, ``torch.cuda.mem_get_info``).

    ``allocate(nbytes, owner=...)`` hands out a :class:`Block`. When the pool
    is full it asks the registered :class:`Evictable` owners (the optimizer's
    :class:`qlora_lab.paging.pager.Pager`) to move memory to the host, which is what the unified
    memory driver does with managed pages when the GPU runs out (QLoRA, Sec.
    3). When that cannot make room either, it raises
    :class:`DeviceOutOfMemoryError`.

    The model has no fragmentation: any ``available`` bytes can serve one
    allocation (a real allocator can fail with enough free memory split into
    pieces that are too small).

    Args:
        capacity_bytes: the budget in bytes, or ``None`` for no limit on CPU
            (on CUDA: the GPU's free memory).
        torch_device: where the blocks live, ``"cpu"`` (simulated) or a CUDA
            device.
        name: used in messages (default ``"sim-gpu"`` on CPU, the CUDA
            device's name otherwise).
        record_events: keep a log of every allocation and free in
            :attr:`events` (for teaching; off by default because it grows).
    """

    def __init__(self, capacity_bytes: int | None = None, *, torch_device: str | torch.device = "cpu",
                 name: str | None = None, record_events: bool = False) -> None:
        self.torch_device = torch.device(torch_device)
        if self.torch_device.type not in ("cpu", "cuda"):
            raise ValueError(f"DevicePool supports torch_device 'cpu' (simulated) or 'cuda', "
                             f"got {self.torch_device}")
        if capacity_bytes is not None:
            check_nbytes(capacity_bytes, "capacity_bytes")
            if capacity_bytes <= 0:
                raise ValueError(f"capacity_bytes must be positive (or None for no limit), got {capacity_bytes}")
        elif self.torch_device.type == "cuda":
            capacity_bytes = torch.cuda.mem_get_info(self.torch_device)[0]
        self.capacity: int | None = capacity_bytes
        if name is None:
            name = "sim-gpu" if self.torch_device.type == "cpu" else str(self.torch_device)
        self.name = name
        self.used = 0
        self.peak = 0
        self.record_events = record_events
        self.events: list[MemoryEvent] = []
        self._usage: dict[str, int] = {}
        self._evictables: list[Evictable] = []

    def __repr__(self) -> str:
        cap = "unlimited" if self.capacity is None else format_size(self.capacity)
        return f"DevicePool({self.name!r}, capacity={cap}, used={format_size(self.used)})"

    @property
    def available(self) -> int | None:
        """Free bytes (``None`` when the pool has no limit)."""
        return None if self.capacity is None else self.capacity - self.used

    def usage(self) -> dict[str, int]:
        """Bytes held per owner, e.g. ``{"optimizer": 16384, "activations": 40960}``."""
        return {owner: n for owner, n in self._usage.items() if n}

    def reset_peak(self) -> None:
        """Start a new high-water mark from the current usage (like
        ``torch.cuda.reset_peak_memory_stats``)."""
        self.peak = self.used

    def register_evictable(self, owner: Evictable) -> None:
        """Let ``allocate`` ask ``owner`` to give memory back when full.
        Owners are asked in registration order."""
        if owner not in self._evictables:
            self._evictables.append(owner)

    def unregister_evictable(self, owner: Evictable) -> None:
        if owner in self._evictables:
            self._evictables.remove(owner)

    def evictable_bytes(self) -> int:
        """Bytes the registered owners could move to the host right now."""
        return sum(e.evictable_bytes() for e in self._evictables)

    def allocate(self, nbytes: int, owner: str = "activations", *, label: str = "") -> Block:
        """Hold ``nbytes`` bytes for ``owner``; evict pages of the registered
        evictable owners (LRU first) if the pool is full.

        Raises:
            DeviceOutOfMemoryError: when the bytes do not fit even after
                everything evictable was moved to the host.
        """
        check_nbytes(nbytes, "nbytes")
        if nbytes < 0:
            raise ValueError(f"cannot allocate a negative number of bytes ({nbytes})")
        if self.capacity is not None and nbytes > self.capacity - self.used:
            shortfall = nbytes - (self.capacity - self.used)
            could_free = self.evictable_bytes()
            if nbytes <= self.capacity and could_free >= shortfall:
                for evictable in self._evictables:
                    if shortfall <= 0:
                        break
                    shortfall -= evictable.evict(shortfall)
            if nbytes > self.capacity - self.used:
                self._record("oom", owner, nbytes, label)
                raise self._out_of_memory(nbytes, owner)
        tensor = torch.empty(nbytes, dtype=torch.uint8, device=self.torch_device)
        block = Block(nbytes=nbytes, owner=owner, label=label, tensor=tensor)
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        self._usage[owner] = self._usage.get(owner, 0) + nbytes
        self._record("allocate", owner, nbytes, label)
        return block

    def free(self, block: Block, *, label: str | None = None) -> None:
        """Give ``block``'s bytes back to the pool."""
        if not isinstance(block, Block):
            raise TypeError(f"free() takes a Block returned by allocate(), got {type(block).__name__}")
        if block.freed:
            raise ValueError(f"block of {block.nbytes} bytes for {block.owner!r} was already freed")
        block.freed = True
        self.used -= block.nbytes
        self._usage[block.owner] -= block.nbytes
        self._record("free", block.owner, block.nbytes, block.label if label is None else label)

    @contextmanager
    def hold(self, nbytes: int, owner: str = "activations", *, label: str = "") -> Iterator[Block]:
        """``with pool.hold(n, "activations"): ...`` holds ``n`` bytes for the
        duration of the block (e.g. a forward and backward pass)."""
        block = self.allocate(nbytes, owner, label=label)
        try:
            yield block
        finally:
            self.free(block)

    def _record(self, kind: str, owner: str, nbytes: int, label: str) -> None:
        if self.record_events:
            self.events.append(MemoryEvent(kind, owner, nbytes, self.used, label))

    def _out_of_memory(self, nbytes: int, owner: str) -> DeviceOutOfMemoryError:
        assert self.capacity is not None
        free = self.capacity - self.used
        held = self.usage()
        held_text = ", ".join(f"{o} {format_size(n)}" for o, n in sorted(held.items())) or "nothing"
        evictable = self.evictable_bytes()
        if self._evictables:
            paging = (f"Only {format_size(evictable)} of it could still be paged out to host memory, "
                      "not enough to make room.")
        else:
            paging = ("None of it can be paged out to host memory (no pager is registered: "
                      "PagedAdamW with paging=True registers one).")
        where = "Simulated device" if self.torch_device.type == "cpu" else f"Budgeted {self.torch_device}"
        message = (
            f"{where} out of memory. Tried to allocate {format_size(nbytes)} for {owner!r}. "
            f"Device {self.name!r} has a total capacity of {format_size(self.capacity)} of which "
            f"{format_size(free)} is free. In use: {held_text}. {paging} "
            "Lower the peak (shorter sequences, smaller batch, gradient checkpointing)"
            + ("." if self._evictables else " or let the optimizer state page out.")
        )
        return DeviceOutOfMemoryError(message, requested=nbytes, capacity=self.capacity, free=free,
                                      usage=held)
