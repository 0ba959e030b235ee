"""Pages that move between the device and the host: what the CUDA driver does
for ``cudaMallocManaged`` memory, the mechanism behind QLoRA's paged
optimizers (Sec. 3), written in plain PyTorch so that every move can be
watched.

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

Here the pages are those of a :class:`qlora_lab.paging.paged_tensor.PagedTensor`,
each on the device (a :class:`qlora_lab.paging.device_pool.Block`) or in host
memory. The :class:`Pager` creates pages, brings them in before use
(prefetch, or one fault per page), and, when the pool asks for room, evicts
the least recently used unpinned ones (our policy; the driver's choice of
victims is its own). :class:`PagingCounters` says what moved.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from qlora_lab.paging.device_pool import DevicePool
from qlora_lab.paging.paged_tensor import Page, PagedTensor

__all__ = ["Pager", "PagingCounters"]


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
        flat = PagedTensor.flat(ordered)
        try:
            for i, page in enumerate(tensor.pages):
                start, stop = tensor.span(i)
                if self.paging:
                    page.host = self._new_host_buffer()
                else:
                    page.frame = self.pool.allocate(self.page_bytes, self.owner, label=f"load {page.label}")
                    self._lru[page] = None
                tensor.page_data(page, stop - start).copy_(flat[start:stop])
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
