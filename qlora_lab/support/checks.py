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


def summation_tolerance(dtype: torch.dtype, terms: int, magnitude) -> float | torch.Tensor:
    """How far two roundings of the same sum may lie apart when its terms are added in another order.

    A float sum of ``terms`` numbers is off by at most ``(terms - 1) * u * sum(|x_i|)`` with
    ``u = eps / 2`` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., eq. 4.4),
    so two orders (another SIMD kernel, thread count, process count, fused or not) differ by at
    most ``terms * eps(dtype) * magnitude``, ``magnitude`` bounding ``sum(|x_i|)`` (a float, or a
    tensor that broadcasts against the result, e.g. ``|x| @ |w|.T`` for ``x @ w.T``).
    """
    check_positive("terms", terms)
    return terms * torch.finfo(dtype).eps * magnitude


def assert_close_to_rounding(actual: torch.Tensor, expected: torch.Tensor, *, terms: int, why: str,
                             magnitude=None) -> None:
    """AssertionError unless ``actual`` and ``expected`` differ only as reordered sums may.

    Same shape, and ``|actual - expected| <= summation_tolerance(dtype, terms, magnitude)``
    elementwise, ``dtype`` the less precise of the two, ``magnitude`` defaulting to
    ``expected.abs().max()`` (pass ``sum(|x_i|)`` where the terms cancel). ``why`` says which
    orders differ; it is part of the message.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)} ({why})")
    dtype = max(actual.dtype, expected.dtype, key=lambda d: torch.finfo(d).eps)
    gap = (actual.detach().double() - expected.detach().double()).abs()
    if magnitude is None:
        magnitude = expected.detach().abs().max().item() if expected.numel() else 0.0
    bound = torch.as_tensor(summation_tolerance(dtype, terms, magnitude), dtype=torch.float64).expand_as(gap)
    if not bool((gap <= bound).all()):
        worst = (gap - bound).nan_to_num(nan=float("inf")).argmax()
        raise AssertionError(f"differ by {gap.flatten()[worst].item():.3g} > {bound.flatten()[worst].item():.3g} "
                             f"allowed for {terms} terms in {dtype} ({why})")
