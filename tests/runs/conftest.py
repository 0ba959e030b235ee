"""Fixtures of the runners' tests: SmolLM2 swapped for the tiny chat model, so that
each runner's whole path (train, score, write its results) runs in seconds."""

import pytest


@pytest.fixture
def tiny_smollm2(monkeypatch):
    """``qlora_lab.models.load_smollm2`` replaced by a loader of a tiny Llama (128
    wide, 2 layers) with the tiny ChatML tokenizer: the runners import the loader
    when they run, so they get the tiny model. Returns the loader."""
    import qlora_lab.models
    from qlora_lab.models import tiny_llama
    from qlora_lab.models.tiny import tiny_chat_tokenizer

    def load(dtype=None, rebuild_cache=False):
        tokenizer = tiny_chat_tokenizer()
        model = tiny_llama(seed=0, vocab_size=len(tokenizer), hidden_size=128)
        model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
        return model, tokenizer

    monkeypatch.setattr(qlora_lab.models, "load_smollm2", load)
    return load
