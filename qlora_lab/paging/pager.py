"""Pages that move between the device and the host: what the CUDA driver does
for ``cudaMallocManaged`` memory, the mechanism behind QLoRA's paged
optimizers (Sec. 3), written in plain PyTorch so that every move can be
watched.

A :class:`PagedTensor` stores a flat tensor in fixed-size :class:`Page` s;
each page is either on the device (a :class:`qlora_lab.paging.device_pool.Block`)
or in host memory. The :class:`Pager` creates pages, brings them in before
use (prefetch, or one fault per page), and, when the pool asks for room,
evicts the least recently used unpinned ones. :class:`PagingCounters` says
what moved.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from qlora_lab.paging.device_pool import Block, DevicePool

__all__ = ["DEFAULT_PAGE_BYTES", "Page", "PagedTensor", "Pager", "PagingCounters"]

DEFAULT_PAGE_BYTES = 4096
"""4 KiB, the size of a CPU memory page on x86 (the CUDA driver migrates unified
memory in pages of this size and in larger blocks, up to 2 MiB)."""


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
