"""4-bit NormalFloat (NF4), FP4 and Int4: block-wise 4-bit quantization (QLoRA, Sec. 3).

The three 4-bit data types
--------------------------
A 4-bit data type is a table of 16 numbers in [-1, 1]; a weight is stored as
the 4-bit index of the table entry nearest to it (after scaling, see below).

* **NF4** (:func:`normal_float_code`): the table holds quantiles of N(0, 1), so
  that every entry is used equally often by normally distributed weights
  ("quantile quantization", QLoRA Sec. 3, Eq. (4)). bitsandbytes builds an
  asymmetric version with an exact zero; the paper's formula gives a symmetric
  one without zero. Both are built here, for k = 2, 3 and 4 bits.
* **FP4** (:func:`fp4_code`): bitsandbytes' 4-bit float: 1 sign, 2 exponent and
  1 mantissa bit.
* **Int4** (:func:`int4_code`): evenly spaced integers -7..7, divided by 7.

Block-wise quantization (QLoRA Sec. 2, "Block-wise k-bit Quantization")
-------------------------------------------------------------------------
The tensor is flattened and cut into blocks of ``blocksize`` values (the last
block may be shorter). Each block is divided by its absolute maximum (its
"absmax", one float32 per block), which maps it into [-1, 1]; every value is
then replaced by the index of the nearest table entry, and two 4-bit indices
are packed into one byte: element ``2i`` in the high nibble, ``2i + 1`` in the
low nibble, shape ``((n + 1) // 2, 1)``. Dequantization is a table look-up
times the block's absmax.

Bit for bit with bitsandbytes
-----------------------------
For ``"nf4"`` and ``"fp4"`` :func:`quantize_4bit` returns the same bytes and
absmax as ``bitsandbytes.functional.quantize_4bit`` on CPU (bitsandbytes
0.50.2, ``bitsandbytes/backends/default/ops.py``), and :func:`dequantize_4bit`
the same values as its ``dequantize_4bit``. That needs bitsandbytes' exact
rules, which are:

1. Scaling: the full blocks are multiplied by the float32 reciprocal
   ``1 / absmax`` but the partial last block is *divided* by its absmax. The
   two differ by one rounding step for about one value in ten million, which
   is enough to move a value that sits next to a threshold into the other
   bucket. We follow bitsandbytes (multiply for full blocks, divide for the
   partial block) so that the bytes agree; neither rule is more right than
   the other for quantization error. A zero block is scaled with
   ``1 / 1e-38`` (its absmax is stored as 0).
2. Nearest code: the thresholds are the float32 midpoints of neighbouring
   (sorted) table entries, and a value exactly on a threshold goes to the
   lower entry (``torch.bucketize`` with ``right=False``).
3. Odd element counts: the missing last value is quantized as 0.0, so the
   final low nibble is the code of zero (7 for NF4), not 0.

Inconsistencies of bitsandbytes (0.50.2) found while matching it
-----------------------------------------------------------------
* FP4 has a +0 (index 0) and a -0 (index 8). The CPU quantizer maps small
  *negative* values (down to -0.0026) to +0 and small *positive* values to -0,
  because it sorts the table with ``argsort`` and +0 comes first. The values
  dequantize to 0.0 either way (``-0.0 == 0.0``); we reproduce the bytes.
* The FP4 table the kernels use has the subnormal 0.0625/12 = 0.0052, while
  ``create_fp8_map(signed=True, exponent_bits=2, precision_bits=1,
  total_bits=4)``, which bitsandbytes' comments say regenerates it, gives
  0.125/6 = 0.0208. :func:`fp4_code` is the table the kernels use.
* ``get_4bit_type("int4")`` raises ``RuntimeError`` (it divides an integer
  tensor in place), and ``quantize_4bit`` accepts only ``"nf4"``/``"fp4"``; so
  Int4 has no bitsandbytes counterpart to compare with.
* The CPU ``dequantize_4bit`` has an AVX-512 kernel that assumes every row of
  the output starts a new block. When the last dimension is a multiple of 16
  but not of the block size (for example 576 columns with blocks of 128) and
  there is more than one row, it multiplies by the wrong absmax. It is used
  for block sizes below 2048 and even last dimensions on AVX-512 CPUs;
  elsewhere a scalar C loop or a PyTorch fallback computes the values
  correctly. :func:`dequantize_4bit` always uses the flattened-block
  definition (the one the quantizer uses).
* A 1-D tensor of even length comes back from the C kernel with shape
  ``(1, n)``, from the PyTorch fallback (odd length) with shape ``(n,)``, and
  a tensor of one or two elements comes back transposed. Ours keeps the shape.
* A block whose absmax is below 1e-38 (float32 subnormals, possible in
  bfloat16 too) is scaled by 1e38 instead of 1/absmax, so its values do not
  reach +-1 and are quantized too coarsely. We reproduce this too.
* The absmax *stored* for the partial last block is clamped to 1e-38, the
  one stored for full blocks is not: an all-zero block stores 0 when it is a
  full block and 1e-38 when it is the last, partial one. We store what
  bitsandbytes stores (the dequantized values are 0 either way).

Speed
-----
bitsandbytes finds the nearest code with ``torch.bucketize``, a binary search
per value that runs on one core and takes most of the quantization time. We
get the same answer from two table look-ups (:class:`NearestCodeTable`), and
dequantize with a 256-entry table that turns one byte into its two values at
once. Dequantization is bound by memory: large outputs are allocated in 2 MiB
pages and decoded by several threads (see the comment above
``_DECODE_CHUNK``). ``bench/quantize.py`` measures both against bitsandbytes.
"""

from __future__ import annotations

import functools
import math
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy
import torch

if TYPE_CHECKING:  # pragma: no cover
    from qlora_lab.double_quant import NestedState

QUANT_TYPES = ("nf4", "fp4", "int4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: bitsandbytes' offset for NF4: the outermost quantile is taken at this
#: probability instead of 1 (where the N(0, 1) quantile is infinite).
NF4_OFFSET = 0.9677083

# Absmax values below this are replaced by it before taking the reciprocal
# (bitsandbytes does the same), so that a zero block does not divide by zero.
_TINY_ABSMAX = 1e-38


# --------------------------------------------------------------------------- #
# The data types
# --------------------------------------------------------------------------- #
def normal_float_offset(bits: int = 4) -> float:
    """The probability at which the outermost NF-k quantile is taken.

    The N(0, 1) quantiles at probabilities 0 and 1 are infinite, so the
    construction stops short of them. For k = 4 bitsandbytes uses
    0.9677083; that number is ``1 - (1/30 + 1/32) / 2`` rounded to 7 digits:
    the mean of ``1 - 1/(2*15)`` and ``1 - 1/(2*16)``, the centres of the last
    of 15 and of 16 equally likely bins. We use the same rule for every k,
    ``1 - (1/(2(2^k - 1)) + 1/2^(k+1)) / 2`` rounded to 7 digits, which gives
    exactly bitsandbytes' constant for k = 4.
    """
    _check_bits(bits)
    levels = 2**bits
    return round(1 - (1 / (2 * (levels - 1)) + 1 / (2 * levels)) / 2, 7)


def normal_float_code(bits: int = 4, symmetric: bool = False) -> torch.Tensor:
    """The NF-k data type: ``2**bits`` float32 values in [-1, 1], sorted.

    ``symmetric=False`` (the default, used by QLoRA and bitsandbytes): the
    asymmetric type with an exact zero (QLoRA Sec. 3, last paragraph). With
    ``half = 2**(bits-1)``: ``half`` positive quantiles of N(0, 1) at
    probabilities evenly spaced from the offset (:func:`normal_float_offset`)
    down to 0.5 (excluded), ``half - 1`` negative ones likewise, and 0;
    divided by the largest. For ``bits=4`` this is bitsandbytes' NF4 table
    (``create_normal_map()``) to the float32 bit: it is computed the same way
    (float32 probabilities from ``torch.linspace``, quantiles in float64,
    rounded to float32, divided by the maximum in float32).

    The quantile function Q of N(0, 1) is ``torch.special.ndtri`` in float64,
    the same function as ``scipy.stats.norm.ppf`` (the tests check that both
    give these codes to the bit), so quantizing needs no scipy at run time.

    ``symmetric=True``: the paper's Eq. (4),
    ``q_i = (Q(p_i) + Q(p_{i+1})) / 2`` for ``i = 0 .. 2**bits - 1``, each value
    the midpoint of two neighbouring quantiles of 2**bits + 1 evenly spaced
    probabilities. As printed, Eq. (4) takes ``p_i = i / (2**bits + 1)`` and so
    needs Q(0) = -inf; like bitsandbytes we put the outermost probabilities at
    ``1 - offset`` and ``offset`` instead. The result is symmetric around zero
    and has no value at zero, which is why QLoRA uses the asymmetric type.
    """
    _check_bits(bits)
    offset = normal_float_offset(bits)
    half = 2 ** (bits - 1)
    quantile = torch.special.ndtri  # Q, the inverse of the N(0, 1) distribution function
    if symmetric:
        probabilities = torch.linspace(1 - offset, offset, 2**bits + 1, dtype=torch.float64)
        quantiles = quantile(probabilities)
        midpoints = (quantiles[:-1] + quantiles[1:]) / 2
        return (midpoints / midpoints.abs().max()).to(torch.float32)
    positive = quantile(torch.linspace(offset, 0.5, half + 1)[:-1].double())
    negative = -quantile(torch.linspace(offset, 0.5, half)[:-1].double())
    values = torch.tensor([*positive.tolist(), 0.0, *negative.tolist()], dtype=torch.float32)
    values = values.sort().values
    return values / values.max()


def fp4_code() -> torch.Tensor:
    """bitsandbytes' FP4 data type: 16 float32 values in index order.

    The 4-bit index is ``s e1 e0 m`` (sign, two exponent bits, one mantissa
    bit). Exponent field ``e >= 1`` gives ``(1 + m/2) * 2**(4 - e)``, i.e.
    8, 12 (e=1), 4, 6 (e=2), 2, 3 (e=3); ``e = 0`` is subnormal: ``m / 16``,
    i.e. 0 and 0.0625. The sign bit negates (index 8 is -0). Divided by the
    largest magnitude, 12. Equal bit for bit to
    ``bitsandbytes.functional.get_4bit_type("fp4")``.
    """
    values = []
    for index in range(16):
        sign = -1.0 if index & 0b1000 else 1.0
        exponent = (index >> 1) & 0b11
        mantissa = index & 0b1
        magnitude = mantissa / 16 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (4 - exponent)
        values.append(sign * magnitude)
    code = torch.tensor(values, dtype=torch.float32)
    return code / code.abs().max()


def int4_code() -> torch.Tensor:
    """The Int4 data type: 16 float32 values in index order.

    Index ``i`` stores the 4-bit two's-complement integer ``k`` (0..7 for
    ``i`` = 0..7, -8..-1 for ``i`` = 8..15) and means ``k / 7``. Quantization
    is symmetric (absmax maps to 7, as int8 absmax maps to 127), so only
    -7..7 are ever produced; index 8 (-8/7, outside [-1, 1]) is never chosen.
    """
    integers = torch.tensor([i if i < 8 else i - 16 for i in range(16)], dtype=torch.float32)
    return integers / 7


def integer_code(bits: int) -> torch.Tensor:
    """The symmetric k-bit integer type, sorted: ``k / m`` for ``k = -m .. m``
    with ``m = 2**(bits-1) - 1`` (15 values for 4 bits, 7 for 3, 3 for 2)."""
    _check_bits(bits)
    largest = 2 ** (bits - 1) - 1
    return torch.arange(-largest, largest + 1, dtype=torch.float32) / largest


def float_code(exponent_bits: int, mantissa_bits: int) -> torch.Tensor:
    """A signed minifloat with ``1 + exponent_bits + mantissa_bits`` bits, sorted
    and divided by its largest value.

    IEEE-style: bias ``2**(exponent_bits-1) - 1``, exponent field 0 is
    subnormal (``m * 2**(1 - bias)``), no infinities or NaN, +0 and -0 merged.
    ``float_code(2, 1)`` is the E2M1 FP4 of the OCP microscaling formats
    (0, 0.5, 1, 1.5, 2, 3, 4, 6, over 6); ``float_code(2, 0)`` a 3-bit float
    (0, 1, 2, 4 over 4).
    """
    if exponent_bits < 1 or mantissa_bits < 0 or exponent_bits + mantissa_bits > 7:
        raise ValueError(
            f"float_code needs exponent_bits >= 1, mantissa_bits >= 0 and at most 7 bits besides the "
            f"sign; got exponent_bits={exponent_bits}, mantissa_bits={mantissa_bits}"
        )
    bias = 2 ** (exponent_bits - 1) - 1
    magnitudes = set()
    for exponent in range(2**exponent_bits):
        for mantissa in range(2**mantissa_bits):
            fraction = mantissa / 2**mantissa_bits
            if exponent == 0:
                magnitudes.add(fraction * 2.0 ** (1 - bias))
            else:
                magnitudes.add((1 + fraction) * 2.0 ** (exponent - bias))
    positive = sorted(magnitudes)
    values = torch.tensor([-m for m in reversed(positive[1:])] + positive, dtype=torch.float32)
    return values / values.max()


def code_for(quant_type: str) -> torch.Tensor:
    """The 16-entry table of ``"nf4"``, ``"fp4"`` or ``"int4"``, in index order."""
    _check_quant_type(quant_type)
    return _cached_code(quant_type).clone()


@functools.lru_cache(maxsize=None)
def _cached_code(quant_type: str) -> torch.Tensor:
    return {"nf4": normal_float_code, "fp4": fp4_code, "int4": int4_code}[quant_type]()


# --------------------------------------------------------------------------- #
# Nearest code
# --------------------------------------------------------------------------- #
class NearestCodeTable:
    """Finds the nearest entry of a code table for many values at once.

    The rule (bitsandbytes'): sort the table, put a threshold at the float32
    midpoint of each pair of neighbours, and give a value the number of
    thresholds strictly below it (``torch.bucketize(x, thresholds)``), i.e. a
    value exactly on a threshold goes to the lower entry. Then map the sorted
    position back to the table's own index order (FP4 and Int4 are not sorted).

    ``torch.bucketize`` does a binary search per value on one core, which is
    slow for millions of values. The same answer comes from a look-up: the
    upper 16 bits of a float32 (sign, exponent and the first 7 mantissa bits)
    pick one of 65536 intervals of consecutive floats. Most intervals lie
    between two thresholds, and the table ``first`` gives their bucket
    directly; the few intervals that contain a threshold also get that
    threshold in ``threshold`` (+inf elsewhere), and one comparison decides:
    ``bucket = first[cell] + (x > threshold[cell])``. That is exact, because
    ``bucketize`` is monotone in ``x`` and the floats of an interval are
    consecutive. If some interval contained two thresholds (a table with very
    close entries, such as the 8-bit dynamic map), we use ``bucketize``.
    """

    def __init__(self, code: torch.Tensor):
        if code.dim() != 1 or not 2 <= code.numel() <= 256:
            raise ValueError(f"a code table is a 1-D tensor of 2 to 256 values, got shape {tuple(code.shape)}")
        code = code.detach().to("cpu", torch.float32)
        self.code = code
        self.order = torch.argsort(code, stable=True)
        ordered = code[self.order]
        self.thresholds = (ordered[:-1] + ordered[1:]) / 2
        self.identity_order = bool(torch.equal(self.order, torch.arange(code.numel())))

        cells = torch.arange(65536, dtype=torch.int32) << 16
        ends = torch.stack([cells.view(torch.float32), (cells | 0xFFFF).view(torch.float32)])
        buckets = torch.bucketize(ends, self.thresholds)
        first, last = buckets.min(0).values, buckets.max(0).values
        finite = ~torch.isnan(ends).any(0)
        self.exact_lookup = bool(((last - first)[finite] <= 1).all())
        ambiguous = finite & (last > first)
        self.first = torch.where(finite, first, 0).to(torch.uint8)
        self.threshold = torch.full((65536,), float("inf"))
        self.threshold[ambiguous] = self.thresholds[first[ambiguous]]
        self._device_tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._device_tables:
            self._device_tables[device] = (
                self.first.to(device),
                self.threshold.to(device),
                self.thresholds.to(device),
                self.order.to(device, torch.uint8),
            )
        return self._device_tables[device]

    def __call__(self, scaled: torch.Tensor) -> torch.Tensor:
        """Index (uint8, in the table's own order) of the nearest entry for
        each value of the float32 tensor ``scaled`` (flattened)."""
        first, threshold, thresholds, order = self._tables(scaled.device)
        scaled = scaled.reshape(-1).contiguous()
        if self.exact_lookup:
            cell = _upper_16_bits(scaled)
            index = first.index_select(0, cell)
            limit = threshold.index_select(0, cell)
            # cell is not needed any more: its memory holds the comparison
            # (saves allocating, and the OS zeroing, one more large buffer).
            above = torch.gt(scaled, limit, out=cell.view(torch.bool)[: scaled.numel()])
            index += above
        else:
            index = torch.bucketize(scaled, thresholds, out_int32=True).to(torch.uint8)
        if not self.identity_order:
            index = order.index_select(0, index.to(torch.int32))
        return index


def _upper_16_bits(x: torch.Tensor) -> torch.Tensor:
    """The upper 16 bits of each float32 of a contiguous 1-D tensor, as int32
    indices in 0..65535 (on little-endian machines: every second uint16 of
    the tensor's memory, copied into an int32 buffer)."""
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


# --------------------------------------------------------------------------- #
# Block-wise quantization with any code table (k bits, unpacked)
# --------------------------------------------------------------------------- #
def blockwise_absmax(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Absolute maximum of each block of the flattened tensor (float32; the
    last block may be shorter, and its absmax is at least 1e-38, as in
    bitsandbytes)."""
    flat = x.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    # max(|x|) = max(largest, -smallest); two plain reductions are faster than
    # abs() (a full-size temporary) or aminmax on CPU.
    absmax = torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg_()).abs_()  # abs_: -0.0 -> 0.0
    if full < n:
        # bitsandbytes stores the partial block's absmax clamped to 1e-38 (and
        # the full blocks' unclamped): an all-zero last block gets 1e-38, not 0.
        last = flat[full:].abs().max().float().clamp(min=_TINY_ABSMAX)
        absmax = torch.cat([absmax.float(), last.reshape(1)])
    return absmax.float()


def scale_blocks(x: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Each value divided by its block's absmax, as float32 (flattened), with
    bitsandbytes' rounding: full blocks multiplied by the float32 reciprocal
    ``1 / absmax``, the partial last block divided by its absmax (see the
    module docstring), absmax below 1e-38 replaced by 1e-38."""
    flat = x.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    blocks = full // blocksize
    safe = absmax.clamp(min=_TINY_ABSMAX)
    scaled = torch.empty(n, dtype=torch.float32, device=x.device)
    torch.mul(flat[:full].view(blocks, blocksize), (1.0 / safe[:blocks]).view(-1, 1),
              out=scaled[:full].view(blocks, blocksize))
    if full < n:
        # .float() first: a 0-dim float32 divisor would not promote a half tensor
        torch.div(flat[full:].float(), safe[blocks], out=scaled[full:])
    return scaled


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise absmax quantization to any code table (QLoRA Sec. 2): returns
    ``(indices, absmax)``, one uint8 index per element (flattened, unpacked)
    and one float32 absmax per block. :func:`quantize_4bit` packs these; use
    this directly for 2-bit, 3-bit or other experiments."""
    _check_input(x, "quantize_blockwise")
    _check_blocksize(blocksize, any_positive=True)
    x = x.detach()
    absmax = blockwise_absmax(x, blocksize)
    _check_finite(absmax, "quantize_blockwise")
    indices = nearest_code_table(code)(scale_blocks(x, absmax, blocksize))
    return indices, absmax


def dequantize_blockwise(indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 64,
                         shape: tuple[int, ...] | torch.Size | None = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[index] * absmax`` computed
    in float32, then cast to ``dtype`` and reshaped to ``shape``."""
    flat = indices.reshape(-1)
    n = flat.numel()
    if absmax.numel() != -(-n // blocksize):
        raise ValueError(f"{n} indices in blocks of {blocksize} need {-(-n // blocksize)} absmax values, "
                         f"got {absmax.numel()}")
    values = code.to(absmax.device, torch.float32)[flat.long()]
    return _scale_back(values, absmax.float(), blocksize, dtype).reshape(shape if shape is not None else indices.shape)


def _scale_back(values: torch.Tensor, absmax: torch.Tensor, blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """``values * absmax`` per block in float32 (in place when possible), then
    rounded once to ``dtype``."""
    n = values.numel()
    full = n - n % blocksize
    blocks = full // blocksize
    if dtype == torch.float32:
        values[:full].view(blocks, blocksize).mul_(absmax[:blocks].view(-1, 1))
        if full < n:
            values[full:].mul_(absmax[blocks])
        return values
    out = torch.empty(n, dtype=dtype, device=values.device)
    torch.mul(values[:full].view(blocks, blocksize), absmax[:blocks].view(-1, 1),
              out=out[:full].view(blocks, blocksize))
    if full < n:
        torch.mul(values[full:], absmax[blocks], out=out[full:])
    return out


# --------------------------------------------------------------------------- #
# Nibble packing
# --------------------------------------------------------------------------- #
def pack_nibbles(indices: torch.Tensor) -> torch.Tensor:
    """Two 4-bit indices per byte: element ``2i`` in the high nibble, ``2i + 1``
    in the low one; shape ``(n // 2, 1)`` (``n`` must be even)."""
    if indices.numel() % 2:
        raise ValueError(f"pack_nibbles needs an even number of indices, got {indices.numel()}; pad first")
    flat = indices.reshape(-1)
    return torch.bitwise_left_shift(flat[0::2], 4).bitwise_or_(flat[1::2]).unsqueeze(1)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit indices of a packed tensor, high nibble first (uint8, 1-D)."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)


@functools.lru_cache(maxsize=16)
def _byte_pairs_for(code_bytes: bytes) -> torch.Tensor:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    byte = torch.arange(256)
    pairs = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1).contiguous()
    return pairs.view(torch.int64).reshape(256)


def byte_pair_table(code: torch.Tensor) -> torch.Tensor:
    """For each of the 256 byte values its two decoded values (high nibble,
    low nibble) as one 8-byte entry, so that one gather decodes two weights.
    Stored as int64 so that the look-up copies bits and never touches them
    as floating-point numbers."""
    if code.numel() != 16:
        raise ValueError(f"a 4-bit code has 16 values, got {code.numel()}")
    code = code.detach().to("cpu", torch.float32).contiguous()
    return _byte_pairs_for(code.numpy().tobytes())


# --------------------------------------------------------------------------- #
# The quantization state
# --------------------------------------------------------------------------- #
@dataclass
class QuantState:
    """What is needed besides the packed bytes to dequantize a 4-bit tensor.

    ``absmax`` holds the per-block constants as stored: float32, or, with
    double quantization (QLoRA Sec. 3), one uint8 code per block, in which case
    ``nested`` (a :class:`qlora_lab.double_quant.NestedState`) holds the mean
    offset and the second-level float32 constants. ``code`` is the 16-entry
    table in index order. The layout is that of bitsandbytes' ``QuantState``;
    :meth:`to_bnb` and :meth:`from_bnb` convert without copying tensors.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    nested: NestedState | None = None

    @property
    def numel(self) -> int:
        """Number of quantized elements."""
        return math.prod(self.shape)

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of every block (dequantizing the nested constants
        first when the state is double-quantized)."""
        if self.nested is None:
            return self.absmax
        from qlora_lab.double_quant import double_dequantize

        return double_dequantize(self.absmax, self.nested)

    def to_bnb(self):
        """The same state as a ``bitsandbytes.functional.QuantState`` (shares
        the tensors). Int4 has no bitsandbytes kernels and raises ValueError."""
        from bitsandbytes.functional import QuantState as BnbQuantState

        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bitsandbytes' 4-bit kernels know only 'nf4' and 'fp4', not {self.quant_type!r}; "
                             f"dequantize Int4 with qlora_lab.nf4.dequantize_4bit")
        offset = state2 = None
        if self.nested is not None:
            offset = self.nested.offset
            state2 = BnbQuantState(absmax=self.nested.absmax, code=self.nested.code,
                                   blocksize=self.nested.blocksize, dtype=torch.float32)
        return BnbQuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=self.code,
                             blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.dtype,
                             offset=offset, state2=state2)

    @classmethod
    def from_bnb(cls, state) -> QuantState:
        """Our state from a ``bitsandbytes.functional.QuantState`` made by its
        ``quantize_4bit`` (shares the tensors)."""
        if state.quant_type not in ("nf4", "fp4") or state.shape is None:
            raise ValueError(f"from_bnb expects the state of a bitsandbytes 4-bit tensor (quant_type 'nf4' or "
                             f"'fp4' and a shape), got quant_type={state.quant_type!r}, shape={state.shape}")
        nested = None
        if state.nested:
            from qlora_lab.double_quant import NestedState

            nested = NestedState(absmax=state.state2.absmax, offset=state.offset,
                                 code=state.state2.code, blocksize=state.state2.blocksize)
        return cls(absmax=state.absmax, shape=torch.Size(state.shape), dtype=state.dtype,
                   blocksize=state.blocksize, quant_type=state.quant_type, code=state.code, nested=nested)


# --------------------------------------------------------------------------- #
# 4-bit quantization
# --------------------------------------------------------------------------- #
def quantize_4bit(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = False) -> tuple[torch.Tensor, QuantState]:
    """Block-wise 4-bit quantization (QLoRA Sec. 3): ``(packed, state)``.

    ``x``: a float32, float16 or bfloat16 tensor (finite, not empty).
    ``blocksize``: 32 .. 4096, a power of two (QLoRA uses 64).
    ``quant_type``: ``"nf4"``, ``"fp4"`` or ``"int4"``.
    ``double_quant``: also quantize the absmax constants
    (:func:`qlora_lab.double_quant.double_quantize`, QLoRA's "Double
    Quantization").

    ``packed`` is uint8 of shape ``((n + 1) // 2, 1)``. For nf4 and fp4 the
    bytes and absmax equal bitsandbytes' ``quantize_4bit`` on CPU exactly (see
    the module docstring for the rules that takes).
    """
    _check_input(x, "quantize_4bit")
    _check_blocksize(blocksize)
    _check_quant_type(quant_type)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    x = x.detach()
    code = _cached_code(quant_type)
    nearest = nearest_code_table(code)

    absmax = blockwise_absmax(x, blocksize)
    _check_finite(absmax, "quantize_4bit")
    indices = nearest(scale_blocks(x, absmax, blocksize))
    if indices.numel() % 2:
        zero_index = nearest(torch.zeros(1, device=x.device))
        indices = torch.cat([indices, zero_index])
    packed = pack_nibbles(indices)

    nested = None
    if double_quant:
        from qlora_lab.double_quant import double_quantize

        absmax, nested = double_quantize(absmax)
    state = QuantState(absmax=absmax, shape=x.shape, dtype=x.dtype, blocksize=blocksize,
                       quant_type=quant_type, code=code.to(x.device, copy=True), nested=nested)
    return packed, state


def dequantize_4bit(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """The tensor that ``packed`` and ``state`` stand for: each 4-bit index
    looked up in ``state.code``, times its block's absmax (in float32), then
    rounded to ``state.dtype`` and reshaped to ``state.shape``.

    One gather in a 256-entry table (:func:`byte_pair_table`) decodes both
    nibbles of a byte; the multiplication by the absmax is done in place.
    """
    if not isinstance(state, QuantState):
        raise TypeError(f"dequantize_4bit needs a qlora_lab.nf4.QuantState, got {type(state).__name__}; "
                        f"convert a bitsandbytes state with QuantState.from_bnb(state)")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError(f"dequantize_4bit needs the packed uint8 tensor returned by quantize_4bit, got "
                         f"{getattr(packed, 'dtype', type(packed).__name__)}")
    _check_blocksize(state.blocksize)
    _check_quant_type(state.quant_type)
    if state.dtype not in FLOAT_DTYPES:
        raise ValueError(f"state.dtype must be float32, float16 or bfloat16, got {state.dtype}")
    n = state.numel
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"a tensor of shape {tuple(state.shape)} ({n} elements) packs into {(n + 1) // 2} bytes, "
                         f"but packed has {packed.numel()}")
    absmax = state.block_absmax()
    if absmax.numel() != -(-n // state.blocksize):
        raise ValueError(f"{n} elements in blocks of {state.blocksize} need {-(-n // state.blocksize)} absmax "
                         f"values, got {absmax.numel()}")

    return _decode_and_scale(packed.reshape(-1), absmax.float(), state.code, state.blocksize, n,
                             state.dtype).view(state.shape)


# Dequantization is bound by memory, not arithmetic. Three costs, measured on
# a 4096 x 4096 NF4 matrix on this course's 2-core machine, shape the code:
# * Fresh memory: the 64 MiB float32 output is a new mapping that the OS
#   zeroes page by page on first touch: 16 ms in 4 KiB pages, more than the
#   decoding itself. numpy asks Linux for 2 MiB pages (madvise
#   MADV_HUGEPAGE) for arrays of 4 MiB and more, 512 times fewer faults, so
#   CPU outputs are allocated through numpy (:func:`_new_output`).
# * PyTorch's CPU ``index_select`` runs on one core. Tensors of at least
#   ``_PARALLEL_MIN_BYTES`` packed bytes are split between
#   ``torch.get_num_threads()`` Python threads (PyTorch releases the GIL
#   inside its operators), each decoding its own part of the output.
#   Smaller ones are decoded by the calling thread in one step (starting a
#   thread would cost more than it saves).
# * A split tensor is decoded in steps of ``_DECODE_CHUNK`` bytes, whose
#   2 MiB of float32 values are still in cache when they are multiplied by
#   absmax. Steps start on block boundaries (``2 * _DECODE_CHUNK`` values is
#   a multiple of every block size), so only the last one can end with a
#   partial block.
_DECODE_CHUNK = 1 << 18
_PARALLEL_MIN_BYTES = 1 << 20


def _new_output(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised 1-D tensor; on CPU backed by a numpy array, so that
    large outputs are mapped in 2 MiB pages where the OS allows it."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(numpy.empty(numel * itemsize, dtype=numpy.uint8)).view(dtype)


def _decode_and_scale(flat: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, n: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """``code[nibble] * absmax[block]`` for the ``n`` values packed in ``flat``,
    computed in float32 and rounded once to ``dtype``.

    Large tensors are cut into one contiguous range per worker thread
    (whole ``_DECODE_CHUNK`` steps each); :func:`_decode_range` decodes a
    range. See the comment above ``_DECODE_CHUNK`` for why.
    """
    device = flat.device
    pairs = byte_pair_table(code).to(device)
    # float32 is decoded straight into the output, two values per byte: one
    # padding value when n is odd.
    out = _new_output(2 * flat.numel() if dtype == torch.float32 else n, dtype, device)
    if device.type != "cpu" or flat.numel() < _PARALLEL_MIN_BYTES:
        # One thread, one step: PyTorch's own threads share the copy and the
        # multiplication, and there is no per-step overhead.
        _decode_range(flat, 0, flat.numel(), max(flat.numel(), 1), pairs, absmax, blocksize, n, out)
        return out[:n]
    steps = -(-flat.numel() // _DECODE_CHUNK)
    workers = max(1, min(torch.get_num_threads(), steps))
    per_worker = -(-steps // workers) * _DECODE_CHUNK
    ranges = [(start, min(start + per_worker, flat.numel())) for start in range(0, flat.numel(), per_worker)]

    def decode(bounds: tuple[int, int]) -> None:
        _decode_range(flat, bounds[0], bounds[1], _DECODE_CHUNK, pairs, absmax, blocksize, n, out)

    helpers = [threading.Thread(target=_run_catching, args=(decode, bounds)) for bounds in ranges[1:]]
    for helper in helpers:
        helper.start()
    decode(ranges[0])
    for helper in helpers:
        helper.join()
    for helper in helpers:
        if helper.error is not None:
            raise helper.error
    return out[:n]


def _run_catching(fn, *args) -> None:
    """Run ``fn(*args)`` in a helper thread, keeping an exception on the
    thread object for the caller to raise."""
    thread = threading.current_thread()
    thread.error = None
    try:
        fn(*args)
    except BaseException as error:  # re-raised in the calling thread
        thread.error = error


def _decode_range(flat: torch.Tensor, start: int, stop: int, chunk: int, pairs: torch.Tensor,
                  absmax: torch.Tensor, blocksize: int, n: int, out: torch.Tensor) -> None:
    """Decode bytes ``start:stop`` of ``flat`` into ``out``, ``chunk`` bytes at a
    time (``start`` and ``chunk`` on block boundaries):
    the bytes become int32 indices, one ``index_select`` in the 256-entry
    :func:`byte_pair_table` writes two float32 values per byte, which are then
    multiplied by their blocks' absmax in place (and, for a half-precision
    ``out``, rounded into it)."""
    step = min(stop - start, chunk)
    index = torch.empty(step, dtype=torch.int32, device=flat.device)
    buffer = None if out.dtype == torch.float32 else torch.empty(2 * step, dtype=torch.float32, device=flat.device)
    for begin in range(start, stop, chunk):
        piece = flat[begin:min(begin + chunk, stop)]
        first, last = 2 * begin, min(2 * (begin + piece.numel()), n)
        values = out[first:first + 2 * piece.numel()] if buffer is None else buffer[: 2 * piece.numel()]
        torch.index_select(pairs, 0, index[: piece.numel()].copy_(piece), out=values.view(torch.int64))
        values = values[: last - first]
        _scale_back(values, absmax[first // blocksize: -(-last // blocksize)], blocksize, torch.float32)
        if buffer is not None:
            out[first:last].copy_(values)


# --------------------------------------------------------------------------- #
# Fake quantization of a model
# --------------------------------------------------------------------------- #
@torch.no_grad()
def fake_quantize_linear_layers(model: torch.nn.Module, quant_type: str = "nf4", blocksize: int = 64,
                                double_quant: bool = False, code: torch.Tensor | None = None,
                                skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace the weight of every ``nn.Linear`` of ``model`` (in place) by its
    quantized-then-dequantized value, ``dequantize_4bit(*quantize_4bit(w))``.

    This is *fake* quantization: the model still stores and computes in its
    float dtype, but every weight now holds only values the data type can
    represent, so its outputs are those of the quantized model (QLoRA's layer,
    chapter 05, dequantizes the same values on the fly instead). With ``code``
    (any table, e.g. ``normal_float_code(3)``) the weights are quantized to
    that table with :func:`quantize_blockwise` and ``quant_type`` is ignored.
    Layers whose qualified name ends with an entry of ``skip`` are left alone
    (the output layer, tied to the embeddings in SmolLM2; QLoRA keeps it in
    16 bits too). Returns the number of weights replaced.
    """
    if code is None:
        _check_quant_type(quant_type)
        _check_blocksize(blocksize)
    weights = [module.weight for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and not any(name.endswith(s) for s in skip)]

    def round_trip(w: torch.Tensor) -> torch.Tensor:
        if code is None:
            return dequantize_4bit(*quantize_4bit(w, blocksize, quant_type, double_quant))
        indices, absmax = quantize_blockwise(w, code, blocksize)
        return dequantize_blockwise(indices, absmax, code, blocksize, w.shape, w.dtype)

    # When every weight is a whole number of blocks, quantizing them all in one
    # call gives exactly the per-weight result (no block spans two weights) and
    # saves a few thousand small operations. Double quantization takes a mean
    # per weight, so it goes weight by weight.
    same_dtype = len({w.dtype for w in weights}) <= 1
    if weights and not double_quant and same_dtype and all(w.numel() % blocksize == 0 for w in weights):
        flat = round_trip(torch.cat([w.detach().reshape(-1) for w in weights]))
        for weight, values in zip(weights, flat.split([w.numel() for w in weights])):
            weight.data.copy_(values.view(weight.shape))
    else:
        for weight in weights:
            weight.data.copy_(round_trip(weight.detach()))
    return len(weights)


# --------------------------------------------------------------------------- #
# Argument checks
# --------------------------------------------------------------------------- #
def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {', '.join(map(repr, QUANT_TYPES))}, got {quant_type!r}")


def _check_blocksize(blocksize: int, any_positive: bool = False) -> None:
    ok = isinstance(blocksize, int) and not isinstance(blocksize, bool)
    if any_positive:
        if not ok or blocksize < 1:
            raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    elif not ok or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))} (powers of two, as in "
                         f"bitsandbytes), got {blocksize!r}")


def _check_input(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} needs a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} got a {str(x.dtype).removeprefix('torch.')} tensor; pass a float32, float16 "
                         f"or bfloat16 tensor (x.float())")
    if x.numel() == 0:
        raise ValueError(f"{name} got an empty tensor (shape {tuple(x.shape)}); there is nothing to quantize")


def _check_finite(absmax: torch.Tensor, name: str) -> None:
    # A NaN or an infinity anywhere in a block makes that block's absmax NaN or inf.
    if not torch.isfinite(absmax).all():
        raise ValueError(f"{name} got a tensor containing NaN or infinity; quantization needs finite values "
                         f"(find them with torch.isfinite(x))")
