"""Shared fixtures: the real model is loaded once per test session."""

import pytest
import torch

import qlora_lab  # noqa: F401  (quiets bitsandbytes' import-time warning)


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct in float32, shared by the
    whole session: tests must not modify it (deep-copy it first)."""
    from qlora_lab.models import load_smollm2

    return load_smollm2()


@pytest.fixture
def tiny():
    """A fresh tiny Llama (about 300k parameters), the same weights every time."""
    from qlora_lab.models import tiny_llama

    return tiny_llama(seed=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
