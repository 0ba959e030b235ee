import torch

from qlora_lab.exercises import ch05
from qlora_lab.qlora import LinearNF4, memory_footprint
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


def blocksize_trade(linear, x, blocksize):
    layer = LinearNF4.from_linear(linear, blocksize=blocksize, compute_dtype=torch.float32)
    with torch.no_grad():
        reference, output = linear(x), layer(x)
    return 8 * memory_footprint(layer) / linear.weight.numel(), (output - reference).norm() / reference.norm()


def test_exercise_3_right(capsys):
    assert ch05.check_exercise_3(blocksize_trade) is True
    assert "Exercise 3: correct" in capsys.readouterr().out


def test_exercise_3_accepts_float64_arithmetic():
    def in_float64(linear, x, blocksize):
        layer = LinearNF4.from_linear(linear, blocksize=blocksize, compute_dtype=torch.float32)
        w, w_hat, x = linear.weight.double(), layer.dequantized_weight().double(), x.double()
        return 8 * memory_footprint(layer) / w.numel(), ((x @ w_hat.T - x @ w.T).norm() / (x @ w.T).norm()).item()

    assert ch05.check_exercise_3(in_float64) is True


def test_exercise_3_wrong(capsys):
    def weight_error(linear, x, blocksize):
        layer = LinearNF4.from_linear(linear, blocksize=blocksize)
        w = linear.weight
        return 8 * memory_footprint(layer) / w.numel(), ((layer.dequantized_weight() - w).norm() / w.norm()).item()

    def without_tables(linear, x, blocksize):
        bits, error = blocksize_trade(linear, x, blocksize)
        return bits - 8 * 4 * (16 + 256) / linear.weight.numel(), error

    def default_blocks(linear, x, blocksize):
        return blocksize_trade(linear, x, 64)

    cases = [(weight_error, "that is the weight's error"), (without_tables, "two code tables"),
             (default_blocks, "bits per weight, you said"), (lambda *a: 4.127, "two numbers")]
    for wrong, message in cases:
        assert ch05.check_exercise_3(wrong) is False, message
        assert message in capsys.readouterr().out
    assert ch05.check_exercise_3(not_attempted) is False


def test_exercise_3_keeps_the_global_random_state():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    ch05.check_exercise_3(blocksize_trade)
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------- a learner's bug is feedback


def test_a_bug_in_the_learners_code_is_feedback_not_a_crash(capsys):
    assert_bugs_are_feedback(capsys, [
        (1, ch05.check_exercise_1, ()),
        (2, ch05.check_exercise_2, ()),
        (3, ch05.check_exercise_3, ()),
    ])
