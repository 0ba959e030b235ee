"""Low-rank adapters (LoRA), the trainable half of QLoRA.

LoRA (Hu et al., 2021, Sec. 4.1, Eq. (3)) freezes a pretrained weight
``W0`` (``out x in``) and learns its update as a product of two thin matrices,

    h = W0 x + (alpha / r) * B A x,        A: r x in,  B: out x r,

so a layer trains ``r * (in + out)`` numbers instead of ``in * out``. QLoRA
writes the same thing in row-vector form, ``Y = X W + s X L1 L2`` (QLoRA,
Sec. 2, Eq. (3)), with ``L1 = A^T``, ``L2 = B^T`` and ``s = alpha / r``.

What this module provides, and how it matches peft 0.21 (``peft.tuners.lora``):

* :class:`LoRALinear` wraps a frozen linear layer. ``A`` is initialised like
  ``nn.Linear`` (Kaiming-uniform with ``a = sqrt(5)``), ``B`` with zeros, so
  the adapted layer starts out computing exactly what the base layer computes.
  The forward pass gives peft's ``lora.Linear.forward`` bit for bit:
  ``base(x) + B(A(dropout(x))) * scaling``, with the input cast to the
  adapter's dtype and the sum cast back to the base output's dtype. When
  ``alpha / r`` is a power of two, the scaled update is added in one fused
  operation (``torch.add(..., alpha=scaling)``), which rounds the same way
  and saves a pass over the output (about 10 % of a SmolLM2 QLoRA training
  step, ``bench/train_step.py``); otherwise peft's two operations are used. The
  adapter lives in float32 by default (peft up-casts float16/bfloat16
  adapters to float32 too, ``autocast_adapter_dtype=True``).
* :func:`add_lora` puts adapters on the layers named by ``target_modules``
  (peft's rules: a list of names matched as dotted suffixes, a string as a
  regular expression matched against the full name, or ``"all-linear"``),
  freezes everything else, and returns a :class:`TrainableParameters`.
* :func:`merge_lora` / :func:`unmerge_lora` fold ``(alpha/r) B A`` into the
  base weight and take it out again (peft's ``merge`` / ``unmerge``).
* :func:`save_adapter` / :func:`load_adapter` read and write peft's on-disk
  format (``adapter_config.json`` + ``adapter_model.safetensors`` with keys
  such as ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``),
  so ``peft.PeftModel.from_pretrained`` loads what we save and we load what
  peft saves.
* :func:`lora_parameter_count` counts trainable parameters from a model
  config without building the model (the seminar's GPT-3 example).

The base-layer protocol
-----------------------
:class:`LoRALinear` never reads ``base.weight`` in its forward pass: it calls
``base(x)`` and adds the adapter path, so the base may be any module that
maps ``(..., in_features)`` to ``(..., out_features)``, including a 4-bit
layer whose weight is packed and dequantized inside its own forward (chapter
05). It needs the sizes, from integer attributes ``in_features`` and
``out_features`` (as ``nn.Linear`` has) or else from a 2-D floating-point
``weight``. Merging needs write access to a dense weight: it works when
``base.weight`` is a floating-point ``nn.Parameter``; a base layer that stores
its weight in another form supports merging by defining
``add_to_weight(delta)``, which must add the dense float ``out x in`` tensor
``delta`` to the weight the layer computes with (re-quantizing if it has to).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LoRALinear",
    "TrainableParameters",
    "add_lora",
    "trainable_parameters",
    "lora_modules",
    "merge_lora",
    "unmerge_lora",
    "save_adapter",
    "load_adapter",
    "adapter_state_dict",
    "lora_parameter_count",
    "linear_shapes",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
# Files peft writes into an adapter directory; a directory holding nothing
# else is an adapter directory that save_adapter may replace.
ADAPTER_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, "README.md"})
KEY_PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"
_KEY_PATTERN = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


# --------------------------------------------------------------------------- #
# The layer
# --------------------------------------------------------------------------- #
def _validate_hyperparameters(r: Any, alpha: Any, dropout: Any) -> None:
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


def _in_out_features(base: nn.Module) -> tuple[int, int]:
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


def _scales_exactly(dtype: torch.dtype, scaling: float) -> bool:
    """Whether ``torch.add(result, update, alpha=scaling)`` equals peft's
    ``result + update * scaling`` bit for bit.

    The fused add rounds once, peft rounds the product first. When
    ``scaling`` is a power of two (alpha = 16 with r = 16 or 64, the usual
    choices) the product is exact, so both round the same sum. The exception
    is a product below the smallest normal number, where scaling drops bits:
    about 1e-38 in float32 and bfloat16 (never reached by a LoRA update), but
    6e-5 in float16, which is therefore left out.
    """
    return dtype in (torch.float32, torch.bfloat16, torch.float64) and math.frexp(scaling)[0] == 0.5


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
        _validate_hyperparameters(r, alpha, dropout)
        if not isinstance(adapter_dtype, torch.dtype) or not adapter_dtype.is_floating_point:
            raise TypeError(f"adapter_dtype must be a floating-point torch.dtype, got {adapter_dtype!r}.")
        in_features, out_features = _in_out_features(base)
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
        if _scales_exactly(update.dtype, self.scaling):
            # One pass over the output instead of peft's two (a product, then
            # a sum), with peft's result: see _scales_exactly.
            result = torch.add(result, update, alpha=self.scaling)
        else:
            # The same operations in the same order as peft's lora.Linear.forward.
            result = result + update * self.scaling
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
# Putting adapters into a model
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class TrainableParameters:
    """Trainable and total parameters of a model (each shared tensor counted once)."""

    trainable: int
    total: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        # The same line as peft's PeftModel.print_trainable_parameters().
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} "
                f"|| trainable%: {100 * self.trainable_fraction:.4f}")


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """Count ``model``'s parameters: those with ``requires_grad`` and all of them.

    A quantized layer keeps its frozen weight packed in a buffer, not a
    parameter; a module that says how many weights it packs
    (``quantized_weight_numel``, as :class:`qlora_lab.qlora.LinearNF4` does)
    has them counted in the total, so a 4-bit model reports the same total
    as its full-precision original.
    """
    trainable = total = 0
    for p in model.parameters():  # parameters() yields a tied tensor once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    total += sum(getattr(m, "quantized_weight_numel", 0) for m in model.modules())
    return TrainableParameters(trainable, total)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """``{name: LoRALinear}`` for every adapted layer, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _is_linear_like(module: nn.Module) -> bool:
    if isinstance(module, LoRALinear):
        return False
    if isinstance(module, nn.Linear):
        return True
    fin, fout = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return isinstance(fin, int) and isinstance(fout, int) and hasattr(module, "weight")


def _base_module_names(model: nn.Module) -> list[str]:
    """The module names as they are in the model without adapters: the inside
    of each LoRALinear (``q_proj.base``, ...) is not listed, the LoRALinear
    itself is, under the name of the layer it wraps."""
    names, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        names.append(name)
        if isinstance(module, LoRALinear):
            inside.append(name + ".")
    return names


def _output_head_name(model: nn.Module) -> str | None:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return None
    return next((name for name, m in model.named_modules() if m is head), None)


def _linear_summary(model: nn.Module) -> str:
    """A short list of the model's linear layers, for error messages."""
    names = [n for n, m in model.named_modules() if n and _is_linear_like(m)]
    if not names:
        return "the model has no linear layers"
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    return f"its linear layers are named {', '.join(short)} (full names like {names[0]!r})"


def _matches(name: str, target: str) -> bool:
    """peft's rule for one entry of a target_modules list: the full name, or a dotted suffix."""
    return name == target or name.endswith("." + target)


def _resolve_targets(model: nn.Module, target_modules: str | Sequence[str], require_each: bool = True) -> list[str]:
    """The names of the modules ``target_modules`` selects, by peft's rules.
    With ``require_each`` every entry of a list must match something (catches
    typos); without, only the list as a whole must (peft's rule, for configs
    written for several architectures)."""
    names = [n for n in _base_module_names(model) if n]
    modules = dict(model.named_modules())
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        head = _output_head_name(model)
        selected = [n for n in names if _is_linear_like(modules[n]) and n != head]
        if not selected:
            raise ValueError("target_modules='all-linear' found no linear layer (other than the output head) "
                             "in this model.")
        return selected
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regular expression ({err}).") from err
        selected = [n for n in names if pattern.fullmatch(n)]
        if not selected:
            raise ValueError(
                f"target_modules={target_modules!r} matched no module: a string is a regular expression matched "
                f"against the full module name (as in peft); to match by name pass a list such as ['q_proj', "
                f"'v_proj'], or 'all-linear'. In this model {_linear_summary(model)}."
            )
    elif isinstance(target_modules, Iterable):
        targets = list(target_modules)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise TypeError(f"target_modules must be 'all-linear', a regular expression, or a non-empty list of "
                            f"module names, got {target_modules!r}.")
        unmatched = [t for t in targets if not any(_matches(n, t) for n in names)]
        if unmatched and (require_each or len(unmatched) == len(targets)):
            raise ValueError(f"target_modules {unmatched} matched no module of this model; "
                             f"{_linear_summary(model)}.")
        selected = [n for n in names if any(_matches(n, t) for t in targets)]
    else:
        raise TypeError(f"target_modules must be 'all-linear', a regular expression, or a list of module names, "
                        f"got {type(target_modules).__name__}.")
    not_linear = [n for n in selected if not _is_linear_like(modules[n]) and not isinstance(modules[n], LoRALinear)]
    if not_linear:
        raise ValueError(
            f"target_modules selects {not_linear[0]!r}, a {type(modules[not_linear[0]]).__name__}, which is not a "
            f"linear layer; LoRA adapts linear layers, and {_linear_summary(model)}."
        )
    return selected


def _wrap(model: nn.Module, names: Sequence[str], r: int, alpha: float, dropout: float,
          adapter_dtype: torch.dtype) -> None:
    modules = dict(model.named_modules())
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, LoRALinear(modules[name], r, alpha, dropout, adapter_dtype))


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
             target_modules: str | Sequence[str] = ALL_LINEAR, *,
             adapter_dtype: torch.dtype = torch.float32) -> TrainableParameters:
    """Put a :class:`LoRALinear` on every layer ``target_modules`` names and
    freeze all other parameters (in place), as ``peft.get_peft_model`` does.

    ``target_modules`` follows peft: a list of names, each matching a module
    whose full name is that name or ends with ``"." + name`` (``["q_proj",
    "v_proj"]``, ``["layers.0.mlp.up_proj"]``); a string, a regular
    expression that must match the full name; or ``"all-linear"``, every
    linear layer except the output head (QLoRA adapts all linear layers,
    Sec. 4, "LoRA on all layers"). Every list entry must match something.

    Returns the :class:`TrainableParameters` after adapting; ``print`` it for
    peft's ``trainable params: ... || all params: ... || trainable%: ...``.
    """
    _validate_hyperparameters(r, alpha, dropout)
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_lora adapts an nn.Module, got {type(model).__name__}.")
    if lora_modules(model):
        raise ValueError("This model already has LoRA adapters; add_lora works on a model without them "
                         "(start again from a fresh copy of the base model).")
    names = _resolve_targets(model, target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    _wrap(model, names, r, alpha, dropout, adapter_dtype)
    return trainable_parameters(model)


def merge_lora(model: nn.Module, unload: bool = False) -> nn.Module:
    """Merge every adapter into its base weight (peft's ``merge_adapter``).

    The merged model computes ``x (W0 + (alpha/r) B A)^T`` in one matmul: the
    same function as before up to float rounding (the sum is formed in another
    order). With ``unload=True`` every :class:`LoRALinear` is then replaced by
    its merged base layer (peft's ``merge_and_unload``), leaving a plain model.
    Returns ``model``.
    """
    adapters = lora_modules(model)
    if not adapters:
        raise ValueError("This model has no LoRA adapters to merge; add them with add_lora first.")
    for layer in adapters.values():
        if not layer.merged:
            layer.merge()
    if unload:
        modules = dict(model.named_modules())
        for name, layer in adapters.items():
            parent_name, _, child = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child, layer.base)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every merged adapter out of its base weight again (peft's
    ``unmerge_adapter``); the adapters are applied separately afterwards.
    Returns ``model``."""
    adapters = lora_modules(model)
    if not adapters:
        raise ValueError("This model has no LoRA adapters to unmerge.")
    for layer in adapters.values():
        if layer.merged:
            layer.unmerge()
    return model


# --------------------------------------------------------------------------- #
# peft's on-disk format
# --------------------------------------------------------------------------- #
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under peft's key names:
    ``base_model.model.<module name>.lora_A.weight`` / ``.lora_B.weight``."""
    state = {}
    for name, layer in lora_modules(model).items():
        state[f"{KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().cpu().contiguous()
        state[f"{KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().cpu().contiguous()
    return state


def _uniform_setting(adapters: Mapping[str, LoRALinear], attribute: str) -> Any:
    values = {getattr(layer, attribute) for layer in adapters.values()}
    if len(values) != 1:
        raise ValueError(f"The model's adapters use different values of {attribute} ({sorted(values)}); "
                         f"save_adapter writes one config and needs them all equal.")
    return values.pop()


def _target_modules_for_config(model: nn.Module, adapted: Sequence[str]) -> list[str]:
    """The shortest faithful ``target_modules`` list: the adapted layers' last
    names (``q_proj``, ...) when peft's suffix rule with them selects exactly
    the adapted layers, else the full names."""
    names = [n for n in _base_module_names(model) if n]
    short = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    if {n for n in names if any(_matches(n, t) for t in short)} == set(adapted):
        return short
    return sorted(adapted)


def _adapter_config(model: nn.Module, adapters: Mapping[str, LoRALinear], base_model_name_or_path: str | None,
                    task_type: str) -> dict[str, Any]:
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "revision": None,
        "inference_mode": True,
        "r": _uniform_setting(adapters, "r"),
        "lora_alpha": _uniform_setting(adapters, "alpha"),
        "lora_dropout": _uniform_setting(adapters, "dropout_p"),
        "target_modules": _target_modules_for_config(model, list(adapters)),
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_staging_dir(parent: Path, name: str) -> Path:
    """An empty hidden directory in ``parent`` (same file system, so a rename
    is atomic), created with the usual permissions (unlike ``mkdtemp``'s 0700)."""
    staging = parent / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    staging.mkdir()
    return staging


def _write_adapter_files(directory: Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    with open(directory / CONFIG_NAME, "w") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    with open(directory / WEIGHTS_NAME, "rb+") as f:
        os.fsync(f.fileno())


def save_adapter(model: nn.Module, path: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                 task_type: str = "CAUSAL_LM", overwrite: bool = False) -> Path:
    """Save the model's adapters in peft's format into the directory ``path``.

    Writes ``adapter_config.json`` (a ``LoraConfig`` peft accepts) and
    ``adapter_model.safetensors`` (peft's key names), so that
    ``PeftModel.from_pretrained(base_model, path)`` rebuilds the same model.

    Never leaves a half-written adapter behind: a new directory is written
    in full beside the target and renamed into place. An existing adapter
    directory (holding only adapter files) is replaced: its old config is
    removed first, then the new weights and last the new config are renamed
    in, so at every moment ``path`` holds a complete adapter or no config at
    all. A directory holding other files is refused unless ``overwrite=True``
    (its other files are then kept).
    """
    adapters = lora_modules(model)
    if not adapters:
        raise ValueError("This model has no LoRA adapters to save; add them with add_lora (or load_adapter) first.")
    config = _adapter_config(model, adapters, base_model_name_or_path, task_type)
    state = adapter_state_dict(model)
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file; save_adapter needs a directory path.")
    target.parent.mkdir(parents=True, exist_ok=True)

    if not target.exists():
        staging = _new_staging_dir(target.parent, target.name)
        try:
            _write_adapter_files(staging, config, state)
            staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        _fsync_dir(target.parent)
        return target

    others = sorted(p.name for p in target.iterdir() if p.name not in ADAPTER_FILES)
    if others and not overwrite:
        raise ValueError(
            f"{target} already exists and holds files that are not part of an adapter ({', '.join(others[:5])}"
            f"{', ...' if len(others) > 5 else ''}); choose a new directory, or pass overwrite=True to write the "
            f"adapter files into it (its other files are kept)."
        )
    staging = _new_staging_dir(target, target.name)
    try:
        _write_adapter_files(staging, config, state)
        # Config first out, config last in: a crash in between leaves no config,
        # which load_adapter reports, never an old config with new weights.
        for stale in (CONFIG_NAME, PICKLE_WEIGHTS_NAME):
            (target / stale).unlink(missing_ok=True)
        os.replace(staging / WEIGHTS_NAME, target / WEIGHTS_NAME)
        os.replace(staging / CONFIG_NAME, target / CONFIG_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _fsync_dir(target)
    return target


# Options of peft's LoraConfig that change what an adapter computes, with the
# value of plain LoRA; a config that sets any of them otherwise is refused.
_PLAIN_LORA_OPTIONS = {
    "use_dora": False,
    "use_rslora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "exclude_modules": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
}


def _non_plain_options(config: Mapping[str, Any]) -> list[str]:
    found = []
    for key, plain in _PLAIN_LORA_OPTIONS.items():
        value = config.get(key, plain)
        is_plain = value == plain if isinstance(plain, str) else not value  # None, False, [] and {} all mean "off"
        if not is_plain:
            found.append(f"{key}={value!r}")
    return found


def _read_adapter_config(directory: Path) -> dict[str, Any]:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}, so it is not a (complete) adapter directory.")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}).") from err
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}.")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path} describes a {config.get('peft_type')!r} adapter; load_adapter reads LoRA "
                         f"adapters (peft_type 'LORA').")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(f"{config_path} has no {key!r} entry; a LoRA config needs r, lora_alpha and target_modules.")
    unsupported = _non_plain_options(config)
    if unsupported:
        raise ValueError(f"{config_path} uses options this loader does not implement ({', '.join(unsupported)}); "
                         f"load it with peft.PeftModel.from_pretrained instead.")
    return config


def load_adapter(model: nn.Module, path: str | os.PathLike, *,
                 adapter_dtype: torch.dtype = torch.float32) -> TrainableParameters:
    """Load a LoRA adapter saved in peft's format (by :func:`save_adapter` or by
    peft's ``save_pretrained``) into ``model``, in place.

    If the model has no adapters yet they are created on the layers the
    config's ``target_modules`` selects (and everything else is frozen, as in
    :func:`add_lora`); if it has, they must be the same layers with the same
    ``r`` and ``alpha``. Everything is checked before anything is changed:
    missing files, unknown or missing keys and wrong shapes raise an error
    that names the file or key. Returns the :class:`TrainableParameters`.
    """
    from safetensors.torch import load_file

    directory = Path(path).expanduser()
    if not directory.exists():
        raise FileNotFoundError(f"There is no adapter at {directory}.")
    if not directory.is_dir():
        raise ValueError(f"{directory} is a file; load_adapter needs the adapter's directory.")
    config = _read_adapter_config(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        if (directory / PICKLE_WEIGHTS_NAME).is_file():
            raise ValueError(f"{directory} holds {PICKLE_WEIGHTS_NAME} (pickle) but no {WEIGHTS_NAME}; load_adapter "
                             f"reads safetensors only: re-save the adapter with safe_serialization=True.")
        raise FileNotFoundError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}: the adapter is incomplete.")
    r, alpha, dropout = config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0)
    _validate_hyperparameters(r, alpha, dropout)
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{weights_path} is not a readable safetensors file ({err}).") from err

    existing = lora_modules(model)
    if existing:
        expected = list(existing)
        for name, layer in existing.items():
            if (layer.r, layer.alpha) != (r, alpha):
                raise ValueError(f"The model's adapter on {name} has r={layer.r}, alpha={layer.alpha}, the file "
                                 f"r={r}, lora_alpha={alpha}; load into a model without adapters instead.")
            if layer.merged:
                raise ValueError(f"The adapter on {name} is merged; call unmerge_lora(model) before loading new weights.")
    else:
        expected = _resolve_targets(model, config["target_modules"], require_each=False)

    modules = dict(model.named_modules())
    for key in state:
        match = _KEY_PATTERN.match(key)
        if match is None:
            raise ValueError(f"{weights_path} holds the key {key!r}, which is not a LoRA weight "
                             f"('{KEY_PREFIX}<module>.lora_A.weight' or '.lora_B.weight'); this loader reads plain "
                             f"LoRA adapters only.")
        if match["module"] not in expected:
            raise ValueError(f"{weights_path} holds {key!r}, but {match['module']!r} is not among the layers the "
                             f"adapter config targets in this model (target_modules={config['target_modules']!r}).")
    for name in expected:
        if existing:
            in_features, out_features = existing[name].in_features, existing[name].out_features
        else:
            in_features, out_features = _in_out_features(modules[name])
        for which, shape in (("A", (r, in_features)), ("B", (out_features, r))):
            key = f"{KEY_PREFIX}{name}.lora_{which}.weight"
            if key not in state:
                raise ValueError(f"{weights_path} has no {key!r}, but the adapter config targets {name!r}.")
            if tuple(state[key].shape) != shape:
                raise ValueError(f"{key!r} has shape {tuple(state[key].shape)}, expected {shape} "
                                 f"(r={r}, in_features={in_features}, out_features={out_features}).")

    if not existing:
        for p in model.parameters():
            p.requires_grad_(False)
        _wrap(model, expected, r, alpha, dropout, adapter_dtype)
    with torch.no_grad():
        for name, layer in lora_modules(model).items():
            layer.lora_A.copy_(state[f"{KEY_PREFIX}{name}.lora_A.weight"])
            layer.lora_B.copy_(state[f"{KEY_PREFIX}{name}.lora_B.weight"])
    return trainable_parameters(model)


# --------------------------------------------------------------------------- #
# Counting without building
# --------------------------------------------------------------------------- #
def _config_value(config: Any, key: str, default: Any = None) -> Any:
    value = config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)
    return default if value is None else value


def linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """``{name: (in_features, out_features)}`` of one decoder layer's linear
    layers, from a Llama-style config (a dict or a transformers config).

    Needs ``hidden_size``; ``num_attention_heads``, ``num_key_value_heads``
    (default: as many as attention heads) and ``head_dim`` (default:
    hidden / heads) size the attention projections; ``intermediate_size``
    sizes the gated MLP (``gate_proj``, ``up_proj``, ``down_proj``).
    """
    hidden = _config_value(config, "hidden_size")
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"The config needs a positive integer hidden_size, got {hidden!r}.")
    heads = _config_value(config, "num_attention_heads")
    if heads is None:
        raise ValueError("The config needs num_attention_heads to size the attention projections.")
    kv_heads = _config_value(config, "num_key_value_heads", heads)
    head_dim = _config_value(config, "head_dim", hidden // heads)
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
    }
    intermediate = _config_value(config, "intermediate_size")
    if intermediate is not None:
        shapes.update(gate_proj=(hidden, intermediate), up_proj=(hidden, intermediate),
                      down_proj=(intermediate, hidden))
    return shapes


def lora_parameter_count(config: Any, r: int, target_modules: str | Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                         num_layers: int | None = None) -> int:
    """Trainable parameters LoRA adds: ``sum r * (in + out)`` over the adapted
    matrices of every layer (A is ``r x in``, B is ``out x r``).

    For square ``d x d`` matrices this is the LoRA paper's count,
    ``2 * d_model * r * L`` with ``L`` the number of adapted matrices (LoRA,
    Sec. 4.2 / Table 4). ``target_modules`` is a list of per-layer names from
    :func:`linear_shapes` or ``"all-linear"``; ``num_layers`` defaults to the
    config's ``num_hidden_layers``.
    """
    _validate_hyperparameters(r, 1, 0.0)
    shapes = linear_shapes(config)
    if isinstance(target_modules, str):
        if target_modules.lower() != ALL_LINEAR:
            raise ValueError(f"target_modules must be 'all-linear' or a list of names from {sorted(shapes)}, "
                             f"got {target_modules!r}.")
        if "gate_proj" not in shapes:
            raise ValueError("target_modules='all-linear' needs the MLP's size: add intermediate_size to the config.")
        target_modules = list(shapes)
    unknown = [t for t in target_modules if t not in shapes]
    if unknown:
        raise ValueError(f"Unknown layer names {unknown}; this config has {sorted(shapes)}.")
    layers = num_layers if num_layers is not None else _config_value(config, "num_hidden_layers")
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"Need a positive number of layers (num_hidden_layers or num_layers=), got {layers!r}.")
    return layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in target_modules)
