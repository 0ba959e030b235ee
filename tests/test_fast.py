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
