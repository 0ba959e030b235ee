"""qlora_lab.quant.codes and qlora_lab.quant.nf4 against bitsandbytes 0.50.2 on CPU: data types, packed bytes,
absmax and dequantized values, bit for bit (torch.equal)."""

import math

import pytest
import torch

from qlora_lab.fast import nf4 as fast_nf4
from qlora_lab.quant import codes, fake_quant, nf4

import bitsandbytes.functional as bnbf  # noqa: E402  (after qlora_lab, see CONTRIBUTING)
from bitsandbytes.backends.cpu import ops as bnb_cpu_ops  # noqa: E402
from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BNB_TYPES = ("nf4", "fp4")


@pytest.fixture
def eager_bnb():
    """bitsandbytes' PyTorch fallback for dequantize_4bit is wrapped in
    torch.compile, which takes tens of seconds per new shape; the computation
    is the same eagerly, so most tests run it without compiling."""
    with torch._dynamo.config.patch(disable=True):
        yield


def assert_same_as_bnb(x, blocksize, quant_type):
    """The readable definition and the fast path (qlora_lab.fast.nf4) both give
    bitsandbytes' bytes and absmax."""
    packed, state = nf4.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    bnb_packed, bnb_state = bnbf.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    assert packed.dtype == torch.uint8 and packed.shape == bnb_packed.shape
    assert torch.equal(packed, bnb_packed), f"packed bytes differ ({quant_type}, block {blocksize}, {x.dtype})"
    assert state.absmax.dtype == torch.float32
    assert torch.equal(state.absmax, bnb_state.absmax), "absmax differs"
    fast_packed, fast_state = fast_nf4.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    assert torch.equal(fast_packed, packed) and torch.equal(fast_state.absmax, state.absmax), "fast path differs"
    return packed, state


# --------------------------------------------------------------------------- #
# Data types
# --------------------------------------------------------------------------- #
def test_nf4_code_is_bitsandbytes_table_bit_for_bit():
    code = codes.normal_float_code(4)
    assert code.dtype == torch.float32
    assert torch.equal(code, bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(code, torch.unique(bnbf.create_normal_map()))  # how bitsandbytes builds it


def test_nf4_offset_formula_gives_bitsandbytes_constant():
    assert codes.normal_float_offset(4) == codes.NF4_OFFSET == 0.9677083
    assert codes.normal_float_offset(3) == round(1 - (1 / 14 + 1 / 16) / 2, 7)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_asymmetric_normal_float_has_exact_zero_and_more_positive_values(bits):
    code = codes.normal_float_code(bits)
    assert code.numel() == 2**bits and torch.all(code[1:] > code[:-1])
    assert code[0] == -1.0 and code[-1] == 1.0
    assert (code == 0).sum() == 1
    assert (code > 0).sum() == 2 ** (bits - 1) and (code < 0).sum() == 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_symmetric_normal_float_is_the_paper_formula(bits):
    from scipy.stats import norm

    code = codes.normal_float_code(bits, symmetric=True)
    assert code.numel() == 2**bits and torch.all(code[1:] > code[:-1])
    assert torch.equal(code, -code.flip(0)) and not (code == 0).any()  # symmetric, no zero
    offset = codes.normal_float_offset(bits)
    p = [1 - offset + (2 * offset - 1) * i / 2**bits for i in range(2**bits + 1)]
    q = [(norm.ppf(p[i]) + norm.ppf(p[i + 1])) / 2 for i in range(2**bits)]
    expected = torch.tensor(q) / max(q)
    assert torch.equal(code, expected.float())  # to the float32 bit, as the docstring says: no sums, so no kernel order


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_normal_float_code_from_scipys_quantiles_is_the_same_to_the_bit(bits, symmetric):
    """The construction with scipy.stats.norm.ppf as Q (the course's reference
    for the normal quantile function) gives exactly the codes we compute with
    torch.special.ndtri."""
    import numpy as np
    from scipy.stats import norm

    offset = codes.normal_float_offset(bits)
    if symmetric:
        q = norm.ppf(np.linspace(1 - offset, offset, 2**bits + 1))
        mid = (q[:-1] + q[1:]) / 2
        expected = torch.from_numpy(mid / np.abs(mid).max()).float()
    else:
        half = 2 ** (bits - 1)
        positive = norm.ppf(torch.linspace(offset, 0.5, half + 1)[:-1].numpy())
        negative = -norm.ppf(torch.linspace(offset, 0.5, half)[:-1].numpy())
        values = torch.tensor([*positive.tolist(), 0.0, *negative.tolist()], dtype=torch.float32).sort().values
        expected = values / values.max()
    assert torch.equal(codes.normal_float_code(bits, symmetric=symmetric), expected)


def test_quantizing_does_not_import_scipy():
    import subprocess
    import sys

    code = ("import sys, torch, qlora_lab.quant.nf4 as n; n.quantize_4bit(torch.randn(128)); "
            "print('scipy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_fp4_code_is_bitsandbytes_table_bit_for_bit():
    assert torch.equal(codes.fp4_code(), bnbf.get_4bit_type("fp4", device="cpu"))


def test_bitsandbytes_fp8_map_disagrees_with_its_fp4_table_on_the_subnormal():
    # Documented inconsistency: bitsandbytes' comment says create_fp8_map(2, 1) regenerates FP4.
    regenerated = set(bnbf.create_fp8_map(signed=True, exponent_bits=2, precision_bits=1, total_bits=4).tolist())
    table = set(codes.fp4_code().tolist())
    as_float32 = lambda values: {torch.tensor(v, dtype=torch.float32).item() for v in values}  # noqa: E731
    assert regenerated - table == as_float32([0.125 / 6, -0.125 / 6])
    assert table - regenerated == as_float32([0.0625 / 12, -0.0625 / 12])


def test_bitsandbytes_cannot_build_its_int4_table():
    with pytest.raises(RuntimeError):
        bnbf.get_4bit_type("int4", device="cpu")


def test_int4_code_is_twos_complement_over_seven():
    code = codes.int4_code()
    integers = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1], dtype=torch.float32)
    assert torch.equal(code, integers / 7)
    assert torch.equal(torch.unique(code[code >= -1]), codes.integer_code(4))


def test_float_and_integer_codes():
    assert torch.equal(codes.float_code(2, 1) * 6, torch.tensor([-6, -4, -3, -2, -1.5, -1, -0.5, 0,
                                                               0.5, 1, 1.5, 2, 3, 4, 6]))
    assert torch.equal(codes.float_code(2, 0), torch.tensor([-1, -0.5, -0.25, 0, 0.25, 0.5, 1]))
    # Our 3-bit float equals bitsandbytes' own construction of the same layout.
    assert torch.equal(codes.float_code(2, 0),
                       torch.unique(bnbf.create_fp8_map(signed=True, exponent_bits=2, precision_bits=0, total_bits=3)))
    assert torch.equal(codes.integer_code(3) * 3, torch.arange(-3.0, 4.0))
    assert torch.equal(codes.integer_code(2), torch.tensor([-1.0, 0.0, 1.0]))


def test_fp4_e3m0_is_zero_and_seven_powers_of_two_each_side():
    code = codes.fp4_e3m0_code()
    powers = [2.0**-k for k in range(6, -1, -1)]  # 1/64, 1/32, ..., 1/2, 1
    assert torch.equal(code, torch.tensor([-p for p in reversed(powers)] + [0.0] + powers))
    assert code.dtype == torch.float32
    # the distinct values of bitsandbytes' own construction of the same layout (QLoRA Table 2's FP4 E3M0)
    assert torch.equal(code, torch.unique(bnbf.create_fp8_map(signed=True, exponent_bits=3, precision_bits=0,
                                                               total_bits=4)))


# --------------------------------------------------------------------------- #
# Nearest code
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("quant_type", BNB_TYPES)
def test_thresholds_and_order_are_bitsandbytes(quant_type):
    code = codes.code_for(quant_type)
    bounds, order = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
    assert torch.equal(nf4.code_thresholds(code), bounds) and torch.equal(torch.argsort(code, stable=True), order)


@pytest.mark.parametrize("quant_type", nf4.QUANT_TYPES)
def test_nearest_code_is_nearest(quant_type):
    code = codes.code_for(quant_type)
    x = torch.rand(10_000) * 2.2 - 1.1
    indices = nf4.nearest_code(x, code)
    assert indices.dtype == torch.uint8
    assert torch.equal(code[indices.long()], code[(x[:, None] - code).abs().argmin(1)])  # same value (FP4: +-0)


def test_value_on_threshold_goes_to_lower_code():
    code = codes.normal_float_code(4)
    thresholds = nf4.code_thresholds(code)
    x = torch.cat([torch.tensor([1.0]), thresholds])  # absmax 1, so the values are scaled by exactly 1
    packed, _ = assert_same_as_bnb(x, 64, "nf4")
    assert nf4.unpack_nibbles(packed)[1:16].tolist() == list(range(15))


# --------------------------------------------------------------------------- #
# quantize_4bit bit for bit
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", BNB_TYPES)
@pytest.mark.parametrize("blocksize", nf4.BLOCKSIZES)
def test_quantize_matches_bitsandbytes(dtype, quant_type, blocksize):
    torch.manual_seed(blocksize)
    for shape in [(3 * blocksize,), (2 * blocksize + 17,), (blocksize - 1,), (1,), (2,), (37, 45), (4, 3, 130)]:
        x = (torch.randn(shape) * 3).to(dtype)
        assert_same_as_bnb(x, blocksize, quant_type)


@pytest.mark.parametrize("quant_type", BNB_TYPES)
def test_quantize_matches_bitsandbytes_on_millions_of_normal_values(quant_type):
    torch.manual_seed(1)
    x = torch.randn(4_000_001)  # odd, so a partial last block and a padded last byte
    assert_same_as_bnb(x, 64, quant_type)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", BNB_TYPES)
def test_quantize_adversarial_values(dtype, quant_type):
    torch.manual_seed(2)
    big = torch.finfo(dtype).max
    tiny = torch.finfo(dtype).tiny
    blocks = [
        torch.zeros(64),                                   # all-zero block
        torch.full((64,), -0.0),                           # negative zeros
        torch.randn(64).clamp(-4, 4) * (big / 4),          # huge (absmax near the largest float)
        torch.randn(64) * tiny * 4,                        # tiny normal numbers
        torch.randn(64) * tiny / 64,                       # subnormal (fp32/bf16: absmax < 1e-38)
        torch.full((64,), 3.0),                            # constant
        torch.tensor([5.0] + [-5.0] * 63),                 # +-absmax
        torch.randn(64).sign() * 1e-3,                     # tiny values around zero (FP4's +-0 codes)
        torch.linspace(-1, 1, 64),                         # evenly spread, exact +-1
    ]
    x = torch.cat(blocks).to(dtype)
    assert torch.isfinite(x).all()
    for tail in (0, 1, 7, 33):
        assert_same_as_bnb(torch.cat([x, x[:tail] * 0.5]), 64, quant_type)


def rule_sensitive_values(code, count=40, seed=3):
    """(absmax, values) such that bucketize(x * (1/absmax)) != bucketize(x / absmax):
    values whose bucket depends on bitsandbytes' rounding rule."""
    t = nf4.code_thresholds(code)
    generator = torch.Generator().manual_seed(seed)
    while True:
        absmax = torch.rand(1, generator=generator) * 10 + 0.5
        centre = (t * absmax).view(torch.int32)
        x = (centre[:, None] + torch.arange(-40, 41, dtype=torch.int32)).view(torch.float32).reshape(-1)
        by_reciprocal = torch.bucketize(x * (1.0 / absmax), t)
        by_division = torch.bucketize(x / absmax, t)
        differ = x[by_reciprocal != by_division]
        if differ.numel() >= 2:
            return absmax, differ[:count]


@pytest.mark.parametrize("quant_type", BNB_TYPES)
def test_full_blocks_multiply_partial_block_divides(quant_type):
    code = codes.code_for(quant_type)
    absmax, sensitive = rule_sensitive_values(code)
    k = sensitive.numel()
    block = torch.cat([absmax, sensitive, torch.zeros(64 - 1 - k)])
    partial = torch.cat([absmax, sensitive])  # shorter than 64: the partial last block
    x = torch.cat([block, block, partial])
    packed, state = assert_same_as_bnb(x, 64, quant_type)
    indices = nf4.unpack_nibbles(packed)[: x.numel()]
    in_full_block = indices[1:1 + k]
    in_partial_block = indices[129:129 + k]
    assert not torch.equal(in_full_block, in_partial_block), "the two rules must differ on these values"


def test_odd_count_pads_with_the_code_of_zero():
    x = torch.tensor([1.0, -1.0, 0.5])
    packed, _ = nf4.quantize_4bit(x, quant_type="nf4")
    assert packed[-1, 0] & 0xF == 7  # NF4's zero
    packed, _ = nf4.quantize_4bit(x, quant_type="fp4")
    assert packed[-1, 0] & 0xF == 0  # FP4's +0


def test_fp4_puts_small_positive_values_on_negative_zero():
    x = torch.tensor([1.0, 0.001, -0.001, 0.0])
    packed, state = assert_same_as_bnb(x, 64, "fp4")
    assert nf4.unpack_nibbles(packed).tolist() == [3, 8, 0, 0]  # 1.0, -0 for +0.001, +0 for -0.001


def test_quantize_accepts_non_contiguous_and_grad_tensors():
    w = torch.randn(96, 64, requires_grad=True)
    for x in (w, w.t(), w[:, ::2]):
        packed, state = nf4.quantize_4bit(x)
        ref, _ = bnbf.quantize_4bit(x.detach().contiguous(), blocksize=64, quant_type="nf4")
        assert torch.equal(packed, ref) and state.shape == x.shape


# --------------------------------------------------------------------------- #
# dequantize_4bit against bitsandbytes' three CPU code paths
# --------------------------------------------------------------------------- #
def flattened_block_reference(packed, state):
    """The definition: code[index] * absmax of the index's block, in float32."""
    indices = nf4.unpack_nibbles(packed)[: state.numel].long()
    values = state.code[indices]
    blocks = torch.arange(state.numel) // state.blocksize
    return (values * state.block_absmax()[blocks]).to(state.dtype).reshape(state.shape)


def avx512_kernel_model(packed, state):
    """bitsandbytes' AVX-512 dequantize_4bit kernel: row r, column c uses
    absmax[r * (n // blocksize) + c // blocksize] (it assumes rows start blocks)."""
    shape = state.shape if len(state.shape) > 1 else (1, state.shape[0])
    m, n = math.prod(shape[:-1]), shape[-1]
    values = state.code[nf4.unpack_nibbles(packed)[: m * n].long()].view(m, n)
    index = torch.arange(m)[:, None] * (n // state.blocksize) + torch.arange(n)[None, :] // state.blocksize
    return (values * state.absmax[index]).to(state.dtype).reshape(shape)


def uses_avx512_kernel(shape, blocksize):
    return bnb_cpu_ops._has_avx512 and blocksize < 2048 and shape[-1] % 16 == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", BNB_TYPES)
def test_dequantize_matches_bitsandbytes_c_kernel(dtype, quant_type):
    torch.manual_seed(4)
    # even last dimensions, each row a whole number of blocks (or a single row)
    for shape, blocksize in [((64, 256), 64), ((32, 128), 32), ((8, 1024), 1024), ((3, 512), 128),
                             ((4096,), 64), ((1, 96), 64), ((6, 10), 64), ((5, 34), 32)]:
        x = (torch.randn(shape) * 2).to(dtype)
        packed, state = assert_same_as_bnb(x, blocksize, quant_type)
        ours = nf4.dequantize_4bit(packed, state)
        assert ours.shape == x.shape and ours.dtype == dtype
        assert torch.equal(ours, flattened_block_reference(packed, state))
        theirs = bnbf.dequantize_4bit(packed, state.to_bnb())
        assert torch.equal(theirs.reshape(x.shape), ours)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", BNB_TYPES)
def test_dequantize_matches_bitsandbytes_torch_fallback(dtype, quant_type, eager_bnb):
    torch.manual_seed(5)
    # odd last dimensions, and blocks of 2048/4096 (which take the fallback on AVX-512 CPUs)
    for shape, blocksize in [((37, 45), 64), ((5, 3, 7), 32), ((1001,), 128), ((3,), 64),
                             ((16, 256), 2048), ((3, 4000), 4096), ((2, 2049), 2048)]:
        x = (torch.randn(shape) * 2).to(dtype)
        packed, state = assert_same_as_bnb(x, blocksize, quant_type)
        ours = nf4.dequantize_4bit(packed, state)
        assert torch.equal(ours, flattened_block_reference(packed, state))
        assert torch.equal(bnbf.dequantize_4bit(packed, state.to_bnb()).reshape(x.shape), ours)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitsandbytes_avx512_kernel_misplaces_blocks_that_span_rows(dtype):
    """Documented bitsandbytes bug: rows of a multiple of 16 columns that are not
    a multiple of the block size get the wrong absmax from the AVX-512 kernel.
    On other CPUs the scalar C loop is right and equals ours."""
    torch.manual_seed(6)
    for shape, blocksize in [((8, 96), 64), ((576, 576), 128), ((3, 32), 64), ((5, 320), 256)]:
        x = torch.randn(shape).to(dtype)
        packed, state = assert_same_as_bnb(x, blocksize, "nf4")
        ours = nf4.dequantize_4bit(packed, state)
        theirs = bnbf.dequantize_4bit(packed, state.to_bnb())
        if uses_avx512_kernel(shape, blocksize):
            assert torch.equal(theirs, avx512_kernel_model(packed, state))
            assert not torch.equal(theirs, ours)
            # ours is the faithful one: much closer to the original
            assert (ours.float() - x.float()).abs().max() < (theirs.float() - x.float()).abs().max()
        else:
            assert torch.equal(theirs, ours)


def test_bitsandbytes_dequantize_shape_quirks():
    x = torch.randn(6)
    packed, state = nf4.quantize_4bit(x)
    assert bnbf.dequantize_4bit(packed, state.to_bnb()).shape == (1, 6)  # C path: (1, n)
    assert nf4.dequantize_4bit(packed, state).shape == (6,)
    x = torch.randn(2)
    packed, state = nf4.quantize_4bit(x)
    assert bnbf.dequantize_4bit(packed, state.to_bnb()).shape == (2, 1)  # transposed "BC shim"
    assert nf4.dequantize_4bit(packed, state).shape == (2,)


def test_dequantize_compiled_fallback_once():
    """The fallback as bitsandbytes really runs it (torch.compile), on one shape.
    dynamo.reset() because an earlier call with dynamo disabled marks the
    function to be skipped for the rest of the process."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled_before = counters["frames"]["ok"]
    torch.manual_seed(7)
    x = torch.randn(7, 9, dtype=torch.bfloat16)
    packed, state = assert_same_as_bnb(x, 64, "nf4")
    assert torch.equal(bnbf.dequantize_4bit(packed, state.to_bnb()), nf4.dequantize_4bit(packed, state))
    assert counters["frames"]["ok"] > compiled_before, "bitsandbytes' fallback was not compiled"


def test_int4_round_trip_error_is_at_most_half_a_step():
    torch.manual_seed(8)
    x = torch.randn(64, 64)
    packed, state = nf4.quantize_4bit(x, quant_type="int4")
    y = nf4.dequantize_4bit(packed, state)
    step = state.absmax.repeat_interleave(64).view(64, 64) / 7
    assert ((y - x).abs() <= step / 2 * (1 + 1e-6)).all()
    assert set(nf4.unpack_nibbles(packed).tolist()) <= set(range(16)) - {8}  # -8 never produced


@pytest.mark.parametrize("quant_type", nf4.QUANT_TYPES)
def test_round_trip_is_idempotent(quant_type):
    torch.manual_seed(9)
    x = torch.randn(40, 50)
    y = nf4.dequantize_4bit(*nf4.quantize_4bit(x, quant_type=quant_type))
    z = nf4.dequantize_4bit(*nf4.quantize_4bit(y, quant_type=quant_type))
    assert torch.equal(z, y)  # elementwise only: absmax(y) = absmax(x) exactly, y / absmax rounds to the same nearest code


# --------------------------------------------------------------------------- #
# QuantState conversion
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("quant_type", BNB_TYPES)
def test_state_round_trips_through_bitsandbytes(quant_type):
    x = torch.randn(10, 20, dtype=torch.bfloat16)
    packed, state = nf4.quantize_4bit(x, blocksize=32, quant_type=quant_type)
    bnb_state = state.to_bnb()
    assert isinstance(bnb_state, bnbf.QuantState)
    assert (bnb_state.shape, bnb_state.dtype, bnb_state.blocksize, bnb_state.quant_type) == \
        (torch.Size([10, 20]), torch.bfloat16, 32, quant_type)
    assert torch.equal(bnb_state.code, state.code) and not bnb_state.nested
    back = nf4.QuantState.from_bnb(bnb_state)
    assert back.shape == state.shape and back.dtype == state.dtype and back.blocksize == 32
    assert torch.equal(back.absmax, state.absmax) and back.nested is None
    _, theirs = bnbf.quantize_4bit(x, blocksize=32, quant_type=quant_type)
    ours = nf4.QuantState.from_bnb(theirs)
    assert torch.equal(nf4.dequantize_4bit(packed, ours), nf4.dequantize_4bit(packed, state))


def test_int4_state_does_not_convert_to_bitsandbytes():
    _, state = nf4.quantize_4bit(torch.randn(8), quant_type="int4")
    with pytest.raises(ValueError, match="only 'nf4' and 'fp4'"):
        state.to_bnb()


# --------------------------------------------------------------------------- #
# Bad inputs
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("x, message", [
    (torch.arange(10), "int64 tensor"),
    (torch.ones(4, dtype=torch.uint8), "uint8 tensor"),
    (torch.tensor([1.0, float("nan")]), "NaN or infinity"),
    (torch.tensor([1.0, float("inf")]), "NaN or infinity"),
    (torch.tensor([-float("inf")] * 3, dtype=torch.bfloat16), "NaN or infinity"),
    (torch.empty(0, 5), "empty tensor"),
])
def test_bad_tensors(x, message):
    with pytest.raises(ValueError, match=message):
        nf4.quantize_4bit(x)


def test_bad_arguments():
    x = torch.randn(128)
    with pytest.raises(TypeError, match="torch.Tensor"):
        nf4.quantize_4bit([1.0, 2.0])
    with pytest.raises(ValueError, match="quant_type must be one of"):
        nf4.quantize_4bit(x, quant_type="nf3")
    for blocksize in (16, 100, 8192, 0, "64", True, 64.0):
        with pytest.raises(ValueError, match="blocksize must be one of"):
            nf4.quantize_4bit(x, blocksize=blocksize)
    with pytest.raises(TypeError, match="double_quant"):
        nf4.quantize_4bit(x, double_quant="yes")
    for bits in (1, 9, 4.0):
        with pytest.raises(ValueError, match="bits must be"):
            codes.normal_float_code(bits)


def test_bad_dequantize_arguments():
    packed, state = nf4.quantize_4bit(torch.randn(10, 10))
    with pytest.raises(ValueError, match="packs into 50 bytes"):
        nf4.dequantize_4bit(packed[:-1], state)
    with pytest.raises(ValueError, match="packed uint8"):
        nf4.dequantize_4bit(packed.int(), state)
    with pytest.raises(TypeError, match="QuantState.from_bnb"):
        nf4.dequantize_4bit(packed, state.to_bnb())
    state.absmax = state.absmax[:1]
    state.shape = torch.Size([10, 10])
    with pytest.raises(ValueError, match="need 2 absmax"):
        nf4.dequantize_4bit(packed, state)


# --------------------------------------------------------------------------- #
# k-bit helpers and fake quantization
# --------------------------------------------------------------------------- #
def test_blockwise_with_any_code_equals_4bit_path():
    torch.manual_seed(10)
    x = torch.randn(33, 17)
    for quant_type in nf4.QUANT_TYPES:
        indices, absmax = nf4.quantize_blockwise(x, codes.code_for(quant_type), 64)
        packed, state = nf4.quantize_4bit(x, quant_type=quant_type)
        assert torch.equal(indices, nf4.unpack_nibbles(packed)[: x.numel()])
        y = nf4.dequantize_blockwise(indices, absmax, state.code, 64, x.shape)
        assert torch.equal(y, nf4.dequantize_4bit(packed, state))


def test_pack_unpack_inverse():
    indices = torch.randint(0, 16, (1000,), dtype=torch.uint8)
    packed = nf4.pack_nibbles(indices)
    assert packed.shape == (500, 1) and torch.equal(nf4.unpack_nibbles(packed), indices)
    assert packed[0, 0] == indices[0] * 16 + indices[1]
    with pytest.raises(ValueError, match="even number"):
        nf4.pack_nibbles(indices[:3])


def test_fake_quantize_linear_layers(tiny):
    reference = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    replaced = fake_quant.fake_quantize_linear_layers(tiny, "nf4")
    linear_names = [n for n, m in tiny.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert replaced == len(linear_names) == 14
    for name, module in tiny.named_modules():
        if name in linear_names:
            w = reference[name + ".weight"]
            assert torch.equal(module.weight, nf4.dequantize_4bit(*nf4.quantize_4bit(w)))
    assert torch.equal(tiny.lm_head.weight, reference["lm_head.weight"])
    assert torch.equal(tiny.model.norm.weight, reference["model.norm.weight"])
    replaced = fake_quant.fake_quantize_linear_layers(tiny, code=codes.normal_float_code(3))
    assert replaced == 14
    values = tiny.model.layers[0].mlp.up_proj.weight.reshape(-1, 64)
    assert max(torch.unique(block).numel() for block in values) <= 8  # NF3: 8 values per block


def test_benchmark_script_runs_small():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "quantize.py"
    done = subprocess.run([sys.executable, str(script), "--shapes", "64x64", "33x7", "--runs", "1", "--definitions",
                           "--no-compile"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for text in ("quantize", "dequantize into a fresh output", "dequantize into a reused output", "| 64 x 64 |",
                 "| 33 x 7 |", "ratio fast", "ratio readable", "fast / floor"):
        assert text in done.stdout
    bad = subprocess.run([sys.executable, str(script), "--size", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "positive integer" in bad.stderr
    bad = subprocess.run([sys.executable, str(script), "--shapes", "576by1536"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "write ROWSxCOLUMNS" in bad.stderr
