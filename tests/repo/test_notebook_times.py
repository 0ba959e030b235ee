"""bench/notebook_times.py (``make notebook-times``): it times a notebook under the same
nbval run as ``make test`` and reports a failing one as failing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_script():
    sys.path.insert(0, str(BENCH))  # the script imports bench/_shared.py, as it does when run
    try:
        spec = importlib.util.spec_from_file_location("bench_notebook_times", BENCH / "notebook_times.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_budgets_are_the_courses():
    times = load_script()
    assert times.budget(Path("notebooks/07_finetune_7b.ipynb")) == 360
    assert times.budget(Path("notebooks/02_normalfloat.ipynb")) == 180


def test_a_notebook_whose_output_changed_is_reported_failed(tmp_path, capsys):
    times = load_script()
    notebook = tmp_path / "changed.ipynb"
    notebook.write_text(json.dumps({
        "cells": [{"cell_type": "code", "execution_count": 1, "metadata": {}, "source": ["print(6 * 7)"],
                   "outputs": [{"name": "stdout", "output_type": "stream", "text": ["41\n"]}]}],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5}))
    code = times.main([str(notebook), "--json", str(tmp_path / "times.json")])
    assert code == 1
    rows = json.loads((tmp_path / "times.json").read_text())["notebooks"]
    assert len(rows) == 1 and not rows[0]["passed"] and rows[0]["seconds"] > 0
    assert "FAILED" in capsys.readouterr().out


def test_the_table_marks_what_is_over_budget():
    times = load_script()
    text = times.table([{"notebook": "a.ipynb", "seconds": 200.0, "passed": True, "budget": 180, "summary": ""},
                        {"notebook": "b.ipynb", "seconds": 10.0, "passed": True, "budget": 180, "summary": ""}])
    lines = text.splitlines()
    assert lines[1].endswith("OVER BUDGET") and not lines[2].endswith("OVER BUDGET")
    assert lines[-1].split()[-1] == "210.0s"
