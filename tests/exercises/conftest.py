"""The exercises' checkers, each run on a right answer and on typical wrong ones."""

import pytest

# the shared assertions in exercise_feedback.py fail with pytest's detailed messages
pytest.register_assert_rewrite("exercise_feedback")
