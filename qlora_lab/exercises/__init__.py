"""Checkers for the exercises at the end of each chapter notebook (one module per chapter).

Every checker follows one contract: for the notebook's skeleton (a function
that raises ``NotImplementedError``) it prints "Exercise N: not attempted yet"
and returns False without raising; for a wrong answer it prints what is wrong
and returns False; for a right one it prints "Exercise N: correct" and returns
True.
"""


def not_attempted(number: int) -> bool:
    """Say that exercise ``number`` is still the skeleton; the verdict is False."""
    print(f"Exercise {number}: not attempted yet. Fill in the cell above, run it, then run this one again.")
    return False


def call_learner(number: int, fn, *args):
    """Run the learner's function; ``(True, result)``, or ``(False, None)`` after
    printing why (a skeleton or an exception never stops the notebook)."""
    try:
        return True, fn(*args)
    except NotImplementedError:
        not_attempted(number)
        return False, None
    except Exception as err:  # noqa: BLE001 - report any mistake to the learner instead of failing
        print(f"Exercise {number}: your function raised {type(err).__name__}: {err}")
        return False, None
