"""Shared fixtures (the real model is loaded once per test session) and the
``slow`` tier: a test that loads SmolLM2 is marked ``slow``, so that
``make unit-fast`` (``pytest -m "not slow"``) runs everything else in a few minutes.

A test that asks for the ``smollm2`` fixture (directly or through another
fixture) is marked automatically.
"""

import tempfile
from pathlib import Path

import pytest
import torch

import qlora_lab  # noqa: F401  (quiets bitsandbytes' import-time warning)

# the shared assertions in tests/exercise_feedback.py fail with pytest's detailed messages
pytest.register_assert_rewrite("exercise_feedback")


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


@pytest.fixture
def tiny():
    """A fresh tiny Llama (about 300k parameters), the same weights every time."""
    from qlora_lab.models import tiny_llama

    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A small copy of the course data set (train 48, validation 8 records), for
    training runs in tests/test_train.py and tests/test_backends.py."""
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


def pytest_collection_finish(session):
    """Start the pinned-set resolutions of tests/test_python_versions.py as soon as the
    tests are known: they wait on PyPI, not on the CPU, so the other tests run meanwhile."""
    if any(item.nodeid.startswith("tests/test_python_versions.py::test_every_pin") for item in session.items):
        from wheel_resolution import RESOLUTIONS, AllResolutions

        root = Path(tempfile.mkdtemp(prefix="qlora-lab-resolve-"))
        session.config.stash[RESOLUTIONS] = AllResolutions(root)
