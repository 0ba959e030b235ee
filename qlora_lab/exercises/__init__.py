"""Checkers for the exercises at the end of each chapter notebook (one module per chapter).

Every checker follows one contract, so that a checker cell never stops a
notebook: for the notebook's skeleton (a function that raises
``NotImplementedError``) it prints "Exercise N: not attempted yet" and returns
False; for a function that raises anything else it prints the exception and
where to look, and returns False; for a wrong answer it prints what is wrong
and returns False; for a right one it prints "Exercise N: correct" and returns
True.

Checkers call the learner's function in one way, :func:`call_learner`, and are
wrapped in :func:`checker`, which turns an answer the checker cannot even
inspect (a wrong type deep inside a result, say) into the same kind of
feedback.
"""

from __future__ import annotations

import functools
import traceback
from pathlib import Path

__all__ = ["call_learner", "checker", "not_attempted", "tensor_shaped"]

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def not_attempted(number: int) -> bool:
    """Say that exercise ``number`` is still the skeleton; the verdict is False."""
    print(f"Exercise {number}: not attempted yet. Fill in the cell above, run it, then run this one again.")
    return False


def _learner_line(err: BaseException) -> str | None:
    """Where in the learner's own code (not torch's, not the course's) the error
    happened: ``line N: <source>``, or None if it cannot be told."""
    frames = traceback.extract_tb(err.__traceback__)
    mine = [f for f in frames if not (Path(f.filename).resolve().is_relative_to(_PACKAGE_DIR)
                                      or "site-packages" in f.filename or "/lib/python" in f.filename)]
    if not mine:
        return None
    frame = mine[-1]
    source = f": {frame.line.strip()}" if frame.line else ""
    return f"line {frame.lineno} of {frame.name}{source}"


def report_exception(number: int, err: BaseException, what: str = "your function raised") -> bool:
    """Print what went wrong in the learner's code and what to check; the verdict is False."""
    print(f"Exercise {number}: {what} {type(err).__name__}: {err}")
    where = _learner_line(err)
    if where is not None:
        print(f"  It happened at {where}.")
    print("  Check the shapes, dtypes and types your function receives and returns (the exercise's text says "
          "which); to see the whole traceback, call your function on a small example in a cell of its own.")
    return False


def call_learner(number: int, fn, *args):
    """Run the learner's function ``fn(*args)``: ``(True, result)``, or
    ``(False, None)`` after printing why (a skeleton is "not attempted yet",
    any other exception is reported with where it happened)."""
    try:
        return True, fn(*args)
    except NotImplementedError:
        not_attempted(number)
        return False, None
    except Exception as err:  # noqa: BLE001 - report any mistake to the learner instead of failing
        report_exception(number, err)
        return False, None


def tensor_shaped(number: int, got, shape, like: str = "") -> bool:
    """Whether the learner returned a tensor of ``shape``; if not, print what
    came back instead (``like`` names the tensor it should match, "W" say)."""
    import torch

    if isinstance(got, torch.Tensor) and got.shape == shape:
        return True
    found = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
    wanted = f"a tensor shaped like {like} {tuple(shape)}" if like else f"a tensor of shape {tuple(shape)}"
    print(f"Exercise {number}: return {wanted}, got {found}")
    return False


def dict_keyed(number: int, got, keys, what: str) -> bool:
    """Whether the learner returned a dict with exactly the keys ``keys``; if
    not, print what came back (``what`` says what one entry stands for,
    "one entry per block size [64, 256]" say)."""
    if isinstance(got, dict) and set(got) == set(keys):
        return True
    found = sorted(got, key=str) if isinstance(got, dict) else type(got).__name__
    print(f"Exercise {number}: return a dict with {what}, got {found}")
    return False


def checker(number: int):
    """Decorate exercise ``number``'s checker: an exception while it inspects
    the learner's answer (a value of an unexpected type, say) becomes feedback
    and a False verdict instead of a crashed notebook cell."""
    def wrap(check):
        @functools.wraps(check)
        def run(*args, **kwargs) -> bool:
            try:
                return check(*args, **kwargs)
            except Exception as err:  # noqa: BLE001
                return report_exception(number, err, "your answer could not be checked:")
        return run
    return wrap
