import torch

from qlora_lab.beyond import fits
from qlora_lab.exercises import ch09
from qlora_lab.quant.nf4 import dequantize_4bit, quantize_4bit


def not_attempted(*args):
    raise NotImplementedError("your turn")


def chunk_rows(rows, world_size, rank):
    size = -(-rows // world_size)
    return max(0, min(size, rows - rank * size))


def rank_bytes(out_features, in_features, world_size, rank):
    n = out_features * in_features
    return chunk_rows((n + 1) // 2, world_size, rank) + chunk_rows(-(-n // 64), world_size, rank)


def test_exercise_1(capsys):
    assert ch09.check_exercise_1(rank_bytes)
    assert not ch09.check_exercise_1(lambda o, i, w, r: (o * i // 2) // w)
    assert "block constants are sharded too" in capsys.readouterr().out
    assert not ch09.check_exercise_1(lambda o, i, w, r: (o * i // 2 + o * i // 64) // w)  # uneven chunks
    assert not ch09.check_exercise_1(not_attempted)
    assert "not attempted" in capsys.readouterr().out


def loftq_round(weight, r):
    packed, state = quantize_4bit(weight, double_quant=True)
    Q = dequantize_4bit(packed, state)
    U, S, Vh = torch.linalg.svd(weight - Q, full_matrices=False)
    return Q, U[:, :r] * S[:r], Vh[:r]


def test_exercise_2(capsys):
    assert ch09.check_exercise_2(loftq_round)
    assert not ch09.check_exercise_2(lambda w, r: (w, torch.zeros(w.shape[0], r), torch.zeros(r, w.shape[1])))
    assert not ch09.check_exercise_2(lambda w, r: loftq_round(w, r)[:2])
    assert not ch09.check_exercise_2(lambda w, r: (loftq_round(w, r)[0], *loftq_round(w, r + 1)[1:]))
    assert not ch09.check_exercise_2(not_attempted)


def fewest_gpus(config, gib, batch, seq_len, capacity=2**30, part="peak"):
    for n in range(1, 65):
        estimate = fits.estimate_per_gpu(config, "qlora", n, batch=batch, seq_len=seq_len)
        if getattr(estimate, part) < gib * capacity:
            return n
    return None


def test_exercise_3(capsys):
    assert ch09.check_exercise_3(fewest_gpus)
    assert "Exercise 3: correct" in capsys.readouterr().out
    assert not ch09.check_exercise_3(lambda c, g, b, s: fewest_gpus(c, g, b, s, capacity=10**9))
    assert "24 * 2**30 bytes" in capsys.readouterr().out
    assert not ch09.check_exercise_3(lambda c, g, b, s: fewest_gpus(c, g, b, s) or 64)  # never None
    assert "return None" in capsys.readouterr().out
    assert not ch09.check_exercise_3(lambda c, g, b, s: float(fewest_gpus(c, g, b, s) or 0))
    assert "as an int" in capsys.readouterr().out
    assert not ch09.check_exercise_3(not_attempted)
    assert "not attempted" in capsys.readouterr().out


def test_bugs_in_the_learners_code_are_feedback(capsys):
    from exercise_feedback import assert_bugs_are_feedback

    assert_bugs_are_feedback(capsys, [(1, ch09.check_exercise_1, ()), (2, ch09.check_exercise_2, ()),
                                  (3, ch09.check_exercise_3, ())])
