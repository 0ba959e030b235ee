"""The plumbing under chapters 03 and 06 and bench/: the fresh-process worker
protocol (qlora_lab.support.measure), the byte and parameter counters
(qlora_lab.support.counting), and the rule that bench/ and tests/ use no
private name of another module."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

from qlora_lab.support import counting, measure

ROOT = Path(__file__).resolve().parents[2]


def test_a_worker_reports_through_the_one_protocol():
    result = measure.measure_in_fresh_process("qlora_lab.support.measure:worker_environment", {"x": [1, 2]},
                                              threads=1, timeout=120)
    assert result["spec"] == {"x": [1, 2]}
    assert result["environment"] == measure.MEASUREMENT_ENV
    assert result["omp_threads"] == "1"
    assert result["resident_bytes"] > 10 * 2**20  # a Python process with torch imported


def test_a_failing_worker_raises_with_its_error():
    with pytest.raises(RuntimeError, match="exit code 1"):  # json.loads of a dict: a TypeError in the worker
        measure.measure_in_fresh_process("json:loads", {"not": "a string"}, timeout=120)
    with pytest.raises(ValueError, match="package.module:function"):
        measure.measure_in_fresh_process("no_colon_here", {})
    with pytest.raises(ValueError, match="cannot import"):
        measure.measure_in_fresh_process("qlora_lab.support.measure:no_such_function", {})


def test_a_worker_that_reports_nothing_is_an_error():
    with pytest.raises(RuntimeError, match="failed"):
        measure.run_worker([sys.executable, "-c", "print('no result line')"], timeout=60)


def test_the_tracker_sees_an_allocation():
    tracker = measure.PeakTracker()
    measure.release_freed_memory()
    before = tracker.current()
    with tracker:
        block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
        del block
    assert tracker.peak - before > 48 * 2**20


def test_counters_count_a_tied_weight_once():
    embedding = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    model = torch.nn.Sequential(embedding, head, torch.nn.Linear(4, 3))
    model[2].weight.requires_grad_(False)
    assert counting.parameter_count(model) == 40 + 12 + 3
    assert counting.parameter_count(model, trainable=True) == 40 + 3
    assert counting.parameter_count(model, trainable=False) == 12
    tensors = [embedding.weight, head.weight, model[2].weight, None, torch.empty(0)]
    assert counting.total_bytes(tensors) == (40 + 12) * 4
    half = torch.zeros(8, dtype=torch.float16)
    assert counting.tensor_bytes(half) == 16
    # two views that start at the same address but differ in length are two tensors
    assert counting.total_bytes([half, half[:4]]) == 16 + 8


MODULE_NAMES = {"memory", "paged", "models", "measure", "seven_b", "train_step", "run_all", "quantize",
                "streaming_load", "_shared"}
"""Names under which bench/ and the tests hold a module (the bench scripts are fixtures)."""


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qlora_lab"):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_") \
                and not node.attr.startswith("__") and node.value.id in MODULE_NAMES:
            found.append(f"{node.value.id}.{node.attr}")
    return found


# bench/ and the tests of chapters 03 and 06 and of bench/ (the other test
# files belong to other parts of the package and are checked with them).
CHECKED = [*sorted((ROOT / "bench").glob("*.py")),
           *(ROOT / "tests" / name for name in ("memory/test_memory.py", "paging/test_paged.py", "repo/test_bench.py",
                                                "finetune/test_streaming.py", "support/test_measure.py",
                                                "exercises/test_exercises_ch06.py"))]


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_bench_and_tests_use_no_private_name_of_the_package(path):
    assert _private_imports(path) == []
