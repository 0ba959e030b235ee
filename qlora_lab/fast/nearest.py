"""The nearest code by table look-up instead of binary search.

Reference: :func:`qlora_lab.quant.blockwise.nearest_code` with float32 midpoints
(bitsandbytes' 4-bit rule), which runs ``torch.bucketize``: a binary search
per value, on one core.

The upper 16 bits of a float32 (sign, exponent and the first 7 mantissa bits)
pick one of 65,536 *cells*, each a run of consecutive floats. Most cells lie
between two thresholds, so every value in them has the same answer: the table
``bucket_at_cell_start`` holds it. A cell that contains a threshold also gets
that threshold in ``threshold_in_cell`` (+inf in every other cell), and one
comparison finishes the job::

    sorted_position = bucket_at_cell_start[cell] + (x > threshold_in_cell[cell])

That equals ``bucketize``, because ``bucketize`` is monotone in ``x`` and the
floats of a cell are consecutive. A code whose thresholds are so close that a
cell holds two of them (the 8-bit dynamic map near zero) falls back to
``bucketize``.
"""

from __future__ import annotations

import functools
import sys

import torch

from qlora_lab.quant.blockwise import code_thresholds


class NearestCodeTable:
    """Finds the nearest entry of ``code`` for many float32 values at once;
    call it on a tensor to get uint8 indices in the code's own order."""

    def __init__(self, code: torch.Tensor):
        if code.dim() != 1 or not 2 <= code.numel() <= 256:
            raise ValueError(f"a code is a 1-D tensor of 2 to 256 values, got shape {tuple(code.shape)}")
        code = code.detach().to("cpu", torch.float32)
        self.code = code
        self.order = torch.argsort(code, stable=True)
        self.thresholds = code_thresholds(code)
        self.identity_order = bool(torch.equal(self.order, torch.arange(code.numel())))

        cells = torch.arange(65536, dtype=torch.int32) << 16
        start, end = cells.view(torch.float32), (cells | 0xFFFF).view(torch.float32)
        # The cells of +-inf end in NaNs: only their numbers count. Cells of
        # NaNs alone get 0 (quantization refuses NaN before it gets here).
        numbers = ~torch.isnan(start)
        end = torch.where(torch.isnan(end), start, end)
        buckets = torch.bucketize(torch.stack([start, end]), self.thresholds)
        lowest, highest = buckets.min(0).values, buckets.max(0).values
        #: False when some cell holds two thresholds: then bucketize is used.
        self.exact_lookup = bool(((highest - lowest)[numbers] <= 1).all())
        holds_threshold = numbers & (highest > lowest)
        self.bucket_at_cell_start = torch.where(numbers, lowest, 0).to(torch.uint8)
        self.threshold_in_cell = torch.full((65536,), float("inf"))
        self.threshold_in_cell[holds_threshold] = self.thresholds[lowest[holds_threshold]]
        self._per_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._per_device:
            self._per_device[device] = (self.bucket_at_cell_start.to(device), self.threshold_in_cell.to(device),
                                        self.thresholds.to(device), self.order.to(device, torch.uint8))
        return self._per_device[device]

    def __call__(self, scaled: torch.Tensor) -> torch.Tensor:
        """Index (uint8, in the code's own order) of the nearest entry for
        each value of the float32 tensor ``scaled`` (flattened)."""
        bucket_at_cell_start, threshold_in_cell, thresholds, order = self._tables(scaled.device)
        scaled = scaled.reshape(-1).float().contiguous()
        if self.exact_lookup:
            cell = upper_16_bits(scaled)
            index = bucket_at_cell_start.index_select(0, cell)
            limit = threshold_in_cell.index_select(0, cell)
            # cell is not needed any more: its memory holds the comparison
            # (saves allocating, and the OS zeroing, one more large buffer).
            above = torch.gt(scaled, limit, out=cell.view(torch.bool)[: scaled.numel()])
            index += above
        else:
            index = torch.bucketize(scaled, thresholds, out_int32=True).to(torch.uint8)
        if not self.identity_order:
            index = order.index_select(0, index.to(torch.int32))
        return index


def upper_16_bits(x: torch.Tensor) -> torch.Tensor:
    """The upper 16 bits of each float32 of a contiguous 1-D tensor, as int32
    cell numbers in 0..65535 (on little-endian machines: every second uint16
    of the tensor's memory, copied into an int32 buffer)."""
    cell = torch.empty(x.numel(), dtype=torch.int32, device=x.device)
    if sys.byteorder == "little":
        return cell.copy_(x.view(torch.uint16)[1::2])
    return torch.bitwise_and(x.view(torch.int32) >> 16, 0xFFFF, out=cell)


@functools.lru_cache(maxsize=32)
def _table_for(code_bytes: bytes) -> NearestCodeTable:
    return NearestCodeTable(torch.frombuffer(bytearray(code_bytes), dtype=torch.float32))


def nearest_code_table(code: torch.Tensor) -> NearestCodeTable:
    """A (cached) :class:`NearestCodeTable` for ``code``."""
    code = code.detach().to("cpu", torch.float32).contiguous()
    return _table_for(code.numpy().tobytes())
