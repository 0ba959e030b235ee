"""The QLoRA layer: a frozen 4-bit weight that gradients flow through (QLoRA, Sec. 3).

QLoRA, Eq. (5), for one linear layer with a LoRA adapter ``L1 L2``::

    Y = X doubleDequant(c1, c2, W_NF4) + X L1 L2

and Eq. (6)::

    doubleDequant(c1, c2, W) = dequant(dequant(c1, c2), W) = W_BF16

The base weight ``W`` is stored in NF4 with double-quantized constants and is
never trained. It is dequantized to the *compute dtype* (bfloat16 on a GPU in
the paper; float32 on a CPU here) whenever it is needed, used, and thrown
away. Only the adapter ``L1 L2`` (:mod:`qlora_lab.lora`) is trained, but its
gradient has to pass *through* the frozen layers above it: backpropagation
needs ``dL/dX = dL/dY W`` at every layer, and that is the only thing the
frozen weight contributes to the backward pass. ``dL/dW`` is never computed.

:class:`DequantizeLinear` is that computation as an autograd function. Its
forward saves only the packed 4-bit weight (which the layer keeps anyway), not
the dequantized one, and its backward dequantizes again. A plain
``F.linear(x, dequantize(W))`` would keep the dequantized weight alive from
forward to backward: 4 bytes per parameter in float32, eight times the 4-bit
weight itself, for every layer of the model at once.

:class:`LinearNF4` is the layer (the course's version of bitsandbytes'
``Linear4bit``) and :func:`quantize_model` swaps it in for the linear layers of
a transformers model, one layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qlora_lab.fast import nf4 as fast_nf4
from qlora_lab.quant import nf4
from qlora_lab.quant.blockwise import NestedState, QuantState
from qlora_lab.support.modules import replace_module

__all__ = [
    "DequantizeLinear",
    "dequantize",
    "LinearNF4",
    "QuantizationReport",
    "default_compute_dtype",
    "linear_layer_names",
    "memory_footprint",
    "quantize_model",
]


def default_compute_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bfloat16 on a CUDA device (the paper's choice: the range of float32,
    so no overflow, and fast tensor-core matmuls), float32 on a CPU, where
    bfloat16 matmuls are slow on most processors and only lose precision."""
    device = torch.device(device) if device is not None else None
    if device is None:
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def dequantize(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """The training path's 4-bit dequantization: the hand-written fast one,
    or the readable definition while ``torch.compile`` traces (see
    ``bench/quantize.py`` for which is faster)."""
    if torch.compiler.is_compiling():
        return nf4.dequantize_4bit(packed, state)
    return fast_nf4.dequantize_4bit(packed, state)


class DequantizeLinear(torch.autograd.Function):
    """``y = x W^T + b`` with ``W`` dequantized from 4 bits on the fly.

    forward:  ``W = dequantize_4bit(packed, state)`` in the compute dtype,
              ``y = x W^T + b``; only ``packed`` is saved for backward.
    backward: ``dL/dx = dL/dy W`` with ``W`` dequantized again;
              no gradient for the frozen weight; ``dL/db`` if the bias
              is trainable.

    This is what bitsandbytes' ``MatMul4Bit`` does (its backward also
    dequantizes again and skips the weight gradient).

    Eagerly, the weight is dequantized by :func:`qlora_lab.fast.nf4.dequantize_4bit`;
    under ``torch.compile`` the readable :func:`qlora_lab.quant.nf4.dequantize_4bit`
    is traced instead (the fast one uses numpy and Python threads, which the
    compiler cannot trace). Both give the same bits.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, state: QuantState,
                bias: torch.Tensor | None) -> torch.Tensor:
        weight = dequantize(packed, state).to(x.dtype)
        ctx.state = state
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(packed)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = dequantize(packed, ctx.state).to(grad_output.dtype)
            grad_x = grad_output @ weight
        if ctx.needs_input_grad[3]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias


class LinearNF4(nn.Module):
    """A linear layer whose frozen weight lives in 4 bits (QLoRA Sec. 3).

    Holds the packed weight (``weight``, uint8, two values per byte, exactly
    as bitsandbytes stores it) and its quantization state as buffers, never
    the full-precision weight: ``code`` and either ``absmax`` (float32, one
    per block) or, double-quantized, ``absmax_indices`` (uint8) with
    ``nested_absmax``, ``nested_offset`` and ``nested_code``. ``forward`` casts the input to
    ``compute_dtype``, runs :class:`DequantizeLinear`, and casts the result
    back to the input's dtype.

    Build one from an ``nn.Linear`` with :meth:`from_linear`, or swap all of a
    model's linear layers with :func:`quantize_model`. LoRA stacks on it
    unchanged: ``qlora_lab.lora.LoRALinear(LinearNF4.from_linear(linear))``.
    """

    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor, state: QuantState,
                 bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if tuple(state.shape) != (out_features, in_features):
            raise ValueError(f"the quantized weight has shape {tuple(state.shape)}, but a layer from "
                             f"{in_features} to {out_features} features needs ({out_features}, {in_features})")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype or default_compute_dtype(packed.device)
        self.quant_type = state.quant_type
        self.blocksize = state.blocksize
        self.weight_dtype = state.dtype
        self.register_buffer("weight", packed)
        self.double_quant = state.nested is not None
        if not self.double_quant:
            self.register_buffer("absmax", state.absmax)
        else:
            self.register_buffer("absmax_indices", state.absmax_indices)
        self.register_buffer("code", state.code)
        if self.double_quant:
            self.register_buffer("nested_absmax", state.nested.absmax)
            self.register_buffer("nested_offset", torch.as_tensor(state.nested.offset, dtype=torch.float32))
            self.register_buffer("nested_code", state.nested.code)
            self.nested_blocksize = state.nested.blocksize
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = True,
                    blocksize: int = 64, compute_dtype: torch.dtype | None = None) -> LinearNF4:
        """Quantize ``linear.weight`` (QLoRA: NF4, double quantization, blocks
        of 64) into a new layer; the bias, if any, is kept as it is."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LinearNF4.from_linear needs an nn.Linear, got {type(linear).__name__}")
        packed, state = fast_nf4.quantize_4bit(linear.weight, blocksize=blocksize, quant_type=quant_type,
                                               double_quant=double_quant)
        return cls(linear.in_features, linear.out_features, packed, state, linear.bias,
                   compute_dtype or default_compute_dtype(linear.weight.device))

    @property
    def quant_state(self) -> QuantState:
        """The weight's :class:`qlora_lab.quant.nf4.QuantState`, built from the buffers
        (so it follows the layer through ``.to(device)``)."""
        common = dict(shape=torch.Size((self.out_features, self.in_features)), dtype=self.weight_dtype,
                      blocksize=self.blocksize, quant_type=self.quant_type, code=self.code)
        if not self.double_quant:
            return QuantState(**common, absmax=self.absmax)
        nested = NestedState(absmax=self.nested_absmax, offset=self.nested_offset, code=self.nested_code,
                             blocksize=self.nested_blocksize)
        return QuantState(**common, absmax_indices=self.absmax_indices, nested=nested)

    @property
    def quantized_weight_numel(self) -> int:
        """How many weights the packed buffer stands for (parameter counts of a
        quantized model include them, as peft's do)."""
        return self.in_features * self.out_features

    def dequantized_weight(self) -> torch.Tensor:
        """``doubleDequant(c1, c2, W)`` of Eq. (6), in the compute dtype."""
        return dequantize(self.weight, self.quant_state).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = DequantizeLinear.apply(x.to(self.compute_dtype), self.weight, self.quant_state, bias)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.quant_type}, blocksize={self.blocksize}{dq}, compute_dtype={self.compute_dtype}")


# --------------------------------------------------------------------------- #
# Whole models
# --------------------------------------------------------------------------- #
def memory_footprint(model: nn.Module) -> int:
    """Bytes held by a model's tensors: parameters and buffers, each tensor
    counted once (tied weights share one), plus the quantization state that
    bitsandbytes keeps outside parameters and buffers (``weight.quant_state``
    of its ``Linear4bit``), so that our models and bitsandbytes' are counted
    the same way."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen and t.numel():
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for tensor in [*model.parameters(), *model.buffers()]:
        add(tensor)
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            add(state.absmax)
            add(state.code)
            if getattr(state, "nested", False):
                add(state.offset if isinstance(state.offset, torch.Tensor) else None)
                add(state.state2.absmax)
                add(state.state2.code)
    return total


@dataclass(frozen=True)
class QuantizationReport:
    """What :func:`quantize_model` did."""

    layers: int
    bytes_before: int
    bytes_after: int
    quantized_weights: int

    def __str__(self) -> str:
        return (f"quantized {self.layers} linear layers ({self.quantized_weights:,} weights): "
                f"{self.bytes_before / 1e6:.1f} MB -> {self.bytes_after / 1e6:.1f} MB "
                f"({self.bytes_before / self.bytes_after:.2f}x smaller)")


def linear_layer_names(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """The layers :func:`quantize_model` quantizes: every ``nn.Linear`` whose
    name is not in ``skip`` and does not end with ``"." + entry`` of it."""
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and not any(name == s or name.endswith("." + s) for s in skip)]


@torch.no_grad()
def quantize_model(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
                   skip: tuple[str, ...] = ("lm_head",), compute_dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> QuantizationReport:
    """Replace every ``nn.Linear`` of ``model`` by a :class:`LinearNF4`, in place.

    Layers are converted one at a time and each full-precision weight is
    released as soon as its 4-bit copy exists, so peak memory stays near the
    quantized size plus one layer. Layers whose name is in ``skip`` (or ends
    with ``"." + entry``) stay as they are: QLoRA keeps the output layer in
    16 bits. Everything else (embeddings, norms) is untouched.

    With ``device`` (e.g. ``"cuda"``) each layer is moved there before it is
    quantized, so a model loaded on the host reaches the GPU already in 4
    bits; the rest of the model is left where it is (move it afterwards).

    Returns a :class:`QuantizationReport` with the memory footprint
    (:func:`memory_footprint`) before and after.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model needs a torch model, got {type(model).__name__}")
    if not isinstance(skip, (tuple, list)) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"skip must be a tuple of module names, got {skip!r}")
    names = linear_layer_names(model, tuple(skip))
    if not names:
        already = sum(isinstance(m, LinearNF4) for m in model.modules())
        hint = f" ({already} layers are already LinearNF4)" if already else ""
        raise ValueError(f"the model has no nn.Linear layers to quantize{hint}")
    before = memory_footprint(model)
    weights = 0
    for name in names:
        linear = model.get_submodule(name)
        weights += linear.weight.numel()
        source = linear.to(device) if device is not None else linear
        replace_module(model, name, LinearNF4.from_linear(source, quant_type, double_quant, blocksize, compute_dtype))
        source.weight = None
        # Drop the full-precision weight now, not when the loop ends.
        linear.weight = None
        del linear
    return QuantizationReport(layers=len(names), bytes_before=before, bytes_after=memory_footprint(model),
                              quantized_weights=weights)
