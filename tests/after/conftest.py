"""Fixtures of chapter 08's tests."""

import pytest


@pytest.fixture
def narrower_base(tmp_path):
    """A tiny Llama 64 wide with the tiny chat tokenizer, saved: a base that the
    adapters trained on the 128-wide tiny model do not fit."""
    from qlora_lab.models import tiny_llama
    from qlora_lab.models.tiny import tiny_chat_tokenizer

    directory = tmp_path / "other"
    tokenizer = tiny_chat_tokenizer()
    tiny_llama(vocab_size=len(tokenizer), hidden_size=64).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
