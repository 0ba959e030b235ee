"""qlora_lab.quant.double_quant against bitsandbytes 0.50.2 on CPU
(quantize_4bit(..., compress_statistics=True))."""

import pytest
import torch

from qlora_lab.quant import blockwise, nf4
from qlora_lab.quant import double_quant as dq

import bitsandbytes.functional as bnbf  # noqa: E402  (after qlora_lab)


@pytest.fixture
def eager_bnb():
    with torch._dynamo.config.patch(disable=True):
        yield


def bnb_nested(absmax):
    """bitsandbytes' double quantization of ``absmax``, as its quantize_4bit does it."""
    offset = absmax.mean()
    indices, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
    return offset, indices, state2


def bnb_grid_lookup_model(scaled, code):
    """bitsandbytes' CPU 8-bit quantizer as we understand it: round the scaled
    value to a grid of 65536 points on [-1, 1], take the code nearest to the
    grid point (float32 midpoints)."""
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    table = torch.bucketize(grid, midpoints)
    cell = ((scaled.clamp(-1, 1) + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int32)
    return table[cell.long()].to(torch.uint8)


def many_absmax():
    """First-level constants of a few realistic tensors (normal weights, heavy
    tails, a partial nested block, a bf16 input)."""
    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(1024, 1024, generator=generator),
        torch.randn(300, 517, generator=generator) * 0.02,
        torch.distributions.StudentT(3.0).sample((640, 512)),
        torch.randn(64 * 256 * 3 + 64 * 17, generator=generator).to(torch.bfloat16),
    ]
    for t in tensors:
        _, state = nf4.quantize_4bit(t, blocksize=64)
        yield state.absmax


# --------------------------------------------------------------------------- #
# The dynamic map
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes_bit_for_bit(signed):
    assert torch.equal(dq.dynamic_map(signed), bnbf.create_dynamic_map(signed=signed))


def test_dynamic_map_layout():
    code = dq.dynamic_map(signed=True)
    assert code.numel() == 256 and torch.all(code[1:] > code[:-1])
    assert code[-1] == 1.0 and (code == 0).sum() == 1 and (code < 0).sum() == 127
    positive = code[(code > 0) & (code < 1)]
    # decade 10**-z holds 2**(6 - z) values: 64 in [0.1, 1), 32 in [0.01, 0.1), ..., 1 near 1e-6
    for z in range(7):
        in_decade = ((positive >= 0.1 * 10.0**-z) & (positive < 10.0**-z)).sum().item()
        assert in_decade == 2 ** (6 - z)
    assert torch.equal(code[code < 0], -positive.flip(0))


# --------------------------------------------------------------------------- #
# double_quantize against bitsandbytes
# --------------------------------------------------------------------------- #
def test_offset_and_nested_absmax_identical_codes_agree_where_bnb_is_nearest():
    total, agreeing = 0, 0
    for absmax in many_absmax():
        indices, nested = dq.double_quantize(absmax)
        offset, bnb_indices, state2 = bnb_nested(absmax)
        assert torch.equal(nested.offset, offset)
        assert torch.equal(nested.absmax, state2.absmax)
        assert torch.equal(nested.code, state2.code) and nested.blocksize == state2.blocksize == 256
        scaled = blockwise.scale_blocks(absmax - offset, nested.absmax, 256).double()
        code = nested.code.double()
        ours_distance = (code[indices.long()] - scaled).abs()
        bnb_distance = (code[bnb_indices.long()] - scaled).abs()
        assert torch.all(ours_distance <= bnb_distance)  # ours is always a nearest code
        bnb_is_nearest = bnb_distance == ours_distance
        tie = ((code[(indices.long() + 1).clamp(max=255)] - scaled).abs() == ours_distance) & (indices < 255)
        assert torch.equal(indices[bnb_is_nearest & ~tie], bnb_indices[bnb_is_nearest & ~tie])
        total += indices.numel()
        agreeing += (indices == bnb_indices).sum().item()
    agreement = agreeing / total
    print(f"8-bit indices equal to bitsandbytes': {agreement:.4%} of {total}")
    assert 0.99 < agreement < 1.0  # bitsandbytes' grid look-up misses the nearest code in ~0.15-0.2 %


def test_bitsandbytes_codes_are_a_65536_point_grid_lookup():
    """The explanation of the disagreement, checked: bitsandbytes' CPU indices are
    exactly those of a look-up on a uniform grid of 65536 points."""
    wrong, magnitude = [], []
    for absmax in many_absmax():
        offset, bnb_indices, state2 = bnb_nested(absmax)
        scaled = blockwise.scale_blocks(absmax - offset, state2.absmax, 256)
        assert torch.equal(bnb_indices, bnb_grid_lookup_model(scaled, state2.code))
        indices, _ = dq.double_quantize(absmax)
        wrong.append(indices != bnb_indices)
        magnitude.append(scaled.abs())
    wrong, magnitude = torch.cat(wrong).float(), torch.cat(magnitude)
    # misses concentrate near zero, where the indices are closer together than the grid step 2/65535
    assert wrong[magnitude < 0.01].mean() > 5 * wrong[magnitude > 0.1].mean()


def test_our_reconstruction_error_is_no_larger_than_bitsandbytes():
    for absmax in many_absmax():
        indices, nested = dq.double_quantize(absmax)
        offset, bnb_indices, state2 = bnb_nested(absmax)
        ours = dq.double_dequantize(indices, nested)
        theirs = bnbf.dequantize_blockwise(bnb_indices, state2) + offset
        ours_error = (ours.double() - absmax.double()).pow(2).sum()
        their_error = (theirs.double() - absmax.double()).pow(2).sum()
        assert ours_error <= their_error
        assert (ours.double() - absmax.double()).abs().max() <= (theirs.double() - absmax.double()).abs().max()


def test_double_dequantize_is_bitsandbytes_arithmetic():
    for absmax in many_absmax():
        indices, nested = dq.double_quantize(absmax)
        bnb_state2 = bnbf.QuantState(absmax=nested.absmax, code=nested.code, blocksize=256, dtype=torch.float32)
        theirs = bnbf.dequantize_blockwise(indices, bnb_state2) + nested.offset
        assert torch.equal(dq.double_dequantize(indices, nested), theirs)


def test_constant_tensor_gives_zero_nested_absmax():
    absmax = torch.full((600,), 0.25)
    indices, nested = dq.double_quantize(absmax)
    assert torch.equal(nested.absmax, torch.zeros(3)) and nested.offset == 0.25
    assert torch.all(nested.code[indices.long()] == 0)  # ours stores the code of 0
    offset, bnb_indices, state2 = bnb_nested(absmax)
    assert torch.all(bnb_indices == 0)  # bitsandbytes stores code 0 (-0.993); irrelevant, the scale is 0
    assert torch.equal(dq.double_dequantize(indices, nested), absmax)
    assert torch.equal(bnbf.dequantize_blockwise(bnb_indices, state2) + offset, absmax)


# --------------------------------------------------------------------------- #
# quantize_4bit(double_quant=True)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit_double_quant_round_trips_through_bitsandbytes(dtype, quant_type, eager_bnb):
    torch.manual_seed(1)
    for shape, blocksize in [((256, 512), 64), ((1000, 64), 64), ((3, 4010), 128), ((37, 45), 64)]:  # (no shape that hits the AVX-512 bug)
        x = torch.randn(shape).to(dtype)
        packed, state = nf4.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, double_quant=True)
        bnb_packed, bnb_state = bnbf.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                                   compress_statistics=True)
        assert torch.equal(packed, bnb_packed)
        assert state.absmax is None and state.absmax_indices.dtype == torch.uint8 and state.nested is not None
        assert state.block_absmax().dtype == torch.float32
        assert torch.equal(state.nested.offset, bnb_state.offset)
        assert torch.equal(state.nested.absmax, bnb_state.state2.absmax)
        ours = nf4.dequantize_4bit(packed, state)
        converted = state.to_bnb()
        assert converted.nested and converted.state2.blocksize == 256
        assert torch.equal(bnbf.dequantize_4bit(packed, converted).reshape(x.shape), ours)
        # and the other way: bitsandbytes' state (with its own 8-bit indices) read by us
        theirs = bnbf.dequantize_4bit(bnb_packed, bnb_state).reshape(x.shape)
        assert torch.equal(nf4.dequantize_4bit(bnb_packed, nf4.QuantState.from_bnb(bnb_state)), theirs)


def test_double_quant_error_on_weights_is_tiny():
    torch.manual_seed(2)
    w = torch.randn(512, 512)
    packed, single = nf4.quantize_4bit(w)
    _, double = nf4.quantize_4bit(w, double_quant=True)
    relative = (double.block_absmax() - single.absmax).abs() / single.absmax
    assert relative.max() < 0.01  # constants within 1 %
    y1, y2 = nf4.dequantize_4bit(packed, single), nf4.dequantize_4bit(packed, double)
    assert (y2 - w).pow(2).mean() < 1.01 * (y1 - w).pow(2).mean()


# --------------------------------------------------------------------------- #
# Bits per parameter, measured from the tensors
# --------------------------------------------------------------------------- #
def test_bits_per_parameter_measured():
    w = torch.randn(4096, 4096)
    packed, state = nf4.quantize_4bit(w, blocksize=64)
    assert dq.bits_per_parameter(packed, state) == 4.5 == dq.expected_bits_per_parameter(64)
    packed, state = nf4.quantize_4bit(w, blocksize=64, double_quant=True)
    measured = dq.bits_per_parameter(packed, state)
    # 4 + 8/64 + 32/(64*256) = 4.126953..., plus the one float32 offset
    assert measured == 4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel()
    assert abs(measured - 4.127) < 5e-4
    assert dq.storage_bytes(packed, state) == w.numel() // 2 + w.numel() // 64 + 4 * (w.numel() // 64 // 256) + 4
    with_tables = dq.bits_per_parameter(packed, state, include_tables=True)
    assert with_tables == measured + 8 * (16 * 4 + 256 * 4) / w.numel()


# --------------------------------------------------------------------------- #
# Bad inputs
# --------------------------------------------------------------------------- #
def test_bad_absmax():
    with pytest.raises(ValueError, match="1-D"):
        dq.double_quantize(torch.rand(4, 4))
    with pytest.raises(ValueError, match="float32"):
        dq.double_quantize(torch.arange(10))
    with pytest.raises(ValueError, match="float32"):
        dq.double_quantize(torch.rand(10, dtype=torch.float16))
    with pytest.raises(ValueError, match="empty"):
        dq.double_quantize(torch.zeros(0))
    with pytest.raises(ValueError, match="NaN"):
        dq.double_quantize(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        dq.double_quantize([1.0, 2.0])


def test_bad_blocksizes():
    absmax = torch.rand(1000)
    for blocksize in (100, 32, 8192, 0, "256", True, 256.0):
        with pytest.raises(ValueError, match="power of two from 64 to 4096"):
            dq.double_quantize(absmax, blocksize=blocksize)


def test_bad_double_dequantize_arguments():
    indices, nested = dq.double_quantize(torch.rand(1000))
    with pytest.raises(ValueError, match="uint8"):
        dq.double_dequantize(indices.int(), nested)
    with pytest.raises(ValueError, match="need 8 second-level"):
        dq.double_dequantize(torch.cat([indices, indices]), nested)
    with pytest.raises(TypeError, match="NestedState"):
        dq.double_dequantize(indices, {"absmax": nested.absmax})


def test_double_quant_has_no_import_cycle_with_nf4():
    """double_quant is built on blockwise alone; nf4 (the 4-bit API that
    handles the nested state) imports it, not the other way round."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(dq.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {f"qlora_lab.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 and node.module == "qlora_lab" for alias in node.names}
    assert "qlora_lab.quant.nf4" not in imported and "qlora_lab.quant.blockwise" in imported
