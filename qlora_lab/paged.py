"""Paged optimizers: optimizer state that steps aside when memory runs out.

QLoRA, Sec. 3 ("Paged Optimizers"): a finetuning step's memory is not flat.
One batch with a long sequence needs far more activation memory than the
average batch, and on a GPU that is already full such a spike ends the run with
an out-of-memory error. The paper allocates the optimizer state (Adam's two
moments) in NVIDIA *unified memory*: the driver then moves that memory page by
page between GPU and CPU RAM on its own, evicting pages to CPU RAM when the GPU
runs out and bringing them back when the optimizer update needs them, the way
an operating system pages RAM out to disk.

The real thing, on CUDA (read in bitsandbytes 0.50.2):

* ``bitsandbytes.functional.get_paged`` allocates a tensor with
  ``cget_managed_ptr``, a C wrapper around ``cudaMallocManaged`` (bitsandbytes'
  ``csrc/pythonInterface.cpp``; the installed ``libbitsandbytes_cuda*.so``
  import ``cudaMallocManaged``, ``cudaMemPrefetchAsync`` and
  ``cudaDeviceGetAttribute``). That is one virtual address range valid on
  both CPU and GPU, whose pages live wherever they were last touched. A GPU
  kernel that touches a page held in CPU RAM raises a *page fault*; the
  driver migrates the page and the kernel goes on. When the GPU is full, the
  driver evicts managed pages to CPU RAM to make room for other allocations,
  which is what keeps a spike from failing.
* ``bitsandbytes.functional.prefetch_tensor`` calls ``cprefetch``, i.e.
  ``cudaMemPrefetchAsync``, to migrate a whole tensor to the GPU ahead of
  use (skipped on devices without ``cudaDevAttrConcurrentManagedAccess``),
  so the update kernel does not stall on one fault per page.
* ``bitsandbytes.optim.PagedAdamW32bit`` / ``PagedAdamW8bit`` (and
  ``PagedAdamW``) are the ordinary 32-bit / 8-bit AdamW with ``is_paged=True``.
  ``Optimizer8bit.get_state_buffer`` makes the state paged only for
  parameters with at least 1e5 elements (smaller ones, such as the LoRA
  matrices of a small model, get plain ``torch.zeros_like`` GPU memory);
  ``Optimizer8bit.step`` calls ``prefetch_state(p)``
  (``prefetch_tensor`` on ``state1`` and ``state2``) right before
  ``update_step`` for each parameter.
* On CPU, bitsandbytes falls back to non-paged state. Verified here: the
  first ``step()`` warns ``UserWarning: Paged optimizers are not supported on
  CPU. Falling back to non-paged optimizer behavior.`` and the state is a
  plain ``torch.zeros_like`` tensor.

This module builds the same mechanism in plain PyTorch so that every move can
be watched: :class:`PagedAdamW` keeps ``exp_avg`` and ``exp_avg_sq`` in
fixed-size pages (:class:`PagedTensor`) managed by a :class:`Pager`. The
pages' "device" is a :class:`DevicePool`, a byte budget with an allocator.
On CPU the pool simulates a GPU's memory; on CUDA it hands out real GPU
memory under the budget and host pages are pinned CPU memory. Other users
(the activations of a long batch) allocate from the same pool; when it is
full, the pool asks the pager to give pages back, least recently used first
(our policy; the driver's choice of victims is its own).
Without paging the same allocation raises :class:`DeviceOutOfMemoryError`,
worded like PyTorch's CUDA out-of-memory error.

Two differences from the hardware are deliberate and documented where they
occur: the pool has no fragmentation (any free bytes can serve any
allocation), and the update kernel reads a parameter's pages through a
contiguous workspace (unified memory gives the kernel one contiguous virtual
range; here the pages are separate tensors). The arithmetic is that of
``torch.optim.AdamW``'s single-tensor path, operation for operation, so the
updates are bit-for-bit those of ``torch.optim.AdamW(foreach=False)``
whatever the budget.

To put a whole training run on the simulated device, :class:`ActivationMeter`
measures what a forward pass saves for backward (and can allocate each saved
tensor in a pool as it is saved), :func:`hold_model` puts a model's weights
and adapters in a pool, and :func:`training_steps` trains batch by batch,
charging activations, gradients and (through :class:`PagedAdamW`) the
optimizer state, and reports each step as a :class:`StepTrace`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch.optim import Optimizer

__all__ = [
    "DEFAULT_PAGE_BYTES",
    "Block",
    "DeviceOutOfMemoryError",
    "DevicePool",
    "Evictable",
    "MemoryEvent",
    "Page",
    "PagedAdamW",
    "PagedTensor",
    "Pager",
    "PagingCounters",
    "ActivationMeter",
    "StepTrace",
    "format_size",
    "hold_model",
    "optimizer_state_bytes",
    "parameter_bytes",
    "training_steps",
]

DEFAULT_PAGE_BYTES = 4096
"""4 KiB, the size of a CPU memory page on x86 (the CUDA driver migrates unified
memory in pages of this size and in larger blocks, up to 2 MiB)."""


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


def _check_nbytes(nbytes: object, what: str) -> int:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"{what} must be an int number of bytes, got {type(nbytes).__name__} {nbytes!r}")
    return nbytes


class DevicePool:
    """A device's memory as a byte budget with an allocator.

    On CPU (``torch_device="cpu"``) this *is* the simulated GPU: its blocks are
    ordinary CPU tensors, but only ``capacity`` bytes can be held at once, as
    on a GPU with that much memory. On CUDA the blocks are real GPU memory and
    ``capacity`` is a budget inside the GPU (``None``: the free GPU memory at
    construction, ``torch.cuda.mem_get_info``).

    ``allocate(nbytes, owner=...)`` hands out a :class:`Block`. When the pool
    is full it asks the registered :class:`Evictable` owners (the optimizer's
    :class:`Pager`) to move memory to the host, which is what the unified
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
            _check_nbytes(capacity_bytes, "capacity_bytes")
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
        _check_nbytes(nbytes, "nbytes")
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


@dataclass
class PagingCounters:
    """What the pager moved. ``pages_in = prefetches + faults``; every page
    that leaves the device is an eviction, so ``pages_out == evictions``;
    ``pages_created`` counts fresh zero pages made on the device (no transfer)."""

    pages_in: int = 0
    pages_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    prefetches: int = 0
    faults: int = 0
    evictions: int = 0
    pages_created: int = 0

    @property
    def bytes_moved(self) -> int:
        return self.bytes_in + self.bytes_out

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "bytes_moved": self.bytes_moved}


class Page:
    """``page_bytes`` bytes of one :class:`PagedTensor`. Its data is in exactly
    one place: a device :class:`Block` (``frame``) or its ``host`` buffer."""

    __slots__ = ("label", "frame", "host")

    def __init__(self, label: str) -> None:
        self.label = label
        self.frame: Block | None = None
        self.host: torch.Tensor | None = None

    @property
    def on_device(self) -> bool:
        return self.frame is not None

    def __repr__(self) -> str:
        return f"Page({self.label!r}, {'device' if self.on_device else 'host'})"


class PagedTensor:
    """A flat tensor of ``numel`` elements stored in fixed-size pages.

    Page ``i`` holds elements ``[i*k, (i+1)*k)`` with ``k = page_bytes //
    itemsize``; the last page is allocated whole even when partly used (the
    internal fragmentation of any paged memory). Elements are in the memory
    order of a tensor shaped like ``shape`` (``torch.empty_like`` of the
    parameter).
    """

    def __init__(self, shape: torch.Size, dtype: torch.dtype, page_bytes: int, label: str) -> None:
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.numel = self.shape.numel()
        self.page_bytes = page_bytes
        self.page_numel = page_bytes // dtype.itemsize
        self.label = label
        n_pages = -(-self.numel // self.page_numel)
        self.pages = [Page(f"{label}[{i}]") for i in range(n_pages)]

    def __repr__(self) -> str:
        on = sum(p.on_device for p in self.pages)
        return (f"PagedTensor({self.label!r}, shape={tuple(self.shape)}, {self.dtype}, "
                f"{len(self.pages)} pages, {on} on device)")

    @property
    def nbytes(self) -> int:
        """Logical size, ``numel * itemsize`` (what a plain tensor would take)."""
        return self.numel * self.dtype.itemsize

    @property
    def paged_bytes(self) -> int:
        """Bytes its pages take: ``len(pages) * page_bytes``."""
        return len(self.pages) * self.page_bytes

    def _span(self, i: int) -> tuple[int, int]:
        start = i * self.page_numel
        return start, min(start + self.page_numel, self.numel)

    @staticmethod
    def _flat(t: torch.Tensor) -> torch.Tensor:
        # A dense tensor's storage, in memory order; works for any dense layout
        # (empty_like(p) keeps p's layout, as torch's zeros_like state does).
        return t.as_strided((t.numel(),), (1,))

    def _page_data(self, page: Page, count: int) -> torch.Tensor:
        raw = page.frame.tensor if page.frame is not None else page.host
        return raw.view(self.dtype)[:count]

    def read(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """A copy of the whole tensor (shape ``shape``), read from wherever each
        page is, without moving pages (a debugger's view, or a checkpoint)."""
        out = torch.empty(self.shape, dtype=self.dtype) if like is None else torch.empty_like(like)
        flat = self._flat(out)
        for i, page in enumerate(self.pages):
            start, stop = self._span(i)
            flat[start:stop].copy_(self._page_data(page, stop - start))
        return out

    def gather(self, like: torch.Tensor) -> torch.Tensor:
        """The device pages copied into one workspace shaped like ``like``: what
        the update kernel reads. Every page must be on the device."""
        out = torch.empty_like(like)
        flat = self._flat(out)
        for i, page in enumerate(self.pages):
            if page.frame is None:
                raise RuntimeError(f"page {page.label} is not on the device; acquire it first")
            start, stop = self._span(i)
            flat[start:stop].copy_(self._page_data(page, stop - start))
        return out

    def scatter(self, values: torch.Tensor) -> None:
        """Write ``values`` (a tensor shaped like the workspace) back into the
        device pages."""
        flat = self._flat(values)
        for i, page in enumerate(self.pages):
            if page.frame is None:
                raise RuntimeError(f"page {page.label} is not on the device; acquire it first")
            start, stop = self._span(i)
            self._page_data(page, stop - start).copy_(flat[start:stop])


class Pager:
    """Moves :class:`PagedTensor` pages between a :class:`DevicePool` and host
    memory, least recently used first: the job the CUDA driver does for
    ``cudaMallocManaged`` memory (QLoRA, Sec. 3).

    * ``create`` makes zero-filled pages on the device (bitsandbytes fills its
      fresh paged state with zeros on the GPU).
    * ``acquire`` pins a tensor's pages and brings the missing ones in, as a
      *prefetch* (``cudaMemPrefetchAsync``, what bitsandbytes does before each
      update) or, with ``prefetch=False``, one *fault* per page (what happens
      when a kernel touches a page that is in CPU RAM). ``release`` unpins.
    * ``evict`` is called by the pool when someone needs room: it copies the
      least recently used unpinned pages to host memory (pinned CPU memory on
      CUDA) and frees their device frames.

    With ``paging=False`` the pager never registers with the pool and never
    evicts: its pages stay on the device like an ordinary optimizer's state.
    """

    def __init__(self, pool: DevicePool, page_bytes: int, *, owner: str = "optimizer",
                 paging: bool = True, prefetch: bool = True) -> None:
        self.pool = pool
        self.page_bytes = page_bytes
        self.owner = owner
        self.paging = paging
        self.prefetch = prefetch
        self.counters = PagingCounters()
        self._lru: OrderedDict[Page, None] = OrderedDict()  # resident pages, oldest first
        self._pinned: set[Page] = set()
        self._host_pinned = pool.torch_device.type == "cuda"
        if paging:
            pool.register_evictable(self)

    def __repr__(self) -> str:
        return (f"Pager(owner={self.owner!r}, page_bytes={self.page_bytes}, "
                f"{len(self._lru)} pages on device, paging={self.paging})")

    # -- what the pool asks -------------------------------------------------
    def evictable_bytes(self) -> int:
        if not self.paging:
            return 0
        return sum(self.page_bytes for page in self._lru if page not in self._pinned)

    def evict(self, nbytes: int) -> int:
        """Move unpinned pages to the host, least recently used first, until
        at least ``nbytes`` bytes are free; returns the bytes freed."""
        if not self.paging:
            return 0
        victims, freed = [], 0
        for page in self._lru:
            if freed >= nbytes:
                break
            if page not in self._pinned:
                victims.append(page)
                freed += self.page_bytes
        for page in victims:
            self._page_out(page)
        return freed

    # -- what the optimizer asks ----------------------------------------------
    def create(self, shape: torch.Size, dtype: torch.dtype, label: str, *, pin: bool = True) -> PagedTensor:
        """A zero-filled paged tensor, every page on the device (pinned until
        ``release`` when ``pin``)."""
        tensor = PagedTensor(shape, dtype, self.page_bytes, label)
        try:
            for page in tensor.pages:
                if pin:
                    self._pinned.add(page)
                page.frame = self.pool.allocate(self.page_bytes, self.owner, label=f"new {page.label}")
                page.frame.tensor.zero_()
                self._lru[page] = None
                self.counters.pages_created += 1
        except BaseException:
            self.drop(tensor)
            raise
        return tensor

    def adopt(self, values: torch.Tensor, label: str, like: torch.Tensor) -> PagedTensor:
        """A paged copy of ``values`` (loading a checkpoint), stored in the
        memory order of ``like`` (the parameter). Its pages start in host
        memory when paging, on the device otherwise."""
        tensor = PagedTensor(values.shape, values.dtype, self.page_bytes, label)
        ordered = torch.empty_like(like, dtype=values.dtype)
        ordered.copy_(values)
        flat = PagedTensor._flat(ordered)
        try:
            for i, page in enumerate(tensor.pages):
                start, stop = tensor._span(i)
                if self.paging:
                    page.host = self._new_host_buffer()
                else:
                    page.frame = self.pool.allocate(self.page_bytes, self.owner, label=f"load {page.label}")
                    self._lru[page] = None
                tensor._page_data(page, stop - start).copy_(flat[start:stop])
        except BaseException:
            self.drop(tensor)
            raise
        return tensor

    def acquire(self, tensors: Iterable[PagedTensor]) -> None:
        """Pin every page of ``tensors`` and bring the ones in host memory to
        the device (prefetch, or page faults with ``prefetch=False``); marks
        them most recently used."""
        tensors = list(tensors)
        for tensor in tensors:
            self._pinned.update(tensor.pages)
        for tensor in tensors:
            for page in tensor.pages:
                if page.frame is None:
                    self._page_in(page)
                else:
                    self._lru.move_to_end(page)

    def release(self, tensors: Iterable[PagedTensor]) -> None:
        """Unpin the pages of ``tensors``: they may be evicted again."""
        for tensor in tensors:
            self._pinned.difference_update(tensor.pages)

    def drop(self, tensor: PagedTensor) -> None:
        """Free every page of ``tensor``, on the device and on the host."""
        for page in tensor.pages:
            self._pinned.discard(page)
            if page.frame is not None:
                self.pool.free(page.frame, label=f"drop {page.label}")
                page.frame = None
                del self._lru[page]
            page.host = None

    def lru_order(self) -> list[str]:
        """Labels of the pages on the device, least recently used first."""
        return [page.label for page in self._lru]

    @property
    def device_bytes(self) -> int:
        return len(self._lru) * self.page_bytes

    # -- the two transfers ----------------------------------------------------
    def _new_host_buffer(self) -> torch.Tensor:
        return torch.empty(self.page_bytes, dtype=torch.uint8, pin_memory=self._host_pinned)

    def _page_out(self, page: Page) -> None:
        assert page.frame is not None and page not in self._pinned
        if page.host is None:
            page.host = self._new_host_buffer()
        page.host.copy_(page.frame.tensor)
        del self._lru[page]
        self.pool.free(page.frame, label=f"evict {page.label}")
        page.frame = None
        self.counters.pages_out += 1
        self.counters.bytes_out += self.page_bytes
        self.counters.evictions += 1

    def _page_in(self, page: Page) -> None:
        assert page.frame is None and page.host is not None
        how = "prefetch" if self.prefetch else "fault"
        page.frame = self.pool.allocate(self.page_bytes, self.owner, label=f"{how} {page.label}")
        page.frame.tensor.copy_(page.host)
        self._lru[page] = None
        self.counters.pages_in += 1
        self.counters.bytes_in += self.page_bytes
        if self.prefetch:
            self.counters.prefetches += 1
        else:
            self.counters.faults += 1


def _scalar_dtype() -> torch.dtype:
    # torch.optim.optimizer._get_scalar_dtype: the dtype of Adam's "step" tensor
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class PagedAdamW(Optimizer):
    """AdamW whose state (``exp_avg``, ``exp_avg_sq``) lives in pages that
    move between a device budget and host memory (QLoRA, Sec. 3, "Paged
    Optimizers"; bitsandbytes' ``PagedAdamW32bit`` on CUDA).

    The update of each parameter is ``torch.optim.AdamW``'s single-tensor
    path (``torch/optim/adam.py``, ``_single_tensor_adam`` with
    ``decoupled_weight_decay=True``), operation for operation::

        step += 1
        p.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1 ** step)
        denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)

    so the parameters equal ``torch.optim.AdamW(foreach=False)``'s bit for bit
    at any budget (on CPU that is torch's default; on CUDA torch defaults to
    the ``foreach`` kernels, which round differently). Parameters whose
    ``grad`` is ``None`` are skipped, as in torch.

    Per parameter, as bitsandbytes does it: create the state on the first
    step (zero pages, on the device), prefetch its pages, update, and leave
    the pages on the device until something needs the room.

    Args:
        params, lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        page_bytes: the page size (a multiple of the parameters' element size).
        device_budget_bytes: the device memory the state may use. ``None``: no
            limit on CPU, the free GPU memory on CUDA. A pool of this size is
            created for the optimizer alone.
        pool: instead of a budget, a :class:`DevicePool` shared with other
            users (activations), so that they compete for the same memory.
        paging: ``False`` keeps every page on the device (never evicted): an
            ordinary optimizer's state, for comparison.
        prefetch: ``False`` brings pages in as page faults instead of
            prefetches (same data movement, counted as ``faults``).

    The state dict has ``torch.optim.AdamW``'s format (``step``, ``exp_avg``,
    ``exp_avg_sq`` tensors per parameter, the same group keys), so a
    checkpoint loads into either optimizer. ``optimizer.state[p]["exp_avg"]``
    is a :class:`PagedTensor`; ``.read()`` gives its values.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, page_bytes: int = DEFAULT_PAGE_BYTES,
                 device_budget_bytes: int | None = None, pool: DevicePool | None = None,
                 paging: bool = True, prefetch: bool = True) -> None:
        if isinstance(lr, torch.Tensor) or any(isinstance(b, torch.Tensor) for b in betas):
            raise TypeError("PagedAdamW takes lr and betas as Python floats (lr.item()), not tensors")
        # torch.optim.Adam's checks, with its messages
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")

        _check_nbytes(page_bytes, "page_bytes")
        if page_bytes <= 0:
            raise ValueError(f"page_bytes must be a positive number of bytes, got {page_bytes}; "
                             f"the default is {DEFAULT_PAGE_BYTES}")
        if pool is not None:
            if not isinstance(pool, DevicePool):
                raise TypeError(f"pool must be a DevicePool, got {type(pool).__name__}")
            if device_budget_bytes is not None:
                raise ValueError("pass either device_budget_bytes (a pool is made for the optimizer) "
                                 "or pool (a shared DevicePool with its own capacity), not both")
        else:
            if device_budget_bytes is not None:
                _check_nbytes(device_budget_bytes, "device_budget_bytes")
                if device_budget_bytes <= 0:
                    raise ValueError(f"device_budget_bytes must be positive (or None for no limit), "
                                     f"got {device_budget_bytes}")
        budget = pool.capacity if pool is not None else device_budget_bytes
        if budget is not None and budget < page_bytes:
            raise ValueError(
                f"the device budget ({budget} bytes) is smaller than one page (page_bytes={page_bytes}): "
                "not a single page of optimizer state would fit. Raise the budget or use smaller pages."
            )

        self.page_bytes = page_bytes
        self._pool_arg = pool
        self._budget_arg = device_budget_bytes
        self._paging = paging
        self._prefetch = prefetch
        self.pager: Pager | None = None  # made once the parameters' device is known
        self._param_index: dict[int, int] = {}
        defaults = {
            "lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
            # torch.optim.AdamW's other group keys, fixed, so state dicts match
            "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
            "differentiable": False, "fused": None, "decoupled_weight_decay": True,
        }
        super().__init__(params, defaults)

    @property
    def pool(self) -> DevicePool:
        """The device memory the pages live in."""
        assert self.pager is not None
        return self.pager.pool

    @property
    def counters(self) -> PagingCounters:
        """Pages and bytes moved so far (see :class:`PagingCounters`)."""
        assert self.pager is not None
        return self.pager.counters

    def reset_counters(self) -> None:
        assert self.pager is not None
        self.pager.counters = PagingCounters()

    def state_pages(self, p: torch.Tensor) -> int:
        """How many pages ``p``'s state takes (``exp_avg`` and ``exp_avg_sq``)."""
        per_page = self.page_bytes // p.element_size()
        return 2 * -(-p.numel() // per_page)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for p in group["params"]:
                self._check_param(p)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        if self.pager is None:
            self._make_pager(group["params"][0].device if group["params"] else torch.device("cpu"))
        for p in group["params"]:
            self._param_index[id(p)] = len(self._param_index)

    def _check_param(self, p: torch.Tensor) -> None:
        if not torch.is_floating_point(p):
            raise TypeError(f"PagedAdamW optimizes floating-point parameters, got {p.dtype}")
        if self.page_bytes % p.element_size():
            raise ValueError(f"page_bytes={self.page_bytes} is not a multiple of the {p.element_size()}-byte "
                             f"elements of a {p.dtype} parameter; use a multiple of {p.element_size()}")
        if self.pager is not None and p.device.type != self.pool.torch_device.type:
            raise ValueError(f"a parameter on {p.device} cannot use a pool on {self.pool.torch_device}; "
                             "keep all parameters on one device")
        budget = self._pool_arg.capacity if self._pool_arg is not None else self._budget_arg
        if budget is not None:
            need = self.state_pages(p) * self.page_bytes
            if need > budget:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} ({p.dtype}) needs {need} bytes "
                    f"({format_size(need)}) of Adam state on the device at once (exp_avg and exp_avg_sq, "
                    f"{self.state_pages(p)} pages of {self.page_bytes} bytes), but the whole device budget "
                    f"is {budget} bytes ({format_size(budget)}). Raise the budget to at least {need} bytes."
                )

    def _make_pager(self, device: torch.device) -> None:
        pool = self._pool_arg
        if pool is None:
            pool = DevicePool(self._budget_arg, torch_device="cuda" if device.type == "cuda" else "cpu")
        elif pool.torch_device.type != device.type:
            raise ValueError(f"the parameters are on {device} but the pool is on {pool.torch_device}")
        self.pager = Pager(pool, self.page_bytes, paging=self._paging, prefetch=self._prefetch)

    def _label(self, p: torch.Tensor, key: str) -> str:
        return f"p{self._param_index[id(p)]}.{key}"

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One AdamW update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pager = self.pager
        assert pager is not None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients (nor does AdamW); "
                                       "consider torch.optim.SparseAdam")
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(p, state)
                paged = (state["exp_avg"], state["exp_avg_sq"])
                try:
                    pager.acquire(paged)
                    exp_avg = state["exp_avg"].gather(p)
                    exp_avg_sq = state["exp_avg_sq"].gather(p)
                    _adamw_update(p, p.grad, exp_avg, exp_avg_sq, state["step"], lr=group["lr"],
                                  beta1=beta1, beta2=beta2, eps=group["eps"],
                                  weight_decay=group["weight_decay"])
                    state["exp_avg"].scatter(exp_avg)
                    state["exp_avg_sq"].scatter(exp_avg_sq)
                finally:
                    pager.release(paged)
        return loss

    def _init_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        """Zero state on the device, as torch's lazy initialization (and
        bitsandbytes' ``init_state``) does; nothing is kept if it fails."""
        assert self.pager is not None
        exp_avg = self.pager.create(p.shape, p.dtype, self._label(p, "exp_avg"))
        try:
            exp_avg_sq = self.pager.create(p.shape, p.dtype, self._label(p, "exp_avg_sq"))
        except BaseException:
            self.pager.drop(exp_avg)
            raise
        state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
        state["exp_avg"] = exp_avg
        state["exp_avg_sq"] = exp_avg_sq

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.AdamW``'s format: the pages read back into tensors
        shaped like the parameters (no page moves). Unlike torch's, the
        returned tensors are copies (``step`` too): a snapshot."""
        packed = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        state = {}
        for index, values in packed["state"].items():
            p = params[index]
            state[index] = {key: (v.read(like=p) if isinstance(v, PagedTensor) else v.clone())
                            for key, v in values.items()}
        return {"state": state, "param_groups": packed["param_groups"]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer or of ``torch.optim.AdamW``. The
        loaded pages start in host memory (paging) and are prefetched on the
        next step; without paging they go straight to the device."""
        for group in state_dict["param_groups"]:
            for key in ("amsgrad", "maximize", "capturable", "differentiable"):
                if group.get(key, False):
                    raise ValueError(f"cannot load a state dict with {key}=True: PagedAdamW implements "
                                     "plain AdamW only")
        assert self.pager is not None
        for values in self.state.values():
            for v in values.values():
                if isinstance(v, PagedTensor):
                    self.pager.drop(v)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
            for p in group["params"]:
                values = self.state.get(p)
                if not values:
                    continue
                # torch's load_state_dict keeps the caller's "step" tensor; a
                # private copy keeps our in-place `step += 1` out of the caller's dict
                values["step"] = values["step"].clone()
                for key in ("exp_avg", "exp_avg_sq"):
                    values[key] = self.pager.adopt(values[key], self._label(p, key), like=p)


def _adamw_update(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  step_t: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float) -> None:
    """One parameter's AdamW update, in the order of torch's
    ``_single_tensor_adam`` (capturable=False, differentiable=False,
    decoupled_weight_decay=True, amsgrad=False, maximize=False)."""
    step_t += 1
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = step_t.item()
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)


def optimizer_state_bytes(optimizer: Optimizer, *, by_key: bool = False) -> int | dict[str, int]:
    """Bytes of optimizer state: the sum of the sizes of the tensors in
    ``optimizer.state`` (``numel * element_size``).

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
    seen: set[tuple[int, int, torch.dtype]] = set()
    totals: dict[str, int] = {}
    for values in optimizer.state.values():
        for key, value in values.items():
            if isinstance(value, PagedTensor):
                nbytes = value.nbytes
            elif isinstance(value, torch.Tensor):
                ident = (value.data_ptr(), value.numel(), value.dtype)
                if value.numel() and ident in seen:
                    continue
                seen.add(ident)
                nbytes = value.numel() * value.element_size()
            else:
                continue
            totals[key] = totals.get(key, 0) + nbytes
    return totals if by_key else sum(totals.values())


# --------------------------------------------------------------------------- #
# A training step on the device: where its memory goes
# --------------------------------------------------------------------------- #
def _identity(t: Any) -> Any:
    return t


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


class ActivationMeter:
    """The activation memory of a forward pass: every tensor that autograd
    saves for the backward pass, counted once per storage, at the moment it
    is saved (``torch.autograd.graph.saved_tensors_hooks``).

    The saved tensors are what stays alive from the forward pass to the
    backward pass on top of the weights; they grow with batch size and
    sequence length, which is where a training run's memory spikes come from
    (QLoRA, Sec. 3, "Paged Optimizers"). Not counted: storages of the tensors
    in ``exclude`` (pass the model: its parameters and buffers are the
    weights, counted elsewhere), a storage saved a second time, and
    temporary buffers that the forward pass frees again without saving them.

    With a ``pool``, every newly saved storage is also allocated in the pool
    for ``owner`` as it is saved, and held until :meth:`release` (call it
    after ``backward()``, which frees them). On a full pool this is where a
    GPU runs out of memory: in the middle of the forward pass, with
    :class:`DeviceOutOfMemoryError` (the meter then gives back what it held);
    a registered pager is asked to evict first.

    One recording per forward pass::

        meter = ActivationMeter(model, pool=pool)
        with meter:
            loss = model(**batch).loss
        meter.nbytes, meter.tensors      # bytes and storages saved
        loss.backward()
        meter.release()

    ``exclude`` is read when the meter is made: make it after the model is
    in its final form (4-bit layers and adapters in place).
    """

    def __init__(self, exclude: torch.nn.Module | Iterable[torch.Tensor] = (), *,
                 pool: DevicePool | None = None, owner: str = "activations") -> None:
        if isinstance(exclude, torch.nn.Module):
            excluded = [*exclude.parameters(), *exclude.buffers()]
        elif isinstance(exclude, torch.Tensor):
            excluded = [exclude]
        else:
            excluded = list(exclude)
            for t in excluded:
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"exclude takes a torch module or tensors, got a {type(t).__name__} in it")
        if pool is not None and not isinstance(pool, DevicePool):
            raise TypeError(f"pool must be a DevicePool, got {type(pool).__name__}")
        self._excluded = {_storage_key(t) for t in excluded if t.layout == torch.strided}
        self.pool = pool
        self.owner = owner
        self.nbytes = 0
        self.tensors = 0
        self._seen: set[tuple[str, int]] = set()
        self._blocks: list[Block] = []
        self._hooks: Any = None

    def __repr__(self) -> str:
        return f"ActivationMeter({self.tensors} storages, {format_size(self.nbytes)})"

    def __enter__(self) -> ActivationMeter:
        if self._hooks is not None:
            raise RuntimeError("this ActivationMeter is already recording")
        if self._blocks:
            raise RuntimeError("the last recording still holds its pool blocks; call release() after "
                               "backward() before recording the next forward pass")
        self.nbytes = 0
        self.tensors = 0
        self._seen.clear()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _identity)
        self._hooks.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        hooks, self._hooks = self._hooks, None
        hooks.__exit__(exc_type, exc, tb)
        if exc_type is not None:
            self.release()
        return False

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.layout != torch.strided:  # sparse and other layouts: count the tensor itself
            key, nbytes = ("tensor", id(t)), t.numel() * t.element_size()
        else:
            key, nbytes = _storage_key(t), t.untyped_storage().nbytes()
        if nbytes == 0 or key in self._excluded or key in self._seen:
            return t
        if self.pool is not None:
            self._blocks.append(self.pool.allocate(nbytes, self.owner,
                                                   label=f"saved {tuple(t.shape)} {t.dtype}"))
        self._seen.add(key)
        self.nbytes += nbytes
        self.tensors += 1
        return t

    def release(self) -> None:
        """Give the blocks held in the pool back (after ``backward()``, or when
        the forward pass failed). ``nbytes`` and ``tensors`` keep their values."""
        blocks, self._blocks = self._blocks, []
        for block in blocks:
            self.pool.free(block)  # type: ignore[union-attr]


def parameter_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of a model's tensors, split the way a finetuning step sees them:
    ``"weights"``, the frozen parameters and all buffers (the packed 4-bit
    weights of :class:`qlora_lab.qlora.LinearNF4` are buffers), and
    ``"adapters"``, the trainable parameters. Each storage counts once (a
    tied output head shares the embedding's)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"parameter_bytes takes a torch module, got {type(model).__name__}")
    seen: set[tuple[str, int]] = set()
    out = {"weights": 0, "adapters": 0}
    tensors = [(p, p.requires_grad) for p in model.parameters()] + [(b, False) for b in model.buffers()]
    for t, trainable in tensors:
        key = _storage_key(t)
        if t.numel() == 0 or key in seen:
            continue
        seen.add(key)
        out["adapters" if trainable else "weights"] += t.numel() * t.element_size()
    return out


def hold_model(pool: DevicePool, model: torch.nn.Module) -> list[Block]:
    """Put a model "on the device": allocate its frozen weights (owner
    ``"weights"``) and trainable parameters (``"adapters"``) in ``pool``
    (:func:`parameter_bytes`). They stay for the whole run, as a model moved
    to a GPU does; returns the two blocks (``pool.free`` them to take it off)."""
    if not isinstance(pool, DevicePool):
        raise TypeError(f"hold_model takes a DevicePool, got {type(pool).__name__}")
    sizes = parameter_bytes(model)
    blocks = [pool.allocate(sizes["weights"], "weights", label="model weights")]
    try:
        blocks.append(pool.allocate(sizes["adapters"], "adapters", label="trainable parameters"))
    except BaseException:
        pool.free(blocks[0])
        raise
    return blocks


@dataclass
class StepTrace:
    """One step of :func:`training_steps`: its loss, its activation memory,
    and the device memory by owner at the two high points of a step.

    ``at_backward``: when the backward pass begins (every activation saved,
    no gradient yet); ``at_update``: during the optimizer step (the
    gradients, no activation). A step peaks at one of the two (the model
    of chapter 03: activations and gradients are never all alive at once).
    Both are empty without a pool. ``counters``: what the optimizer's pager
    moved during the step (empty for an optimizer without one).
    """

    step: int
    tokens: int
    loss: float
    activation_bytes: int
    activation_tensors: int
    at_backward: dict[str, int]
    at_update: dict[str, int]
    peak: int
    counters: dict[str, int]


def _default_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def _counters(optimizer: Optimizer) -> dict[str, int]:
    pager = getattr(optimizer, "pager", None)
    return pager.counters.as_dict() if isinstance(pager, Pager) else {}


def training_steps(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], optimizer: Optimizer,
                   pool: DevicePool | None = None, *,
                   loss_fn: Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
                   ) -> Iterator[StepTrace]:
    """Train ``model`` one batch at a time and yield a :class:`StepTrace` per
    step, charging the step's memory to ``pool`` (a simulated GPU) as a GPU
    would see it.

    Each step: the forward pass (``loss_fn(model, batch)``, default
    ``model(**batch).loss``) inside an :class:`ActivationMeter` that
    allocates every saved tensor in the pool ("activations"); the backward
    pass; the activations are freed and the gradients of the trainable
    parameters are allocated ("gradients"); ``optimizer.step()`` (a
    :class:`PagedAdamW` on the same pool allocates and prefetches its pages
    there, "optimizer"); ``optimizer.zero_grad(set_to_none=True)`` frees the
    gradients. Put the model in the pool first (:func:`hold_model`).

    When the pool runs out, :class:`DeviceOutOfMemoryError` propagates out of
    the loop, as a CUDA out-of-memory error ends a training run, after the
    step's activations and gradients were given back. Without a pool nothing
    is charged, and the steps are the plain training loop (the activations
    are still measured).
    """
    if pool is not None and not isinstance(pool, DevicePool):
        raise TypeError(f"pool must be a DevicePool, got {type(pool).__name__}")
    loss_fn = loss_fn or _default_loss
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (requires_grad=True); add adapters first")
    gradient_bytes = sum(p.numel() * p.element_size() for p in trainable)
    meter = ActivationMeter(model, pool=pool)
    for step, batch in enumerate(batches):
        before = _counters(optimizer)
        if pool is not None:
            pool.reset_peak()
        gradients: Block | None = None
        try:
            with meter:
                loss = loss_fn(model, batch)
            at_backward = pool.usage() if pool is not None else {}
            loss.backward()
            meter.release()
            if pool is not None:
                gradients = pool.allocate(gradient_bytes, "gradients", label=f"gradients of step {step}")
            optimizer.step()
            at_update = pool.usage() if pool is not None else {}
        finally:
            meter.release()
            optimizer.zero_grad(set_to_none=True)
            if gradients is not None:
                pool.free(gradients)  # type: ignore[union-attr]
        after = _counters(optimizer)
        ids = batch.get("input_ids")
        yield StepTrace(
            step=step,
            tokens=ids.numel() if isinstance(ids, torch.Tensor) else 0,
            loss=loss.item(),
            activation_bytes=meter.nbytes,
            activation_tensors=meter.tensors,
            at_backward=at_backward,
            at_update=at_update,
            peak=pool.peak if pool is not None else 0,
            counters={k: after[k] - before[k] for k in after},
        )
