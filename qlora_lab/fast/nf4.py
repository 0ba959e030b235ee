""":func:`qlora_lab.quant.nf4.quantize_4bit` and :func:`qlora_lab.quant.nf4.dequantize_4bit`,
the same bits, faster: absmax and scaling without padded copies or
temporaries (:func:`absmax_4bit`, :func:`scale_4bit`), the nearest code by
table look-up (:mod:`qlora_lab.fast.nearest`) and the byte-pair, threaded
decode (:mod:`qlora_lab.fast.decode`). Same arguments, same checks, same
:class:`~qlora_lab.quant.blockwise.QuantState`. The training path
(:class:`qlora_lab.qlora.LinearNF4`, :func:`qlora_lab.qlora.quantize_model`)
and :mod:`qlora_lab.quant.fake_quant` run these."""

from __future__ import annotations

import torch

from qlora_lab.fast.decode import decode_packed
from qlora_lab.fast.nearest import nearest_code_table
from qlora_lab.quant import codes, nf4
from qlora_lab.quant.blockwise import TINY_ABSMAX, QuantState


# Values quantized per step: a multiple of every block size (up to 4096), so
# that steps start on block boundaries and only the last one can end inside a
# block. Each step's temporaries (scaled values, cells, two look-ups: 13
# bytes per value) take 13 MiB, which the C library's malloc recycles from one
# step to the next; for the whole of a 4096 x 4096 matrix at once they were
# 208 MiB of fresh memory per call, which the operating system maps and zeroes
# page by page. What it gained: bench/speed_choices.md.
QUANTIZE_CHUNK = 1 << 20


def quantize_4bit(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = False) -> tuple[torch.Tensor, QuantState]:
    """:func:`qlora_lab.quant.nf4.quantize_4bit`, with the nearest code found by
    :class:`~qlora_lab.fast.nearest.NearestCodeTable`, ``QUANTIZE_CHUNK``
    values at a time."""
    nf4.check_quantize_4bit_arguments(x, blocksize, quant_type, double_quant)
    x = x.detach()
    code = codes.code_for(quant_type).to(x.device)
    absmax = absmax_4bit(x, blocksize)
    if not torch.isfinite(absmax).all():
        raise ValueError("quantize_4bit got a tensor containing NaN or infinity; quantization needs finite values "
                         "(find them with torch.isfinite(x))")
    nearest = nearest_code_table(code)
    flat = x.reshape(-1)
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=x.device)
    for start in range(0, n, QUANTIZE_CHUNK):
        stop = min(start + QUANTIZE_CHUNK, n)
        blocks = absmax[start // blocksize: -(-stop // blocksize)]
        indices = nearest(scale_4bit(flat[start:stop], blocks, blocksize))
        packed[start // 2: (stop + 1) // 2] = nf4.pack_nibbles(nf4.pad_to_even(indices, code))
    return packed, nf4.make_state(x, absmax, blocksize, quant_type, double_quant)


def dequantize_4bit(packed: torch.Tensor, state: QuantState, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`qlora_lab.quant.nf4.dequantize_4bit` by :func:`~qlora_lab.fast.decode.decode_packed`;
    into ``out`` (``state.shape``, ``state.dtype``) if it is given, as
    bitsandbytes' ``dequantize_4bit(..., out=)`` does."""
    nf4.check_dequantize_4bit_arguments(packed, state)
    return decode_packed(packed, state.block_absmax(), state.code, state.blocksize, state.numel,
                         state.dtype, out=out).view(state.shape)


def absmax_4bit(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """:func:`qlora_lab.quant.nf4.absmax_4bit`: ``max(largest, -smallest)`` per full
    block (two plain reductions, no ``abs()`` temporary and no padded copy),
    the partial last block on its own."""
    flat = x.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg_()).abs_()  # abs_: -0.0 -> 0.0
    if full < n:
        last = flat[full:].abs().max().float().clamp(min=TINY_ABSMAX)
        absmax = torch.cat([absmax.float(), last.reshape(1)])
    return absmax.float()


def scale_4bit(x: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """:func:`qlora_lab.quant.blockwise.scale_blocks` with ``divide_partial_block=True``,
    written into one float32 output without a padded copy of ``x``."""
    flat = x.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    blocks = full // blocksize
    safe = absmax.clamp(min=TINY_ABSMAX)
    scaled = torch.empty(n, dtype=torch.float32, device=x.device)
    torch.mul(flat[:full].view(blocks, blocksize), (1.0 / safe[:blocks]).view(-1, 1),
              out=scaled[:full].view(blocks, blocksize))
    if full < n:
        # .float() first: a 0-dim float32 divisor would not promote a half tensor
        torch.div(flat[full:].float(), safe[blocks], out=scaled[full:])
    return scaled
