"""Every piece of qlora_lab.fast equals the reference it speeds up."""

import copy

import pytest
import torch

from qlora_lab.fast.loss import causal_lm_loss, labelled_positions
from qlora_lab.lora import add_lora
from qlora_lab.support.checks import assert_close_to_rounding

IGNORE = -100


def padded_batch(vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Four right-padded rows of different lengths, labels on a few spans only (as
    "train on target" makes them), one row whose labels reach its last token."""
    lengths = [17, 9, 23, 12]
    width = max(lengths)
    input_ids = torch.randint(0, vocab, (4, width), generator=generator)
    attention_mask = torch.zeros(4, width, dtype=torch.long)
    labels = torch.full((4, width), IGNORE)
    for row, (n, spans) in enumerate(zip(lengths, [[(5, 9), (12, 17)], [(3, 9)], [(20, 23)], [(1, 4), (8, 12)]])):
        attention_mask[row, :n] = 1
        input_ids[row, n:] = 0
        for start, end in spans:
            labels[row, start:end] = input_ids[row, start:end]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def position_terms(batch) -> int:
    """Terms of the reference loss's sum: every shifted position (non-negative token losses, zeros
    where unlabelled), so |sum| is the sum of their sizes and the loss itself bounds the magnitude."""
    return batch["labels"][:, 1:].numel()


def loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("with_count", [True, False])
def test_causal_lm_loss_equals_transformers_bit_for_bit(tiny, with_count):
    add_lora(tiny, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    model = tiny
    batch = padded_batch(tiny.config.vocab_size, torch.Generator().manual_seed(1))
    n = int((batch["labels"][:, 1:] != IGNORE).sum()) + 5 if with_count else None  # as if accumulated
    kwargs = {"num_items_in_batch": n} if with_count else {}
    ref, ref_grads = loss_and_grads(model, lambda: model(**batch, **kwargs).loss)
    new, new_grads = loss_and_grads(model, lambda: causal_lm_loss(model, **batch, num_items_in_batch=n))
    # Only the order of float32 additions differs: the loss sums non-negative token losses over the
    # labelled positions alone instead of over every position with zeros between them.
    assert_close_to_rounding(new, ref, terms=position_terms(batch), why="sum over labelled positions only")
    assert len(ref_grads) == len(new_grads) > 0
    for a, b in zip(ref_grads, new_grads):
        # The hidden states are the same; the output layer's dot products over hidden_size features run
        # on the labelled rows alone, which a kernel may group otherwise; the rest of the backward is shared.
        assert_close_to_rounding(b, a, terms=tiny.config.hidden_size, why="output layer on fewer rows")


def test_causal_lm_loss_through_a_peft_model(tiny):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(tiny), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    batch = padded_batch(tiny.config.vocab_size, torch.Generator().manual_seed(2))
    ref = model(**batch).loss
    assert_close_to_rounding(causal_lm_loss(model, **batch), ref, terms=position_terms(batch),
                             why="sum over labelled positions only")  # as above


def test_labelled_positions_are_those_before_a_label():
    labels = torch.tensor([[IGNORE, 5, 6, IGNORE, 7], [IGNORE, IGNORE, IGNORE, 8, IGNORE]])
    assert labelled_positions(labels).tolist() == [[True, True, False, True, False],
                                                   [False, False, True, False, False]]


def test_a_batch_without_labels_is_refused(tiny):
    batch = padded_batch(tiny.config.vocab_size, torch.Generator().manual_seed(3))
    batch["labels"].fill_(IGNORE)
    with pytest.raises(ValueError, match="without a labelled token"):
        causal_lm_loss(tiny, **batch)


# --------------------------------------------------------------------------- #
# 4-bit quantization: qlora_lab.fast.nearest, .decode and .nf4 against the
# readable definitions in qlora_lab.quant.blockwise and qlora_lab.quant.nf4, bit for bit
# --------------------------------------------------------------------------- #
import threading  # noqa: E402

from qlora_lab.fast import decode as fast_decode  # noqa: E402
from qlora_lab.fast import nf4 as fast_nf4  # noqa: E402
from qlora_lab.fast.nearest import nearest_code_table  # noqa: E402
from qlora_lab.quant import blockwise, codes, nf4  # noqa: E402

CODES = {"nf4": codes.normal_float_code(4), "fp4": codes.fp4_code(), "int4": codes.int4_code(),
         "nf3": codes.normal_float_code(3), "nf2": codes.normal_float_code(2),
         "nf4sym": codes.normal_float_code(4, symmetric=True), "fp3": codes.float_code(2, 0), "int3": codes.integer_code(3)}
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def adversarial_values(code: torch.Tensor) -> torch.Tensor:
    """Random values and the awkward ones: every threshold and the floats a few
    ulps either side of it, the edges of the table's 65,536 cells, +-0,
    subnormals, +-1 and just beyond, +-inf."""
    t = blockwise.code_thresholds(code)
    near = (t.view(torch.int32)[:, None] + torch.arange(-3, 4, dtype=torch.int32)).view(torch.float32).reshape(-1)
    near = near[~near.isnan()]
    cell_edges = torch.arange(-32768, 32768, dtype=torch.int32) << 16
    cell_edges = torch.cat([cell_edges, cell_edges | 0xFFFF]).view(torch.float32)
    cell_edges = cell_edges[~cell_edges.isnan()]
    special = torch.tensor([-1.0, 1.0, 0.0, -0.0, 1e-45, -1e-45, 1.0000001, -1.0000001, float("inf"), -float("inf")])
    return torch.cat([torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1, near,
                      cell_edges, t, special])


@pytest.mark.parametrize("name", list(CODES))
def test_nearest_code_table_equals_nearest_code(name):
    code = CODES[name]
    table = nearest_code_table(code)
    assert table.exact_lookup
    values = adversarial_values(code)
    expected = blockwise.nearest_code(values, code)
    assert torch.equal(table(values), expected)
    assert torch.equal(table(values[::2]), expected[::2])  # non-contiguous input


def test_nearest_code_table_falls_back_to_bucketize_for_a_dense_code():
    code = torch.cat([torch.linspace(-1, 1, 9), torch.tensor([0.501, 0.502])])  # thresholds 0.5005, 0.5015
    table = nearest_code_table(code)
    assert not table.exact_lookup
    values = adversarial_values(code)
    assert torch.equal(table(values), blockwise.nearest_code(values, code))


def awkward_tensors(dtype):
    """Odd sizes, all-zero blocks (full and partial), -0.0, values on the
    thresholds, tiny (subnormal) and huge absmax."""
    g = torch.Generator().manual_seed(1)
    nf4_thresholds = blockwise.code_thresholds(codes.normal_float_code())
    yield torch.randn(3, 333, generator=g)
    yield torch.randn(1, generator=g)
    yield torch.randn(4097, generator=g) * 1e4
    yield torch.randn(5, 2459, generator=g)  # 3 x 4096 + 7 values
    yield torch.cat([torch.zeros(128), torch.randn(100, generator=g), torch.zeros(30)])
    yield torch.cat([-torch.zeros(64), torch.randn(64, generator=g)])
    yield torch.cat([torch.tensor([1.0]), nf4_thresholds, -nf4_thresholds, torch.zeros(33)])
    yield torch.randn(2, 5, 7, generator=g) * torch.finfo(dtype).tiny * 8
    yield torch.randn(1000, generator=g).clamp(-4, 4) * (torch.finfo(dtype).max / 4)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("quant_type", nf4.QUANT_TYPES)
@pytest.mark.parametrize("chunk", ["default", 4096])
def test_fast_quantize_and_dequantize_equal_the_definitions(dtype, quant_type, chunk, monkeypatch):
    """With quantization in steps of 4096 values as well: steps start on block
    boundaries, the last one may end inside a block or on an odd value."""
    if chunk != "default":
        monkeypatch.setattr(fast_nf4, "QUANTIZE_CHUNK", chunk)
    for blocksize in (32, 64, 4096):
        for x in awkward_tensors(dtype):
            x = x.to(dtype)
            for double_quant in (False, True):
                packed, state = nf4.quantize_4bit(x, blocksize, quant_type, double_quant)
                fast_packed, fast_state = fast_nf4.quantize_4bit(x, blocksize, quant_type, double_quant)
                assert torch.equal(fast_packed, packed)
                assert torch.equal(fast_state.block_absmax(), state.block_absmax())
                assert torch.equal(fast_nf4.absmax_4bit(x, blocksize), nf4.absmax_4bit(x, blocksize))
                values = nf4.dequantize_4bit(packed, state)
                fast_values = fast_nf4.dequantize_4bit(packed, state)
                assert fast_values.dtype == values.dtype and fast_values.shape == values.shape
                assert torch.equal(fast_values.view(torch.uint8), values.view(torch.uint8))  # the bits, -0.0 too
                reused = torch.full(state.shape, float("nan"), dtype=state.dtype)
                written = fast_nf4.dequantize_4bit(packed, state, out=reused)
                assert written.data_ptr() == reused.data_ptr()  # into the given buffer (odd sizes too)
                assert torch.equal(reused.view(torch.uint8), values.view(torch.uint8))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_fast_scaling_equals_the_definition(dtype):
    for x in awkward_tensors(dtype):
        x = x.to(dtype)
        for blocksize in (32, 64, 4096):
            absmax = nf4.absmax_4bit(x, blocksize)
            expected = blockwise.scale_blocks(x, absmax, blocksize, divide_partial_block=True)
            assert torch.equal(fast_nf4.scale_4bit(x, absmax, blocksize), expected)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("threads", [1, 3])
def test_decode_in_pieces_and_threads_equals_the_definition(dtype, threads, monkeypatch):
    """Large tensors are decoded piece by piece, split between threads; with
    tiny pieces and every tensor split, nothing may change (pieces start on
    block boundaries)."""
    g = torch.Generator().manual_seed(11)
    shapes = [((37, 45), 64), ((4097,), 32), ((3, 1000), 256), ((5, 999), 4096), ((64, 301), 128)]
    saved_threads = torch.get_num_threads()
    try:
        for shape, blocksize in shapes:
            x = torch.randn(shape, generator=g).to(dtype)
            packed, state = nf4.quantize_4bit(x, blocksize=blocksize, double_quant=blocksize == 32)
            reference = nf4.dequantize_4bit(packed, state)
            monkeypatch.setattr(fast_decode, "DECODE_CHUNK", 2048)
            monkeypatch.setattr(fast_decode, "PARALLEL_MIN_BYTES", 1)
            torch.set_num_threads(threads)
            pieces = fast_nf4.dequantize_4bit(packed, state)
            torch.set_num_threads(saved_threads)
            monkeypatch.undo()
            assert torch.equal(pieces, reference)
    finally:
        torch.set_num_threads(saved_threads)


REAL_DECODE_RANGE = fast_decode.decode_range


@pytest.fixture
def split_decode(monkeypatch):
    """A small tensor whose decode is split between two Python threads (two
    PyTorch threads, tiny steps); PyTorch's thread count is put back after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(fast_decode, "DECODE_CHUNK", 1024)
    monkeypatch.setattr(fast_decode, "PARALLEL_MIN_BYTES", 1)
    yield nf4.quantize_4bit(torch.randn(64, 128))
    torch.set_num_threads(saved)


def failing_decode(in_caller: bool, message: str):
    """``decode_range`` that raises in the calling thread or in the helpers."""
    def decode(*args):
        if (threading.current_thread() is threading.main_thread()) == in_caller:
            raise RuntimeError(message)
        REAL_DECODE_RANGE(*args)
    return decode


def test_decode_reports_an_error_raised_in_a_helper_thread(monkeypatch, split_decode):
    """An exception inside a helper thread reaches the caller (it is not lost
    with the thread), and PyTorch's thread count is restored."""
    packed, state = split_decode
    monkeypatch.setattr(fast_decode, "decode_range", failing_decode(in_caller=False, message="helper failed"))
    with pytest.raises(RuntimeError, match="helper failed"):
        fast_nf4.dequantize_4bit(packed, state)
    assert torch.get_num_threads() == 2


def test_decode_runs_one_openmp_thread_while_python_threads_decode(monkeypatch, split_decode):
    """The Python threads are the parallelism: each decodes with one OpenMP
    thread, and the count comes back afterwards, also when the calling
    thread's part fails."""
    packed, state = split_decode
    seen = []

    def recording(*args):
        seen.append(torch.get_num_threads())
        REAL_DECODE_RANGE(*args)

    monkeypatch.setattr(fast_decode, "decode_range", recording)
    assert torch.equal(fast_nf4.dequantize_4bit(packed, state), nf4.dequantize_4bit(packed, state))
    assert seen == [1, 1] and torch.get_num_threads() == 2

    monkeypatch.setattr(fast_decode, "decode_range", failing_decode(in_caller=True, message="caller failed"))
    with pytest.raises(RuntimeError, match="caller failed"):
        fast_nf4.dequantize_4bit(packed, state)
    assert torch.get_num_threads() == 2


def test_byte_pair_table_holds_both_nibbles():
    code = codes.normal_float_code()
    pairs = fast_decode.byte_pair_table(code).view(torch.float32).view(256, 2)
    byte = torch.arange(256)
    assert torch.equal(pairs[:, 0], code[byte >> 4]) and torch.equal(pairs[:, 1], code[byte & 0xF])
    # the GPU's table, built where the code is without a copy to the host: the same bits
    # (here on the meta device, which has no memory, for the no-host-copy part, and on the CPU for the bits)
    assert torch.equal(fast_decode.device_byte_pair_table(code), fast_decode.byte_pair_table(code))
    assert fast_decode.device_byte_pair_table(code.to("meta")).device.type == "meta"


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_fake_quantization_round_trip_equals_the_definitions(dtype):
    """qlora_lab.quant.fake_quant runs the fast path; it must give the definitions' values."""
    from qlora_lab.quant import fake_quant

    for x in awkward_tensors(dtype):
        x = x.to(dtype)
        for quant_type, double_quant in (("nf4", False), ("fp4", True), ("int4", False)):
            expected = nf4.dequantize_4bit(*nf4.quantize_4bit(x, 64, quant_type, double_quant))
            got = fake_quant.round_trip(x, quant_type, 64, double_quant)
            assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
        for code in (CODES["nf3"], CODES["int3"], codes.normal_float_code(2)):
            for blocksize in (64, 100):
                expected = blockwise.dequantize_blockwise(*blockwise.quantize_blockwise(x, code, blocksize), code,
                                                          blocksize, x.shape, x.dtype)
                got = fake_quant.round_trip(x, blocksize=blocksize, code=code)
                assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))


# --------------------------------------------------------------------------- #
# qlora_lab.fast.lora: the scaled LoRA update added in one pass
# --------------------------------------------------------------------------- #
def reference_add(result, update, scaling):
    """peft's lora.Linear.forward, last line."""
    return result + update * scaling


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (NaN equals NaN, -0.0 differs from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


SCALINGS = [2.0, 1.0, 0.5, 0.25, 16 / 64, 32 / 16, 16 / 24, 0.3, 3.0]  # powers of two and not


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_add_scaled_update_equals_pefts_two_operations_on_random_inputs(dtype, scaling):
    from qlora_lab.fast.lora import add_scaled_update

    generator = torch.Generator().manual_seed(7)
    for shape, magnitude in [((33, 70), 1.0), ((4, 9, 128), 1e-3), ((1, 5), 1e4)]:
        result = (torch.randn(shape, generator=generator) * magnitude).to(dtype)
        update = (torch.randn(shape, generator=generator) * magnitude).to(dtype)
        assert same_bits(add_scaled_update(result, update, scaling), reference_add(result, update, scaling))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scaling", [2.0, 0.25, 0.3])
def test_add_scaled_update_on_adversarial_inputs(dtype, scaling):
    """Signed zeros, exact cancellation, infinities and NaN, ties in the last
    bit, values at the edges of the range where the product stays normal, and
    float16 subnormals (where the fused add would round differently, so it is
    not used)."""
    from qlora_lab.fast.lora import add_scaled_update

    info = torch.finfo(dtype)
    tiny, huge, eps = info.tiny, info.max, info.eps
    inf, nan = float("inf"), float("nan")
    lo = tiny / min(scaling, 1.0) * 4  # the smallest magnitude whose product is still normal
    hi = huge / max(scaling, 1.0) / 4  # the largest whose product cannot overflow
    result = torch.tensor([0.0, -0.0, 0.0, -0.0, 1.0, 1.0, 1.0 + eps, -lo, lo, hi, -hi, inf, -inf, nan, 1.0, 3.0,
                           info.max, -1.0], dtype=torch.float64)
    update = torch.tensor([0.0, -0.0, -0.0, 0.0, -1.0 / scaling, eps / 2 / scaling, eps / 2 / scaling, lo, lo, -hi,
                           hi, 1.0, 1.0, 1.0, inf, nan, -hi, 1.0 / scaling], dtype=torch.float64)
    result, update = result.to(dtype), update.to(dtype)
    assert same_bits(add_scaled_update(result, update, scaling), reference_add(result, update, scaling))
    if dtype == torch.float16:
        # float16 subnormals; the last pair is a tie that a rounded product could break the other way
        sub = torch.tensor([6.0e-8, 1.8e-7, 3.0e-5, -5.9e-8, 2.0**-23], dtype=dtype)
        base = torch.tensor([0.0, 6.2e-5, -6.2e-5, 1.3e-4, 2.0**-14 + 2.0**-24], dtype=dtype)
        assert same_bits(add_scaled_update(base, sub, scaling), reference_add(base, sub, scaling))


def test_add_scaled_update_with_mixed_dtypes_promotes_as_the_reference_does():
    from qlora_lab.fast.lora import add_scaled_update

    generator = torch.Generator().manual_seed(8)
    for result_dtype, update_dtype in [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                       (torch.float16, torch.float32)]:
        result = torch.randn(16, 40, generator=generator).to(result_dtype)
        update = torch.randn(16, 40, generator=generator).to(update_dtype)
        for scaling in (2.0, 0.25, 0.3):
            assert same_bits(add_scaled_update(result, update, scaling), reference_add(result, update, scaling))


def test_lora_linear_trains_with_the_fast_add():
    import qlora_lab.fast.lora
    import qlora_lab.lora.layer

    assert qlora_lab.lora.layer.add_scaled_update is qlora_lab.fast.lora.add_scaled_update


def test_an_output_buffer_that_does_not_fit_is_refused_with_what_to_allocate():
    packed, state = nf4.quantize_4bit(torch.randn(8, 64))
    for wrong, says in ((torch.empty(8, 63), "of 512 values"), (torch.empty(8, 64, dtype=torch.float16), "float32"),
                        (torch.empty(64, 8).t(), "non-contiguous")):
        with pytest.raises(ValueError, match=says) as error:
            fast_nf4.dequantize_4bit(packed, state, out=wrong)
        assert "torch.empty(state.shape" in str(error.value)
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        fast_nf4.dequantize_4bit(packed, state, out=[0.0] * 512)
