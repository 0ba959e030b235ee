"""Every piece of qlora_lab.fast equals the reference it speeds up."""

import copy

import pytest
import torch

from qlora_lab.fast.loss import causal_lm_loss, labelled_positions
from qlora_lab.lora import add_lora

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
    # Only the order of float32 additions differs (the loss is summed over the
    # labelled positions alone instead of over every position with zeros between
    # them), hence a tolerance of a few float32 roundings, not equality.
    torch.testing.assert_close(new, ref, rtol=2e-7, atol=0)
    assert len(ref_grads) == len(new_grads) > 0
    for a, b in zip(ref_grads, new_grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_causal_lm_loss_through_a_peft_model(tiny):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(tiny), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    batch = padded_batch(tiny.config.vocab_size, torch.Generator().manual_seed(2))
    ref = model(**batch).loss
    torch.testing.assert_close(causal_lm_loss(model, **batch), ref, rtol=2e-7, atol=0)


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
