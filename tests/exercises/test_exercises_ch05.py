from qlora_lab.exercises import ch05
from qlora_lab.quant.nf4 import dequantize_4bit

from exercise_feedback import assert_bugs_are_feedback


def not_attempted(*args):
    raise NotImplementedError("your turn")


def test_exercise_1(capsys):
    assert ch05.check_exercise_1(lambda g, packed, state: g @ dequantize_4bit(packed, state).to(g.dtype))
    # transposed weight: wrong shape or values
    assert not ch05.check_exercise_1(lambda g, packed, state: g @ dequantize_4bit(packed, state).t().t().T.T * 2)
    assert not ch05.check_exercise_1(lambda g, packed, state: g.sum())
    assert not ch05.check_exercise_1(not_attempted)
    assert "not attempted" in capsys.readouterr().out


def layer_bytes(out_features, in_features):
    n = out_features * in_features
    blocks = -(-n // 64)
    return (n + 1) // 2 + blocks + 4 * -(-blocks // 256) + 4 + 4 * 16 + 4 * 256


def test_exercise_2(capsys):
    assert ch05.check_exercise_2(layer_bytes)
    assert not ch05.check_exercise_2(lambda o, i: (o * i + 1) // 2)
    assert "count the constants" in capsys.readouterr().out
    assert not ch05.check_exercise_2(lambda o, i: layer_bytes(o, i) - 4)  # forgot the offset
    assert not ch05.check_exercise_2(lambda o, i: o * i // 2 + -(-o * i // 64) + 4 * -(-o * i // 16384) + 4 + 64 + 1024)  # odd n
    assert not ch05.check_exercise_2(not_attempted)


# ------------------------------------------------------- a learner's bug is feedback


def test_a_bug_in_the_learners_code_is_feedback_not_a_crash(capsys):
    assert_bugs_are_feedback(capsys, [
        (1, ch05.check_exercise_1, ()),
        (2, ch05.check_exercise_2, ()),
    ])
