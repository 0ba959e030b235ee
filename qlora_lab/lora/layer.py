"""The LoRA layer: a frozen linear layer plus a trainable low-rank update.

LoRA (Hu et al., 2021, Sec. 4.1, Eq. (3)) freezes a pretrained weight
``W0`` (``out x in``) and learns its update as a product of two thin matrices,

    h = W0 x + (alpha / r) * B A x,        A: r x in,  B: out x r,

so a layer trains ``r * (in + out)`` numbers instead of ``in * out``. QLoRA
writes the same thing in row-vector form, ``Y = X W + s X L1 L2`` (QLoRA,
Sec. 2, Eq. (3)), with ``L1 = A^T``, ``L2 = B^T`` and ``s = alpha / r``.

:class:`LoRALinear` matches peft 0.21's ``lora.Linear`` bit for bit: ``A``
starts like ``nn.Linear``'s weight (Kaiming-uniform, ``a = sqrt(5)``), ``B``
at zeros, so the adapted layer starts out computing exactly what the base
layer computes; the forward pass is ``base(x) + B(A(dropout(x))) * scaling``
with the input cast to the adapter's dtype (float32 by default, as peft's
``autocast_adapter_dtype=True``) and the sum cast back to the base output's.

The base-layer protocol
-----------------------
The forward pass never reads ``base.weight``: it calls ``base(x)`` and adds
the adapter path, so the base may be any module that maps
``(..., in_features)`` to ``(..., out_features)``, including a 4-bit layer
that dequantizes inside its own forward (chapter 05). The sizes come from
integer attributes ``in_features`` and ``out_features`` (as ``nn.Linear``
has) or else from a 2-D floating-point ``weight``. Merging needs write access
to a dense weight: a floating-point ``nn.Parameter`` ``base.weight``, or a
method ``add_to_weight(delta)`` that adds the dense float ``out x in`` tensor
``delta`` to the weight the layer computes with (re-quantizing if it has to).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qlora_lab.fast.lora import add_scaled_update

__all__ = ["LoRALinear", "in_out_features", "validate_hyperparameters"]


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (LoRA, Sec. 4.1).

    ``forward(x) = base(x) + (alpha / r) * B A dropout(x)``, where ``A``
    (``lora_A``, ``r x in``) starts Kaiming-uniform (``a = sqrt(5)``, as
    ``nn.Linear`` and peft) and ``B`` (``lora_B``, ``out x r``) starts at zero,
    so at initialisation the layer computes exactly ``base(x)``.

    Args:
        base: the layer to adapt; its parameters are frozen. Any module with
            ``in_features``/``out_features`` (or a 2-D float weight) and a
            forward; see the module docstring for what merging needs.
        r: the rank of the update, an int >= 1.
        alpha: the update is scaled by ``alpha / r``; > 0.
        dropout: dropout probability on the adapter's input, ``0 <= p < 1``.
        adapter_dtype: dtype of ``A`` and ``B`` (float32 by default; the input
            is cast to it, and the result back to the base output's dtype).
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 adapter_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"LoRALinear wraps an nn.Module (e.g. nn.Linear), got {type(base).__name__}.")
        if isinstance(base, LoRALinear):
            raise TypeError("This layer already has a LoRA adapter; LoRALinear cannot be nested.")
        validate_hyperparameters(r, alpha, dropout)
        if not isinstance(adapter_dtype, torch.dtype) or not adapter_dtype.is_floating_point:
            raise TypeError(f"adapter_dtype must be a floating-point torch.dtype, got {adapter_dtype!r}.")
        in_features, out_features = in_out_features(base)
        device = _device_of(base)

        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.dropout_p = r, alpha, float(dropout)
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=adapter_dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, dtype=adapter_dtype, device=device))
        # peft uses nn.Identity when there is no dropout, so no random numbers are drawn.
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()
        # A wrapper put into a model in eval mode must not start dropping
        # inputs: it takes the training mode of the layer it wraps.
        self.train(base.training)

    def reset_lora_parameters(self) -> None:
        """A like ``nn.Linear``'s weight (Kaiming-uniform, ``a = sqrt(5)``,
        i.e. uniform on ``+-1/sqrt(in)``), B = 0: the update starts at zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base(x, *args, **kwargs)
        if self.merged:
            return result
        result_dtype = result.dtype
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        # result + update * self.scaling, as peft writes it; the fast version
        # makes one pass over the output instead of two, with the same bits
        # (qlora_lab.fast.lora; tests/fast/test_fast.py).
        result = add_scaled_update(result, update, self.scaling)
        return result.to(result_dtype)

    # -- merging -------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """The dense update ``(alpha / r) * B @ A`` (``out x in``), computed as
        peft's ``get_delta_weight`` does (in float32 on CPU for 16-bit adapters)."""
        A, B = self.lora_A, self.lora_B
        if A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16):
            return ((B.float() @ A.float()) * self.scaling).to(A.dtype)
        return (B @ A) * self.scaling

    def merge(self) -> None:
        """Fold the update into the base weight: ``W0 <- W0 + (alpha/r) B A``.
        Afterwards the forward pass is just ``base(x)``."""
        if self.merged:
            raise RuntimeError("This LoRA adapter is already merged; call unmerge() before merging again.")
        with torch.no_grad():
            _add_to_base_weight(self.base, self.delta_weight(), subtract=False)
        self.merged = True

    def unmerge(self) -> None:
        """Take the update out of the base weight again (``W0 <- W0 - (alpha/r) B A``).
        In floating point this restores ``W0`` up to rounding, not bit for bit."""
        if not self.merged:
            raise RuntimeError("This LoRA adapter is not merged, so there is nothing to unmerge.")
        with torch.no_grad():
            _add_to_base_weight(self.base, self.delta_weight(), subtract=True)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout_p}, merged={self.merged}")


def _add_to_base_weight(base: nn.Module, delta: torch.Tensor, subtract: bool) -> None:
    """Add (or subtract) ``delta`` to the dense weight of ``base`` (protocol in the module docstring)."""
    hook = getattr(base, "add_to_weight", None)
    if callable(hook):
        hook(-delta if subtract else delta)
        return
    weight = getattr(base, "weight", None)
    if not (isinstance(weight, nn.Parameter) and weight.dtype.is_floating_point):
        found = "no weight" if weight is None else f"a {type(weight).__name__} of dtype {getattr(weight, 'dtype', '?')}"
        raise TypeError(
            f"Cannot merge a LoRA adapter into a {type(base).__name__}: merging needs a dense floating-point "
            f"nn.Parameter `weight`, and this layer has {found}. A layer that stores its weight in another form "
            f"(e.g. packed 4-bit) can support merging by defining add_to_weight(delta)."
        )
    if weight.shape != delta.shape:
        raise ValueError(f"Cannot merge: the base weight has shape {tuple(weight.shape)}, the LoRA update "
                         f"{tuple(delta.shape)}; merging needs a weight of shape (out_features, in_features).")
    # Mirrors peft: merge adds the update with type promotion, unmerge casts it first.
    if subtract:
        weight.data -= delta.to(weight.dtype)
    else:
        weight.data += delta


# --------------------------------------------------------------------------- #
# Checks and sizes
# --------------------------------------------------------------------------- #
def validate_hyperparameters(r: Any, alpha: Any, dropout: Any) -> None:
    """A clear TypeError or ValueError for a rank, alpha or dropout LoRA cannot use."""
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"LoRA rank r must be an int, got {type(r).__name__} {r!r}; pass e.g. r=8.")
    if r < 1:
        raise ValueError(f"LoRA rank r must be at least 1, got {r}; typical values are 4 to 64.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"LoRA alpha must be a number, got {type(alpha).__name__} {alpha!r}; pass e.g. alpha=16.")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"LoRA alpha must be a positive finite number (the update is scaled by alpha/r), got {alpha}.")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"LoRA dropout must be a number, got {type(dropout).__name__} {dropout!r}; pass e.g. 0.05.")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must satisfy 0 <= dropout < 1, got {dropout}; use 0.0 for no dropout.")


def in_out_features(base: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like module (see the
    module docstring for the protocol)."""
    fin, fout = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if isinstance(fin, int) and isinstance(fout, int) and not isinstance(fin, bool):
        return fin, fout
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.dtype.is_floating_point:
        return weight.shape[1], weight.shape[0]
    raise TypeError(
        f"LoRALinear cannot tell the sizes of a {type(base).__name__}: give it integer attributes "
        f"in_features and out_features (as nn.Linear has), or a 2-D float weight of shape (out, in)."
    )


def _device_of(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")
