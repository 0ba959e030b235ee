"""Block-wise absmax quantization, written once (QLoRA Sec. 2, Eq. (1)).

Chapters 01, 02 and 03 all quantize the same way, with different tables:

1. **Blocks.** Flatten the tensor and cut it into blocks of ``blocksize``
   consecutive values; the last block may be shorter.
2. **Absmax.** Each block's absolute maximum (its "absmax", one float32 per
   block) is the block's quantization constant.
3. **Scale.** Dividing a block by its absmax maps it into [-1, 1]. As in
   bitsandbytes, the division is a multiplication by the float32 reciprocal
   ``1 / absmax``, and an absmax below ``TINY_ABSMAX`` (a block of zeros) is
   replaced by it, so nothing is divided by zero.
4. **Nearest code.** Every scaled value is replaced by the *index* of the
   nearest value of the data type's table. In this package the table is
   always called the **code** (a 1-D float tensor of 2 to 256 values: NF4's
   16, the 256 of the 8-bit dynamic map) and the positions in it the
   **indices** (uint8).
5. **Back.** Dequantization is ``code[index] * absmax`` of the index's block.

Int8 (chapter 01) uses steps 1-3 with a rounding grid instead of a table,
NF4/FP4/Int4 (chapter 02) steps 1-5 with a 16-value code, double
quantization (chapter 03) steps 1-5 with the 256-value dynamic map on the
absmax constants themselves. :class:`QuantState` is what a 4-bit tensor
carries besides its packed indices; :class:`NestedState` is the second level
when its absmax are quantized again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Absmax values below this are replaced by it before taking the reciprocal
#: (bitsandbytes does the same), so that a zero block does not divide by zero.
TINY_ABSMAX = 1e-38


def check_positive_blocksize(blocksize: int) -> None:
    """ValueError unless ``blocksize`` is a positive int (any size works here;
    the 4-bit and double-quantization entry points allow only powers of two)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int (values per block, e.g. 64), got {blocksize!r}")


def number_of_blocks(n: int, blocksize: int) -> int:
    """How many blocks ``n`` values make: ``ceil(n / blocksize)``."""
    check_positive_blocksize(blocksize)
    return -(-n // blocksize)


def as_blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The flattened ``x`` as a ``(blocks, blocksize)`` matrix, one block per
    row; a partial last block is padded with zeros (which change no absmax)."""
    check_positive_blocksize(blocksize)
    flat = x.reshape(-1)
    return F.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)


def blockwise_absmax(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The absolute maximum of each block of the flattened ``x``, float32."""
    return as_blocks(x, blocksize).abs().amax(dim=1).float()


def scale_blocks(x: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                 divide_partial_block: bool = False) -> torch.Tensor:
    """Each value of the flattened ``x`` times ``1 / absmax`` of its block, in
    float32 (flattened). ``divide_partial_block=True`` divides the partial
    last block by its absmax instead: bitsandbytes' 4-bit quantizer does that
    (see :mod:`qlora_lab.quant.nf4`), and the two differ by one rounding step for
    about one value in ten million."""
    n = x.numel()
    safe = absmax.float().clamp(min=TINY_ABSMAX)
    scaled = (as_blocks(x.float(), blocksize) * (1.0 / safe).view(-1, 1)).reshape(-1)[:n]
    full = n - n % blocksize
    if divide_partial_block and full < n:
        scaled = torch.cat([scaled[:full], x.reshape(-1)[full:].float() / safe[-1]])
    return scaled


def scale_back(values: torch.Tensor, absmax: torch.Tensor, blocksize: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``values * absmax`` of each value's block, computed in float32 and
    rounded once to ``dtype`` (flattened)."""
    n = values.numel()
    return (as_blocks(values.float(), blocksize) * absmax.float().view(-1, 1)).reshape(-1)[:n].to(dtype)


# --------------------------------------------------------------------------- #
# Nearest code
# --------------------------------------------------------------------------- #
def code_thresholds(code: torch.Tensor, midpoint_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The midpoints between neighbouring values of the sorted ``code``:
    a value above the ``i``-th midpoint is nearer to sorted entry ``i + 1``
    than to entry ``i``. Computed in ``midpoint_dtype``: float32 is
    bitsandbytes' 4-bit rule; in float64 the midpoint of two float32 numbers
    is exact."""
    ordered = code.to(midpoint_dtype).sort(stable=True).values
    return (ordered[:-1] + ordered[1:]) / 2


def nearest_code(values: torch.Tensor, code: torch.Tensor,
                 midpoint_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The index (uint8, flattened) of the entry of ``code`` nearest to each value.

    The rule (bitsandbytes'): sort the code, put a threshold halfway between
    neighbours (:func:`code_thresholds`), and give each value the number of
    thresholds strictly below it, so that a value exactly on a threshold goes
    to the lower entry (``torch.bucketize`` with ``right=False``). That is a
    position in the *sorted* code; ``order`` maps it back to the code's own
    index order (FP4 and Int4 are not stored sorted).
    """
    if code.dim() != 1 or not 2 <= code.numel() <= 256:
        raise ValueError(f"a code is a 1-D tensor of 2 to 256 values, got shape {tuple(code.shape)}")
    order = torch.argsort(code, stable=True)
    thresholds = code_thresholds(code, midpoint_dtype).to(values.device)
    sorted_position = torch.bucketize(values.reshape(-1).to(midpoint_dtype), thresholds)
    return order.to(values.device)[sorted_position].to(torch.uint8)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-4 with any code: ``(indices, absmax)``, one uint8 index per
    value of the flattened ``x`` and one float32 absmax per block."""
    absmax = blockwise_absmax(x, blocksize)
    if not torch.isfinite(absmax).all():  # a NaN or inf makes its block's absmax NaN or inf
        raise ValueError("quantize_blockwise got a tensor containing NaN or infinity; quantization needs finite "
                         "values (find them with torch.isfinite(x))")
    return nearest_code(scale_blocks(x, absmax, blocksize), code), absmax


def dequantize_blockwise(indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 64,
                         shape: tuple[int, ...] | torch.Size | None = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Step 5: ``code[index] * absmax`` in float32, then ``dtype`` and ``shape``
    (``indices``' own shape by default)."""
    n = indices.numel()
    if absmax.numel() != number_of_blocks(n, blocksize):
        raise ValueError(f"{n} indices in blocks of {blocksize} need {number_of_blocks(n, blocksize)} absmax "
                         f"values, got {absmax.numel()}")
    values = code.to(absmax.device, torch.float32)[indices.reshape(-1).long()]
    return scale_back(values, absmax, blocksize, dtype).view(shape if shape is not None else indices.shape)


# --------------------------------------------------------------------------- #
# The quantization state
# --------------------------------------------------------------------------- #
@dataclass
class NestedState:
    """The second level of double quantization (QLoRA Sec. 3): the first
    level's absmax, minus their mean ``offset``, quantized block-wise to the
    8-bit ``code`` (the dynamic map) in blocks of ``blocksize``. ``absmax``
    holds the float32 absmax of those second-level blocks. The uint8 indices
    themselves are :attr:`QuantState.absmax_indices`."""

    absmax: torch.Tensor
    offset: torch.Tensor
    code: torch.Tensor
    blocksize: int = 256


@dataclass
class QuantState:
    """What a block-wise quantized tensor needs besides its indices.

    ``shape`` and ``dtype`` of the original tensor, its ``blocksize``, the
    data type (``quant_type`` and its ``code``, in index order) and the block
    constants, in one of two forms:

    * ``absmax``: one float32 per block (plain block-wise quantization), or
    * ``absmax_indices`` (uint8, one per block) with ``nested``, a
      :class:`NestedState`, when the constants are double-quantized.

    :meth:`block_absmax` gives the float32 absmax in either case.
    """

    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    absmax: torch.Tensor | None = None
    absmax_indices: torch.Tensor | None = None
    nested: NestedState | None = None

    def __post_init__(self) -> None:
        if (self.absmax is None) == (self.nested is None) or (self.nested is None) != (self.absmax_indices is None):
            raise ValueError("a QuantState has either absmax (float32 constants) or absmax_indices and nested "
                             "(double-quantized constants), not both and not neither")

    @property
    def numel(self) -> int:
        """Number of quantized values."""
        return math.prod(self.shape)

    @property
    def double_quantized(self) -> bool:
        return self.nested is not None

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of every block: ``absmax``, or the double-quantized
        constants dequantized, ``code[index] * absmax2 + offset`` (bitsandbytes'
        arithmetic and order, so the values agree to the bit)."""
        if self.nested is None:
            return self.absmax
        nested = self.nested
        return dequantize_blockwise(self.absmax_indices, nested.absmax, nested.code, nested.blocksize) + nested.offset

    def to_bnb(self):
        """The same state as a ``bitsandbytes.functional.QuantState`` (shares
        the tensors). bitsandbytes keeps the 8-bit indices in ``absmax`` and the
        second level in ``state2`` and ``offset``. Int4 has no bitsandbytes
        kernels and raises ValueError."""
        from bitsandbytes.functional import QuantState as BnbQuantState

        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bitsandbytes' 4-bit kernels know only 'nf4' and 'fp4', not {self.quant_type!r}; "
                             f"dequantize Int4 with qlora_lab.quant.nf4.dequantize_4bit")
        if self.nested is None:
            return BnbQuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=self.code,
                                 blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.dtype)
        state2 = BnbQuantState(absmax=self.nested.absmax, code=self.nested.code, blocksize=self.nested.blocksize,
                               dtype=torch.float32)
        return BnbQuantState(absmax=self.absmax_indices, shape=torch.Size(self.shape), code=self.code,
                             blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.dtype,
                             offset=self.nested.offset, state2=state2)

    @classmethod
    def from_bnb(cls, state) -> QuantState:
        """Our state from a ``bitsandbytes.functional.QuantState`` made by its
        ``quantize_4bit`` (shares the tensors)."""
        if state.quant_type not in ("nf4", "fp4") or state.shape is None:
            raise ValueError(f"from_bnb expects the state of a bitsandbytes 4-bit tensor (quant_type 'nf4' or "
                             f"'fp4' and a shape), got quant_type={state.quant_type!r}, shape={state.shape}")
        common = dict(shape=torch.Size(state.shape), dtype=state.dtype, blocksize=state.blocksize,
                      quant_type=state.quant_type, code=state.code)
        if not state.nested:
            return cls(**common, absmax=state.absmax)
        nested = NestedState(absmax=state.state2.absmax, offset=state.offset, code=state.state2.code,
                             blocksize=state.state2.blocksize)
        return cls(**common, absmax_indices=state.absmax, nested=nested)
