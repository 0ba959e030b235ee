import torch
from scipy.stats import norm

from qlora_lab.exercises import ch02
from qlora_lab.quant import codes, nf4

from exercise_feedback import assert_bugs_are_feedback


def not_attempted(*args):
    raise NotImplementedError("your turn")


def right_code(bits):
    offset = codes.normal_float_offset(bits)
    half = 2 ** (bits - 1)
    positive = norm.ppf(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1].numpy())
    negative = -norm.ppf(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1].numpy())
    values = torch.tensor(sorted([*positive, 0.0, *negative]), dtype=torch.float64)
    return values / values.max()


def test_exercise_1(capsys):
    assert ch02.check_exercise_1(right_code)  # float64 arithmetic is within tolerance
    assert ch02.check_exercise_1(codes.normal_float_code)
    assert "correct" in capsys.readouterr().out
    assert not ch02.check_exercise_1(lambda bits: codes.normal_float_code(bits, symmetric=True))
    assert "exact zero" in capsys.readouterr().out
    assert not ch02.check_exercise_1(lambda bits: right_code(bits) * 1.8)
    assert "largest value" in capsys.readouterr().out
    assert not ch02.check_exercise_1(lambda bits: right_code(bits).flip(0))
    assert "unsorted" in capsys.readouterr().out
    assert not ch02.check_exercise_1(lambda bits: torch.cat([right_code(bits), torch.zeros(256 - 2**bits)]))
    assert "256" in capsys.readouterr().out
    assert not ch02.check_exercise_1(lambda bits: -right_code(bits).flip(0))  # more negative than positive
    assert "positive quantiles" in capsys.readouterr().out
    unbounded = lambda bits: torch.tensor(norm.ppf(torch.linspace(0, 1, 2**bits).numpy()))  # noqa: E731
    assert not ch02.check_exercise_1(unbounded)
    assert "inf or NaN" in (out := capsys.readouterr().out) and "normal_float_offset(bits)" in out
    assert not ch02.check_exercise_1(not_attempted)
    assert "not attempted" in capsys.readouterr().out
    assert not ch02.check_exercise_1(lambda bits: 1 / 0)
    assert "ZeroDivisionError" in capsys.readouterr().out


def right_dequantize(packed, absmax, code, blocksize, shape):
    flat = packed.reshape(-1)
    n = 1
    for size in shape:
        n *= size
    indices = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n].long()
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (code[indices] * scale).reshape(shape)


def test_exercise_2(capsys):
    assert ch02.check_exercise_2(right_dequantize)
    assert "correct" in capsys.readouterr().out

    def low_nibble_first(packed, absmax, code, blocksize, shape):
        swapped = ((packed & 0xF) << 4) | (packed >> 4)
        return right_dequantize(swapped, absmax, code, blocksize, shape)

    assert not ch02.check_exercise_2(low_nibble_first)
    assert "high nibble" in capsys.readouterr().out

    def keeps_padding(packed, absmax, code, blocksize, shape):
        flat = packed.reshape(-1)
        indices = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1).long()
        return code[indices] * absmax.repeat_interleave(blocksize)[: indices.numel()]

    assert not ch02.check_exercise_2(keeps_padding)
    out = capsys.readouterr().out
    assert "expected shape" in out

    def divides(packed, absmax, code, blocksize, shape):
        return right_dequantize(packed, absmax.double(), code.double(), blocksize, shape).float() / 1.0000001

    assert not ch02.check_exercise_2(divides)
    assert "almost" in capsys.readouterr().out

    def ignores_partial_block(packed, absmax, code, blocksize, shape):
        out = right_dequantize(packed, absmax, code, blocksize, shape).reshape(-1)
        full = out.numel() - out.numel() % blocksize
        out[full:] = out[full:] / absmax[-1] * absmax[0]
        return out.reshape(shape)

    assert not ch02.check_exercise_2(ignores_partial_block)
    assert "values differ" in capsys.readouterr().out
    assert not ch02.check_exercise_2(not_attempted)
    assert "not attempted" in capsys.readouterr().out


def right_block_size_errors(x, blocksizes):
    errors = {}
    for b in blocksizes:
        errors[b] = {}
        for name in ("Int4", "FP4", "NF4"):
            code = codes.code_for(name.lower())
            indices, absmax = nf4.quantize_blockwise(x, code, b)
            error = nf4.dequantize_blockwise(indices, absmax, code, b, x.shape) - x
            errors[b][name] = (error.pow(2).sum() / x.pow(2).sum()).sqrt().item()  # float32, as a learner would
    return errors


def test_exercise_3(capsys):
    x = torch.randn(3, 5000, generator=torch.Generator().manual_seed(3)) * 0.02  # partial blocks at every size
    assert ch02.check_exercise_3(right_block_size_errors, x)
    assert "correct" in capsys.readouterr().out
    as_tensors = lambda x, bs: {b: {n: torch.tensor(e) for n, e in r.items()}  # noqa: E731
                                for b, r in right_block_size_errors(x, bs).items()}
    assert ch02.check_exercise_3(as_tensors, x)
    capsys.readouterr()

    def with_norm(x, bs):  # another float32 summation order than tensor.sum()
        out = {}
        for b in bs:
            out[b] = {}
            for name in ("Int4", "FP4", "NF4"):
                code = codes.code_for(name.lower())
                quantized = nf4.dequantize_blockwise(*nf4.quantize_blockwise(x, code, b), code, b, x.shape)
                out[b][name] = (torch.linalg.norm(quantized - x) / torch.linalg.norm(x)).item()
        return out

    assert ch02.check_exercise_3(with_norm, x)
    capsys.readouterr()

    squared = lambda x, bs: {b: {n: e**2 for n, e in r.items()}  # noqa: E731
                             for b, r in right_block_size_errors(x, bs).items()}
    assert not ch02.check_exercise_3(squared, x)
    assert "square root" in capsys.readouterr().out
    always_64 = lambda x, bs: {b: right_block_size_errors(x, (64,))[64] for b in bs}  # noqa: E731
    assert not ch02.check_exercise_3(always_64, x)
    assert "another block size" in capsys.readouterr().out
    mean_absolute = lambda x, bs: {b: {n: e * 0.8 for n, e in r.items()}  # noqa: E731
                                   for b, r in right_block_size_errors(x, bs).items()}
    assert not ch02.check_exercise_3(mean_absolute, x)
    assert "||Q(x) - x|| / ||x||" in capsys.readouterr().out
    assert not ch02.check_exercise_3(lambda x, bs: {64: {}}, x)
    assert "one entry per block size" in capsys.readouterr().out
    no_fp4 = lambda x, bs: {b: {"Int4": 0.1, "NF4": 0.1} for b in bs}  # noqa: E731
    assert not ch02.check_exercise_3(no_fp4, x)
    assert "'FP4'" in capsys.readouterr().out
    assert not ch02.check_exercise_3(right_block_size_errors, "weights")
    assert "second argument" in capsys.readouterr().out
    assert not ch02.check_exercise_3(not_attempted, x)
    assert "not attempted" in capsys.readouterr().out


def test_exercise_3_reference_is_the_definition():
    x = torch.randn(2, 300, generator=torch.Generator().manual_seed(4))
    code = codes.code_for("nf4")
    indices, absmax = nf4.quantize_blockwise(x, code, 256)
    quantized = nf4.dequantize_blockwise(indices, absmax, code, 256, x.shape)
    expected = ((quantized.double() - x.double()).pow(2).sum() / x.double().pow(2).sum()).sqrt().item()
    assert ch02.block_size_errors(x, (256,))[256]["NF4"] == expected


# ------------------------------------------------------- a learner's bug is feedback


def test_a_bug_in_the_learners_code_is_feedback_not_a_crash(capsys):
    assert_bugs_are_feedback(capsys, [
        (1, ch02.check_exercise_1, ()),
        (2, ch02.check_exercise_2, ()),
        (3, ch02.check_exercise_3, (torch.randn(300),)),
    ])
