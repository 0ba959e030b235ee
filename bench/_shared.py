"""What the benchmark scripts share: argument types, the machine's description,
free memory, and how a script starts its measuring worker (the protocol itself
is :mod:`qlora_lab.support.measure`).

Not a benchmark itself; ``bench/train_step.py``, ``bench/seven_b.py`` and
``bench/run_all.py`` import it (they run as scripts, so ``bench/`` is on
``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import qlora_lab  # noqa: F401  (before bitsandbytes, which machine() imports: silences a CPU-dependent warning)

GB = 1e9
MB = 1e6


def human_bytes(n: float) -> str:
    """``"5.78 GB"`` from a gigabyte up, ``"412.3 MB"`` below (decimal units)."""
    return f"{n / GB:.2f} GB" if abs(n) >= GB else f"{n / MB:.1f} MB"


def _int_at_least(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def paired_ratios(ours: list[float], theirs: list[float]) -> list[float]:
    """``theirs[i] / ours[i]`` for times taken in turn (above 1: ours was
    faster in that pair). A change in the machine's load hits both sides of a
    pair alike, so the median of these is the ratio the benchmarks report."""
    return [t / o for o, t in zip(ours, theirs, strict=True)]


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. ``"0.12, 0.30, 0.41"``."""
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def available_bytes() -> int:
    """Memory the kernel says a new process can use without swapping
    (``MemAvailable``)."""
    import psutil

    return psutil.virtual_memory().available


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the numbers depend on: CPU, cores, memory, library versions."""
    import psutil
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes", "qlora_lab"):  # qlora_lab is imported already
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_gb": round(psutil.virtual_memory().total / GB, 1),
        "os": f"{platform.system()} {platform.release()}",
        "versions": versions,
    }


def run_worker(script: Path, spec: dict, threads: int | None, timeout: float) -> dict:
    """Run ``script --worker SPEC`` in a fresh interpreter with the course's
    one worker protocol (:func:`qlora_lab.support.measure.run_worker`: the
    measuring environment, one result line), echo its progress, and return
    the JSON it reports. Raises RuntimeError if it fails."""
    from qlora_lab.support.measure import run_worker as run

    return run([sys.executable, str(script), "--worker", json.dumps(spec)], threads=threads, timeout=timeout,
               echo=True, what=f"{spec.get('variant', Path(script).stem)} measuring")


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
