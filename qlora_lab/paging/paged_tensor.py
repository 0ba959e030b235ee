"""A tensor stored in fixed-size pages, each on the device or in host memory:
the layout behind QLoRA's paged optimizers (Sec. 3), in plain PyTorch.

A :class:`PagedTensor` cuts a flat tensor into :class:`Page` s of
:data:`DEFAULT_PAGE_BYTES`; each page's data is in exactly one place, a device
:class:`qlora_lab.paging.device_pool.Block` or a host buffer. It reads and writes
its values wherever the pages are; moving them is the job of
:class:`qlora_lab.paging.pager.Pager`.
"""

from __future__ import annotations

import torch

from qlora_lab.paging.device_pool import Block

__all__ = ["DEFAULT_PAGE_BYTES", "Page", "PagedTensor"]

DEFAULT_PAGE_BYTES = 4096
"""4 KiB, the size of a CPU memory page on x86 (the CUDA driver migrates unified
memory in pages of this size and in larger blocks, up to 2 MiB)."""


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

    def span(self, i: int) -> tuple[int, int]:
        """The elements ``[start, stop)`` that page ``i`` holds."""
        start = i * self.page_numel
        return start, min(start + self.page_numel, self.numel)

    @staticmethod
    def flat(t: torch.Tensor) -> torch.Tensor:
        """A dense tensor's storage as one flat view, in memory order; works for
        any dense layout (``empty_like(p)`` keeps ``p``'s layout, as torch's
        ``zeros_like`` state does)."""
        return t.as_strided((t.numel(),), (1,))

    def page_data(self, page: Page, count: int) -> torch.Tensor:
        """The first ``count`` elements of ``page``, on the device or on the
        host, wherever it is: a view, so writing it writes the page."""
        raw = page.frame.tensor if page.frame is not None else page.host
        return raw.view(self.dtype)[:count]

    def read(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """A copy of the whole tensor (shape ``shape``), read from wherever each
        page is, without moving pages (a debugger's view, or a checkpoint)."""
        out = torch.empty(self.shape, dtype=self.dtype) if like is None else torch.empty_like(like)
        flat = self.flat(out)
        for i, page in enumerate(self.pages):
            start, stop = self.span(i)
            flat[start:stop].copy_(self.page_data(page, stop - start))
        return out

    def gather(self, like: torch.Tensor) -> torch.Tensor:
        """The device pages copied into one workspace shaped like ``like``: what
        the update kernel reads. Every page must be on the device."""
        out = torch.empty_like(like)
        flat = self.flat(out)
        for i, page in enumerate(self.pages):
            if page.frame is None:
                raise RuntimeError(f"page {page.label} is not on the device; acquire it first")
            start, stop = self.span(i)
            flat[start:stop].copy_(self.page_data(page, stop - start))
        return out

    def scatter(self, values: torch.Tensor) -> None:
        """Write ``values`` (a tensor shaped like the workspace) back into the
        device pages."""
        flat = self.flat(values)
        for i, page in enumerate(self.pages):
            if page.frame is None:
                raise RuntimeError(f"page {page.label} is not on the device; acquire it first")
            start, stop = self.span(i)
            self.page_data(page, stop - start).copy_(flat[start:stop])
