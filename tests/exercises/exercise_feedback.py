"""A bug in the learner's own code is feedback, not a crash (shared by the
tests/exercises/test_exercises_chNN.py files).

Every chapter's exercise checker must survive two kinds of broken answer and say
what went wrong instead of raising:

- ``buggy``: the learner's function raises (an IndexError). The checker returns
  False and prints the exercise number, the exception's name, the line of the
  learner's code where it happened, and a hint to try the function on a small example.
- ``Unusable``: the function returns something that breaks whatever the checker
  tries with it (attributes, comparison, hashing, len, iteration, float, int, bool).
  The checker returns False and prints feedback for that exercise.

Each test file lists its own (number, check, extra arguments) cases and calls
``assert_bugs_are_feedback``.
"""


def buggy(*args):
    return [][len(args)]  # an IndexError in the learner's own code


class Unusable:
    """An answer that breaks whatever the checker tries with it."""

    def __getattr__(self, name):
        raise RuntimeError("unusable answer")

    def __eq__(self, other):
        raise RuntimeError("unusable answer")

    __ne__ = __lt__ = __gt__ = __le__ = __ge__ = __eq__
    __hash__ = None

    def __float__(self):
        raise RuntimeError("unusable answer")

    __int__ = __index__ = __len__ = __iter__ = __bool__ = __float__


def feedback_result(number, check, answer, extra):
    """``check(answer, *extra)``; an exception escaping the checker fails the test."""
    try:
        return check(answer, *extra)
    except Exception as error:
        raise AssertionError(f"the checker of exercise {number} let {type(error).__name__} "
                             "escape instead of printing feedback") from error


def assert_bugs_are_feedback(capsys, cases):
    """For each ``(number, check, extra)`` in `cases`, feed ``check`` a buggy and an
    unusable answer (``check(answer, *extra)``) and assert both give feedback."""
    cases = list(cases)
    assert cases, "give at least one (number, check, extra) case"
    for number, check, extra in cases:
        assert feedback_result(number, check, buggy, extra) is False
        out = capsys.readouterr().out
        assert f"Exercise {number}: your function raised IndexError" in out
        assert "It happened at line" in out and "return [][len(args)]" in out
        assert "call your function on a small example" in out
        assert feedback_result(number, check, lambda *args: Unusable(), extra) is False
        assert f"Exercise {number}:" in capsys.readouterr().out
