"""Tests for qlora_lab.quant.int8 and qlora_lab.quant.zeropoint: the seminar's worked examples, error bounds derived
from the formulas, the zero-point matmul identity, and bit-for-bit agreement with
bitsandbytes' LLM.int8() kernels on CPU."""

import math

import pytest
import torch

import qlora_lab  # noqa: F401  (before bitsandbytes)
from qlora_lab.quant import int8, zeropoint
from qlora_lab.support.checks import assert_close_to_rounding

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402

FLOATS = [torch.float16, torch.bfloat16, torch.float32]
U32 = 2.0**-24  # unit roundoff of float32


# ---------------------------------------------------------------- seminar examples


def test_absmax_worked_example():
    # Seminar: alpha = 4, x = 1 -> s = 127/4 = 31.75, x_q = 32, x_hat = 32/31.75 = 1.007874...
    q, s = int8.absmax_quantize(torch.tensor([4.0, 1.0, -2.5]))
    assert s.item() == 31.75
    assert q.tolist() == [127, 32, -79]
    x_hat = int8.absmax_dequantize(q, s)
    assert x_hat[1].item() == pytest.approx(32 / 31.75, abs=1e-7)
    assert f"{x_hat[1].item():.6f}" == "1.007874"


def test_zeropoint_worked_example():
    # Seminar: alpha = 4, beta = -3, x = 1 -> s = 255/7 = 36.42..., z = -19, x_q = 17, x_hat = 36/s = 0.9882...
    q, s, z = zeropoint.zeropoint_quantize(torch.tensor([4.0, -3.0, 1.0]))
    assert s.item() == 255 / 7
    assert z.item() == -19
    assert q[2].item() == 17
    x_hat = zeropoint.zeropoint_dequantize(q, s, z)
    assert x_hat[2].item() == pytest.approx(36 * 7 / 255, abs=1e-7)
    assert f"{x_hat[2].item():.4f}" == "0.9882"
    # the ends of the range land on the end codes
    assert q[0].item() == 127 and q[1].item() == -128


# ---------------------------------------------------------------- error bounds


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [None, 0, 1, -1])
def test_absmax_round_trip_bound(dtype, bits, dim):
    # |s x| <= qmax, so no value is clipped and round() errs by at most half a code:
    # |x - q/s| <= 0.5/s. float32 arithmetic adds at most (2 * qmax) * u / s
    # (rounding of s*x and of q/s, both at most qmax in magnitude), u = 2^-24.
    x = (torch.randn(37, 53) * torch.logspace(-2, 2, 53)).to(dtype)
    q, s = int8.absmax_quantize(x, bits, dim)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert int(q.abs().max()) == qmax  # the largest |x| of every slice maps to the end code
    x_hat = int8.absmax_dequantize(q, s)
    bound = (0.5 + 2 * qmax * U32) / s
    assert bool(((x.float() - x_hat).abs() <= bound).all())


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("kind", ["symmetric", "one_sided", "narrow_far_from_zero"])
def test_zeropoint_round_trip_bound(bits, kind):
    # Real arithmetic: |s x + z - q| <= 0.5 for unclipped values; at the ends
    # s*alpha + z = 2^(b-1) - 1 + (s*beta - round(s*beta)) is within 0.5 of the top
    # code (likewise at beta), so clipping costs no more. Scale and zero point are
    # float64 (error ~1e-16 relative); x_hat is returned as float32, which adds at
    # most u * |x_hat|.
    base = torch.randn(4000, dtype=torch.float64)
    x = {"symmetric": base, "one_sided": base.abs() * 3, "narrow_far_from_zero": 1000 + 1e-3 * base}[kind].float()
    q, s, z = zeropoint.zeropoint_quantize(x, bits)
    assert int(q.min()) == -(2 ** (bits - 1)) and int(q.max()) == 2 ** (bits - 1) - 1
    x_hat = zeropoint.zeropoint_dequantize(q, s, z).double()
    bound = 0.5 / s * (1 + 1e-9) + U32 * x_hat.abs()
    assert bool(((x.double() - x_hat).abs() <= bound).all())


def test_zeropoint_beats_absmax_on_one_sided_data():
    x = torch.randn(10000).relu()  # like the output of a ReLU: nothing below 0
    err_abs = (x - int8.absmax_dequantize(*int8.absmax_quantize(x))).abs().mean()
    err_zp = (x - zeropoint.zeropoint_dequantize(*zeropoint.zeropoint_quantize(x))).abs().mean()
    # absmax leaves the 127 negative codes unused; zero-point spends all 256 on [0, max]
    assert err_zp < 0.6 * err_abs


def test_degenerate_ranges():
    zeros = torch.zeros(5)
    q, s = int8.absmax_quantize(zeros)
    assert s.item() == 1.0 and not q.any()
    assert torch.equal(int8.absmax_dequantize(q, s), zeros)
    const = torch.full((4,), 2.5)
    q, s, z = zeropoint.zeropoint_quantize(const)
    assert torch.equal(zeropoint.zeropoint_dequantize(q, s, z), const)
    q, s, z = zeropoint.zeropoint_quantize(zeros)
    assert torch.equal(zeropoint.zeropoint_dequantize(q, s, z), zeros)
    x = torch.tensor([[0.0, 0.0], [1.0, -2.0]])
    q, s = int8.absmax_quantize(x, dim=1)
    assert s[0].item() == 1.0 and q[0].tolist() == [0, 0] and q[1].tolist() == [64, -127]


def test_static_scale_clips():
    x = torch.tensor([-3.0, 0.5, 1.0, 2.0])
    q = int8.absmax_quantize_with_scale(x, 127 / 1.0)  # calibrated for |x| <= 1
    assert q.tolist() == [-127, 64, 127, 127]
    q = zeropoint.zeropoint_quantize_with_params(x, 255 / 2.0, 0)
    assert q.tolist() == [-128, 64, 127, 127]


@pytest.mark.parametrize("n,blocksize", [(4096, 64), (1000, 64), (7, 64), (130, 1)])
def test_blockwise_round_trip(n, blocksize):
    x = torch.randn(n)
    x[n // 2] = 50.0
    q, s = int8.blockwise_absmax_quantize(x, blocksize)
    assert s.numel() == -(-n // blocksize)
    # each block is absmax-quantized on its own: the bound holds block by block
    x_hat = int8.blockwise_absmax_dequantize(q, s, blocksize)
    bound = ((0.5 + 254 * U32) / s).repeat_interleave(blocksize)[:n]
    assert bool(((x - x_hat).abs() <= bound).all())
    # and equals absmax_quantize applied to each block
    for b in range(min(s.numel(), 5)):
        qb, sb = int8.absmax_quantize(x[b * blocksize : (b + 1) * blocksize])
        assert torch.equal(qb, q[b * blocksize : (b + 1) * blocksize]) and sb == s[b]


def test_blockwise_isolates_an_outlier():
    x = torch.randn(64, 256)
    x[5, 100] = 60.0
    err = lambda x_hat: (x - x_hat).abs()  # noqa: E731
    tensor_err = err(int8.absmax_dequantize(*int8.absmax_quantize(x)))
    block_err = err(int8.blockwise_absmax_dequantize(*int8.blockwise_absmax_quantize(x, 64), 64))
    row_err = err(int8.absmax_dequantize(*int8.absmax_quantize(x, dim=1)))
    others = torch.ones_like(x, dtype=torch.bool)
    others[5] = False  # rows without the outlier
    assert block_err[others].mean() < tensor_err[others].mean() / 5
    assert row_err[others].mean() < tensor_err[others].mean() / 5


def test_fake_quantize_is_straight_through():
    w = torch.randn(10, requires_grad=True)
    out = int8.fake_quantize_absmax(w, 4)
    assert torch.equal(out.detach(), int8.absmax_dequantize(*int8.absmax_quantize(w.detach(), 4)))
    (out * torch.arange(10.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(10.0))


# ---------------------------------------------------------------- zero-point matmul identity


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_zeropoint_linear_identity(with_bias, bits):
    X = torch.randn(9, 33) + 0.7
    W = torch.randn(33, 5) * 0.2 - 0.1
    b = torch.randn(5)
    x_q, s_x, z_x = zeropoint.zeropoint_quantize(X, bits)
    w_q, s_w, z_w = zeropoint.zeropoint_quantize(W, bits)
    b_q, s_b, z_b = zeropoint.zeropoint_quantize(b, bits)
    Y = X @ W + (b if with_bias else 0)
    _, s_y, z_y = zeropoint.zeropoint_quantize(Y, bits)
    bias = (b_q, s_b, z_b) if with_bias else (None, None, None)
    y_real = zeropoint.zeropoint_linear(x_q, s_x, z_x, w_q, s_w, z_w, s_y, z_y, *bias, bits=bits, round_output=False)
    # the same quantity computed the long way: dequantize, multiply in float64, requantize
    X_hat = (x_q.double() - z_x) / s_x
    W_hat = (w_q.double() - z_w) / s_w
    Y_hat = X_hat @ W_hat + ((b_q.double() - z_b) / s_b if with_bias else 0)
    direct = s_y * Y_hat + z_y
    # Both sides round in float64 (the integer bracket is exact): the p-term dot product of dequantized
    # operands, plus at most six roundings of dequantizing, scaling, the bias and the zero point.
    magnitude = s_y * (X_hat.abs() @ W_hat.abs() + (((b_q.double() - z_b) / s_b).abs() if with_bias else 0)) + z_y.abs()
    assert_close_to_rounding(y_real, direct, terms=X.shape[1] + 6, magnitude=magnitude,
                             why="exact integer bracket vs float64 dequantized matmul")
    y_q = zeropoint.zeropoint_linear(x_q, s_x, z_x, w_q, s_w, z_w, s_y, z_y, *bias, bits=bits)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert torch.equal(y_q, torch.round(direct).clamp(lo, hi).to(torch.int8))


def test_zeropoint_linear_shapes_checked():
    q = torch.zeros(3, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"X \(n, p\) @ W \(p, m\)"):
        zeropoint.zeropoint_linear(q, 1.0, 0, q, 1.0, 0, 1.0, 0)
    with pytest.raises(ValueError, match="b_scale and b_zero"):
        zeropoint.zeropoint_linear(q, 1.0, 0, q.T, 1.0, 0, 1.0, 0, b_q=torch.zeros(3, dtype=torch.int8))


# ---------------------------------------------------------------- float formats


@pytest.mark.parametrize("dtype", FLOATS)
def test_float_format_matches_finfo(dtype):
    fmt, fi = int8.float_format(dtype), torch.finfo(dtype)
    assert fmt.total_bits == fi.bits
    assert fmt.max == fi.max and fmt.smallest_normal == fi.tiny and fmt.eps == fi.eps
    assert 10.0**-fmt.decimal_digits == pytest.approx(fi.resolution)
    one = torch.tensor(1, dtype={16: torch.int16, 32: torch.int32}[fi.bits]).view(dtype)
    assert one.item() == fmt.smallest_subnormal


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float_fields_decode_every_16_bit_pattern(dtype):
    fmt = int8.float_format(dtype)
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    sign, exponent, mantissa = (f.double() for f in int8.float_fields(values))
    frac = mantissa / 2**fmt.mantissa_bits
    normal = torch.pow(2.0, exponent - fmt.bias) * (1 + frac)
    subnormal = 2.0 ** (1 - fmt.bias) * frac
    decoded = (1 - 2 * sign) * torch.where(exponent == 0, subnormal, normal)
    finite = torch.isfinite(values)
    assert int((~finite).sum()) == 2 * 2**fmt.mantissa_bits  # all-ones exponent: 2 infinities and the NaNs
    assert torch.equal(decoded[finite], values[finite].double())
    assert bool((exponent[~finite] == 2**fmt.exponent_bits - 1).all())


def test_float_bit_string():
    assert int8.float_bit_string(1.0, torch.bfloat16) == "0 01111111 0000000"
    assert int8.float_bit_string(-2.0, torch.float16) == "1 10000 0000000000"
    assert int8.float_bit_string(math.pi) == "0 10000000 10010010000111111011011"
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        int8.float_format(torch.float64)


# ---------------------------------------------------------------- LLM.int8() vs bitsandbytes


def _bnb_vectorwise(x, threshold):
    a = x.clone()  # bitsandbytes writes into its input (and restores it)
    return bnbF.int8_vectorwise_quant(a, threshold)


def _same(a, b):
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (3, 5), (64, 96), (300, 576)])
@pytest.mark.parametrize("threshold", [0.0, 0.8, 1.3, 3.0, 6.0, 6.099, 1000.0])
@pytest.mark.parametrize("data", ["normal", "heavy_tailed", "zero_row", "row_scales"])
def test_vectorwise_quantize_bit_exact_with_bitsandbytes(dtype, shape, threshold, data):
    x = torch.randn(shape)
    if data == "heavy_tailed":
        x = x * torch.exp(2 * torch.randn(shape))
    elif data == "zero_row":
        x[0] = 0
    elif data == "row_scales":
        x = x * torch.logspace(-3, 3, shape[0]).unsqueeze(1)
    x = x.to(dtype)
    before = x.clone()
    q, rows, cols = int8.vectorwise_quantize(x, threshold)
    q_ref, rows_ref, cols_ref = _bnb_vectorwise(x, threshold)
    assert _same(q, q_ref) and _same(rows, rows_ref) and _same(cols, cols_ref)
    assert torch.equal(x, before)


def test_vectorwise_is_rowwise_absmax_without_threshold():
    x = torch.randn(20, 30)
    q, rows, cols = int8.vectorwise_quantize(x)
    q2, s = int8.absmax_quantize(x, dim=1)
    assert cols is None and torch.equal(q, q2) and torch.equal(127.0 / rows, s.squeeze(1))


def test_vectorwise_outlier_rule():
    x = torch.tensor([[0.5, 1.0, 2.0], [0.0, 8.0, 0.0], [1.0, 7.0, 0.25]])
    q, rows, cols = int8.vectorwise_quantize(x, 6.0)
    assert cols.tolist() == [1]
    # only the outlier elements leave the row absmax; the whole column is zeroed in q
    assert rows.tolist() == [2.0, 0.0, 1.0]
    assert q.tolist() == [[32, 0, 127], [0, 0, 0], [127, 0, 32]]
    assert torch.equal(_bnb_vectorwise(x.half(), 6.0)[0], q)
    q, rows, cols = int8.vectorwise_quantize(x, 100.0)
    assert cols.numel() == 0 and cols.dtype == torch.int64


def test_vectorwise_any_rank_and_bitsandbytes_2d_only():
    x = torch.randn(2, 3, 4).half()
    q, rows, cols = int8.vectorwise_quantize(x, 1.0)
    q2, rows2, cols2 = int8.vectorwise_quantize(x.reshape(6, 4), 1.0)
    assert q.shape == x.shape and torch.equal(q.reshape(6, 4), q2) and torch.equal(rows, rows2)
    assert torch.equal(cols, cols2)
    # bitsandbytes' CPU kernel takes the max over dim 1, which is not the row for 3-D input
    with pytest.raises(RuntimeError):
        bnbF.int8_vectorwise_quant(x.clone())
    sq = torch.randn(2, 4, 4).half()
    _, rows_bnb, _ = bnbF.int8_vectorwise_quant(sq.clone())
    assert rows_bnb.shape == (2, 4) and torch.equal(rows_bnb, sq.abs().amax(dim=1).float())


def test_bitsandbytes_writes_into_its_input_and_restores_it():
    x = torch.randn(8, 16).half()
    x[2, 3] = 9.0
    before = x.clone()
    version = x._version
    bnbF.int8_vectorwise_quant(x, 6.0)
    assert torch.equal(x.view(torch.int16), before.view(torch.int16))  # restored bit for bit
    assert x._version == version + 2  # but written twice in place: zeroed, then restored
    # ... so a tensor that autograd saved for backward cannot be passed in
    leaf = torch.randn(4, 4, requires_grad=True)
    with torch.no_grad():
        leaf[0, 0] = 3.0  # h[0, 0] = 12 is an outlier
    h = leaf * 4.0
    loss = (h * h).sum()  # saves h
    bnbF.int8_vectorwise_quant(h.detach(), 6.0)  # detach() shares storage and version counter
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # ours does not write
    h = leaf * 4.0
    loss = (h * h).sum()
    int8.vectorwise_quantize(h.detach(), 6.0)
    loss.backward()


def test_linear8bitlt_eval_breaks_backward_of_a_saved_float16_input():
    # MatMul8bitLt passes A.to(float16) to the kernel: no copy when A is float16, so the
    # kernel's in-place writes bump the version of a tensor another op saved.
    layer = _linear8bitlt((torch.randn(16, 8) * 0.1).half(), None, 6.0)
    leaf = torch.randn(4, 8, requires_grad=True)
    with torch.no_grad():
        leaf[0, 0] = 1.0
    h = (leaf * 10).half()  # h[0, 0] = 10 is an outlier
    loss = (h * h).sum() + layer(h).float().sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    h = (leaf * 10).float()  # float32 input is copied by the cast: fine
    ((h * h).sum() + layer(h).float().sum()).backward()


def test_vectorwise_dequantize_bit_exact_with_bitsandbytes():
    q, rows, _ = int8.vectorwise_quantize(torch.randn(50, 70))
    assert torch.equal(int8.vectorwise_dequantize(q, rows), bnbF.int8_vectorwise_dequant(q, rows))


def _linear8bitlt(w, bias, threshold):
    layer = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=bias is not None, has_fp16_weights=False,
                                threshold=threshold)
    layer.weight = bnb.nn.Int8Params(w.float().clone(), requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    return layer.to("cpu").eval()  # .to() quantizes the weight; eval() selects the LLM.int8() path


@pytest.mark.parametrize("threshold", [0.0, 3.0, 6.0])
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_matmul_bit_exact_with_linear8bitlt(threshold, with_bias):
    # in_features <= 1040 keeps every int32 sum below 2^24, so bitsandbytes' int8
    # matmul is exact on every CPU (without AVX-512 it multiplies in float32).
    x = torch.randn(24, 256)
    x[:, 17] *= 15  # an outlier feature, present in some rows above 6 and some below
    x[3, 40] = -9.0
    x = x.half()
    w = (torch.randn(96, 256) * 0.05).half()
    bias = torch.randn(96).half() if with_bias else None
    layer = _linear8bitlt(w, bias, threshold)
    assert torch.equal(layer.weight.data, int8.vectorwise_quantize(w)[0])
    with torch.no_grad():
        expected = layer(x)
    got = int8.int8_matmul(x, w, threshold, bias, constant=int8.BNB_CPU_DEQUANT_CONSTANT)
    assert got.dtype == torch.float16 and torch.equal(got, expected)


def test_linear8bitlt_training_mode_on_cpu_is_weight_only_int8():
    # In training mode on CPU, bnb.matmul takes MatMul8bitFp: the int8 weight is
    # dequantized and multiplied in floating point; activations are not quantized and
    # there is no outlier decomposition. Equal up to the order of two float32 products.
    x = torch.randn(8, 64).half()
    x[:, 3] *= 20
    w = (torch.randn(16, 64) * 0.1).half()
    layer = _linear8bitlt(w, None, 6.0).train()
    with torch.no_grad():
        out = layer(x)
    w_hat = int8.vectorwise_dequantize(*int8.vectorwise_quantize(w)[:2]).half()
    assert torch.allclose(out, torch.nn.functional.linear(x, w_hat), rtol=2e-3, atol=1e-3)
    assert not torch.allclose(out, int8.int8_matmul(x, w, 6.0), rtol=2e-3, atol=1e-3)


def test_bitsandbytes_cpu_dequant_constant_is_off_by_1_8e_5():
    assert int8.INT8_DEQUANT_CONSTANT == pytest.approx(1 / 16129, rel=1e-15)
    x, w = torch.randn(16, 64), torch.randn(32, 64)
    exact = int8.int8_matmul(x, w)
    bnb_like = int8.int8_matmul(x, w, constant=int8.BNB_CPU_DEQUANT_CONSTANT)
    ratio = (bnb_like / exact)[exact.abs() > 1e-3]
    assert ratio.sub(6.200124e-05 * 16129).abs().max() < 1e-6  # every output scaled by 1.000018
    q = torch.randint(-127, 128, (4, 8), dtype=torch.int32)
    stats = torch.rand(4) + 0.5
    ref = torch.ops.bitsandbytes.int8_mm_dequant(q, stats, stats[:2].repeat(4), dtype=torch.float32)
    assert torch.equal(ref, int8.int8_matmul_dequant(q, stats, stats[:2].repeat(4),
                                                      constant=int8.BNB_CPU_DEQUANT_CONSTANT))


def test_outlier_decomposition_reduces_error():
    torch.manual_seed(1)
    x = torch.randn(32, 128)
    x[:, 7] = 20 + torch.rand(32)  # a systematic outlier feature, as in LLM.int8 Sec. 4
    w = torch.randn(64, 128) * 0.1
    exact = x @ w.T
    err = lambda out: ((out - exact).norm() / exact.norm()).item()  # noqa: E731
    assert err(int8.int8_matmul(x, w, 6.0)) < err(int8.int8_matmul(x, w)) / 3


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: int8.absmax_quantize(x),
        lambda x: zeropoint.zeropoint_quantize(x),
        lambda x: int8.vectorwise_quantize(x),
        lambda x: int8.blockwise_absmax_quantize(x),
        lambda x: int8.absmax_quantize_with_scale(x, 1.0),
    ],
)
@pytest.mark.parametrize(
    "bad,message",
    [
        (torch.arange(6).reshape(2, 3), "int64 tensor.*float32"),
        (torch.ones(2, 3, dtype=torch.int8), "int8 tensor"),
        (torch.ones(2, 3, dtype=torch.bool), "bool tensor"),
        (torch.empty(0, 3), "empty tensor"),
        (torch.tensor([[1.0, float("nan")]]), "NaN or infinite"),
        (torch.tensor([[1.0, float("inf")]]), "NaN or infinite"),
        (torch.tensor([[-float("inf"), 2.0]]).half(), "NaN or infinite"),
    ],
)
def test_bad_tensors_raise_value_error(fn, bad, message):
    with pytest.raises(ValueError, match=message):
        fn(bad)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, -8])
def test_bits_out_of_range(bits):
    x = torch.randn(4)
    with pytest.raises(ValueError, match="2 to 8 bits"):
        int8.absmax_quantize(x, bits)
    with pytest.raises(ValueError, match="2 to 8 bits"):
        zeropoint.zeropoint_quantize(x, bits)


def test_other_bad_arguments():
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="bits to be an int"):
        int8.absmax_quantize(x, 8.0)
    with pytest.raises(TypeError, match="bits to be an int"):
        zeropoint.zeropoint_quantize(x, True)
    with pytest.raises(ValueError, match="dim=2 is out of range"):
        int8.absmax_quantize(x, dim=2)
    with pytest.raises(ValueError, match="dim=-3 is out of range"):
        int8.absmax_quantize(x, dim=-3)
    with pytest.raises(TypeError, match="torch.Tensor"):
        int8.absmax_quantize([1.0, 2.0])
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        int8.vectorwise_quantize(x, -1.0)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        int8.vectorwise_quantize(x, float("nan"))
    with pytest.raises(ValueError, match="integer codes"):
        int8.absmax_dequantize(x, 1.0)
    with pytest.raises(ValueError, match="finite, positive scales"):
        int8.absmax_dequantize(torch.zeros(3, dtype=torch.int8), 0.0)
    with pytest.raises(ValueError, match="zero point must be an integer"):
        zeropoint.zeropoint_quantize_with_params(x, 1.0, 0.5)
    with pytest.raises(ValueError, match="too small"):
        int8.absmax_quantize(torch.tensor([1e-39, 0.0]))
    with pytest.raises(ValueError, match="w of shape"):
        int8.int8_matmul(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        int8.blockwise_absmax_quantize(x, 0)
