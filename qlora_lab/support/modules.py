"""Swapping one module of a model for another.

Quantizing, adapting, merging and exporting all replace layers of a model in
place. A module is created in training mode, so a new layer put into a model
in eval mode would train (drop inputs) while the rest of the model evaluates;
:func:`replace_module` gives the new module the mode of the one it replaces.
"""

from __future__ import annotations

from torch import nn

__all__ = ["replace_module"]


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` where ``model``'s submodule ``name`` is (``"a.b.c"``), in
    the training mode of the module it replaces; returns the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, module.train(old.training))
    return old
