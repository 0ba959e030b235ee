"""Argument checks shared by the course's modules: one wording for one mistake.

Plumbing, not course material.
"""

from __future__ import annotations

import torch

DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
"""The dtype spellings :func:`as_dtype` accepts besides ``torch.dtype`` objects."""


def check_positive(name: str, value) -> None:
    """TypeError unless ``value`` is an int (not a bool); ValueError unless it is > 0."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")


def check_choice(name: str, value, choices: tuple) -> None:
    """ValueError naming the valid choices unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid {name}s are {', '.join(map(str, choices))}")


def as_dtype(value, name: str) -> torch.dtype:
    """``value`` as a ``torch.dtype``: a dtype, or a name in :data:`DTYPE_NAMES`."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[value.lower()]
    raise ValueError(f"{name} must be a torch dtype or one of {sorted(DTYPE_NAMES)}, got {value!r}")


def check_nbytes(nbytes: object, what: str) -> int:
    """``nbytes`` if it is an int (not a bool), else a TypeError naming ``what``."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"{what} must be an int number of bytes, got {type(nbytes).__name__} {nbytes!r}")
    return nbytes
