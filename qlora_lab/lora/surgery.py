"""Putting LoRA adapters into a model, and taking them out again.

:func:`add_lora` does what ``peft.get_peft_model`` does for plain LoRA: it
replaces every linear layer that ``target_modules`` names by a
:class:`~qlora_lab.lora.layer.LoRALinear` around it and freezes everything
else. Which layers: peft's rules, which :func:`resolve_targets` implements (a
list of names matched as dotted suffixes, a string as a regular expression
matched against the full name, or ``"all-linear"``, every linear layer but the
output head; QLoRA adapts all of them, Sec. 4, "LoRA on all layers").

:func:`merge_lora` / :func:`unmerge_lora` fold ``(alpha / r) B A`` into the
base weights and take it out again (peft's ``merge_adapter`` /
``unmerge_adapter``, and ``merge_and_unload`` with ``unload=True``).
:func:`trainable_parameters` counts what is trained and what is frozen, and
prints peft's ``print_trainable_parameters`` line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qlora_lab.lora.layer import LoRALinear, validate_hyperparameters

__all__ = [
    "ALL_LINEAR",
    "TrainableParameters",
    "add_lora",
    "base_module_names",
    "lora_modules",
    "matches_target",
    "merge_lora",
    "resolve_targets",
    "trainable_parameters",
    "unmerge_lora",
    "wrap_layers",
]

ALL_LINEAR = "all-linear"


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


def base_module_names(model: nn.Module) -> list[str]:
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


def matches_target(name: str, target: str) -> bool:
    """peft's rule for one entry of a target_modules list: the full name, or a dotted suffix."""
    return name == target or name.endswith("." + target)


def resolve_targets(model: nn.Module, target_modules: str | Sequence[str], require_each: bool = True) -> list[str]:
    """The names of the modules ``target_modules`` selects, by peft's rules.
    With ``require_each`` every entry of a list must match something (catches
    typos); without, only the list as a whole must (peft's rule, for configs
    written for several architectures)."""
    names = [n for n in base_module_names(model) if n]
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
        unmatched = [t for t in targets if not any(matches_target(n, t) for n in names)]
        if unmatched and (require_each or len(unmatched) == len(targets)):
            raise ValueError(f"target_modules {unmatched} matched no module of this model; "
                             f"{_linear_summary(model)}.")
        selected = [n for n in names if any(matches_target(n, t) for t in targets)]
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


def wrap_layers(model: nn.Module, names: Sequence[str], r: int, alpha: float, dropout: float,
          adapter_dtype: torch.dtype) -> None:
    """Replace each module in ``names`` by a :class:`LoRALinear` around it (in place)."""
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
    validate_hyperparameters(r, alpha, dropout)
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_lora adapts an nn.Module, got {type(model).__name__}.")
    if lora_modules(model):
        raise ValueError("This model already has LoRA adapters; add_lora works on a model without them "
                         "(start again from a fresh copy of the base model).")
    names = resolve_targets(model, target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    wrap_layers(model, names, r, alpha, dropout, adapter_dtype)
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
