"""Nothing is unpickled from a file a user could have been handed.

A pickle names functions to call while it is read, so loading one runs
whatever its author chose. Every ``torch.load`` in the package, the benchmarks
and the notebooks passes ``weights_only=True`` (tensors and plain data only),
nothing calls ``pickle.load`` or ``numpy.load(allow_pickle=True)``, and a
checkpoint that holds a pickled object is refused before its code can run.
"""

import ast
import json
import os
from pathlib import Path

import pytest
import torch

from qlora_lab.support.resume import load_training_state

ROOT = Path(__file__).resolve().parents[2]


def python_sources() -> dict[str, str]:
    """Every Python source of the package and the benchmarks, and every notebook's code, by name."""
    sources = {}
    for folder in ("qlora_lab", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            sources[str(path.relative_to(ROOT))] = path.read_text()
    for path in sorted((ROOT / "notebooks").rglob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        # IPython's magics (%time, !pip) are not Python: blank them out, keeping the line numbers
        lines = [("" if line.lstrip().startswith(("%", "!")) else line) for line in "\n\n".join(code).splitlines()]
        sources[str(path.relative_to(ROOT))] = "\n".join(lines)
    return sources


def calls(tree: ast.AST, module: str, function: str):
    """The calls ``module.function(...)`` in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == function:
            if isinstance(node.func.value, ast.Name) and node.func.value.id == module:
                yield node


def keyword(call: ast.Call, name: str):
    found = [k.value for k in call.keywords if k.arg == name]
    return found[0] if found else None


SOURCES = python_sources()


def test_the_scan_sees_the_package_and_its_torch_loads():
    assert len(SOURCES) > 60 and "qlora_lab/support/resume.py" in SOURCES
    found = [name for name, text in SOURCES.items() if list(calls(ast.parse(text), "torch", "load"))]
    assert "qlora_lab/support/resume.py" in found  # a scan that found nothing would prove nothing


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_torch_load_reads_weights_only(name):
    tree = ast.parse(SOURCES[name])
    for call in calls(tree, "torch", "load"):
        value = keyword(call, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, (
            f"{name}:{call.lineno}: torch.load without weights_only=True can run code from the file")
    for call in list(calls(tree, "pickle", "load")) + list(calls(tree, "pickle", "loads")):
        raise AssertionError(f"{name}:{call.lineno}: pickle.load runs code from the file; store tensors "
                             f"(safetensors, torch.save of plain data) or JSON instead")
    for call in list(calls(tree, "np", "load")) + list(calls(tree, "numpy", "load")):
        value = keyword(call, "allow_pickle")
        assert not (isinstance(value, ast.Constant) and value.value is True), f"{name}:{call.lineno}: allow_pickle"


def test_the_scan_would_catch_a_bare_torch_load():
    bad = ast.parse("state = torch.load(path)\nother = torch.load(path, weights_only=False)\n")
    assert [keyword(c, "weights_only") for c in calls(bad, "torch", "load")][0] is None
    assert keyword(list(calls(bad, "torch", "load"))[1], "weights_only").value is False


class _RunsCode:
    """Pickled, this object tells the loader to call os.mkdir(marker)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_training_state_holding_a_pickled_object_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "code-ran"
    state = tmp_path / "training_state.pt"
    torch.save({"optimizer": {}, "scheduler": {}, "rng": {"python": _RunsCode(marker)}}, state)
    with pytest.raises(ValueError, match=r"training_state\.pt holds Python objects besides tensors and plain data, "
                                         r"which could run code while loading, so it was refused") as refused:
        load_training_state(state)
    assert "Traceback" not in str(refused.value) and "Unsupported global" not in str(refused.value)
    assert not marker.exists()
    torch.load(state, weights_only=False)  # what weights_only=True prevents: the file's code runs
    assert marker.is_dir()
