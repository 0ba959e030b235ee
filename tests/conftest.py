"""Shared fixtures (the real model is loaded once per test session) and the
``slow`` tier: a test that loads SmolLM2 is marked ``slow``, so that
``make unit-fast`` (``pytest -m "not slow"``) runs everything else in a few minutes.

A test that asks for the ``smollm2`` fixture (directly or through another
fixture) is marked automatically; one that loads SmolLM2's weights another way
(``model="smollm2"`` in a run) carries ``@pytest.mark.slow`` itself, and an
unmarked test that tries fails with the mark to add (``_slow_tier_guard``).
Borrowing SmolLM2's tokenizer (tiny-llama does) is not loading the model.
"""

import pytest
import torch

import qlora_lab  # noqa: F401  (quiets bitsandbytes' import-time warning)


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct in float32, shared by the
    whole session: tests must not modify it (deep-copy it first)."""
    from qlora_lab.models import load_smollm2

    return load_smollm2()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _slow_tier_guard(request, monkeypatch):
    """Keeps the fast tier honest: in a test not marked ``slow``, loading
    SmolLM2's weights in this process fails and says which mark to add."""
    if request.node.get_closest_marker("slow"):
        return
    import transformers

    from qlora_lab.models.smollm2 import SMOLLM2_CACHE_NAME

    original = transformers.AutoModelForCausalLM.from_pretrained

    def refuse_smollm2(name_or_path, *args, **kwargs):
        if SMOLLM2_CACHE_NAME in str(name_or_path):
            raise AssertionError(f"{request.node.nodeid} loads SmolLM2 but is not marked slow: "
                                 "add @pytest.mark.slow (make unit-fast leaves those out)")
        return original(name_or_path, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse_smollm2)


@pytest.fixture
def tiny():
    """A fresh tiny Llama (about 300k parameters), the same weights every time."""
    from qlora_lab.models import tiny_llama

    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A small copy of the course data set (train 48, validation 8 records), for
    training runs in tests/finetune/test_train.py and test_backends.py."""
    import json

    from qlora_lab.finetune import data as data_lib

    splits = data_lib.load_dataset(splits=("train", "validation"))
    directory = tmp_path_factory.mktemp("data")
    for name, records in [("train", splits["train"][:48]), ("validation", splits["validation"][:8])]:
        with open(directory / f"{name}.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return directory


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _threads_kept():
    """A test leaves torch's thread count as it found it: the bit-for-bit tests that
    run after it in the same worker compare against subprocesses with one thread,
    and another count groups float sums another way."""
    threads = torch.get_num_threads()
    yield
    changed = torch.get_num_threads()
    torch.set_num_threads(threads)
    assert changed == threads, f"the test changed torch's thread count from {threads} to {changed}; restore it"
