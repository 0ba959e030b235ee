"""What the benchmark scripts share: argument types, the machine's description,
free memory, and the fresh-process runner used to measure peak memory.

Not a benchmark itself; ``bench/train_step.py``, ``bench/seven_b.py`` and
``bench/run_all.py`` import it (they run as scripts, so ``bench/`` is on
``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import qlora_lab  # noqa: F401  (before bitsandbytes, which machine() imports: silences a CPU-dependent warning)

RESULT_PREFIX = "QLORA_LAB_BENCH_RESULT "
"""A worker process prints its result as one JSON line after this prefix."""

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


def measurement_env(threads: int | None) -> dict[str, str]:
    """Environment of a measuring process: chapter 03's (glibc returns freed
    blocks above 64 KiB to the kernel, so the resident set follows live
    tensors), and ``OMP_NUM_THREADS`` when ``threads`` is given."""
    from qlora_lab.memory import MEASUREMENT_ENV

    env = {**os.environ, **MEASUREMENT_ENV}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_worker(script: Path, spec: dict, threads: int | None, timeout: float) -> dict:
    """Run ``script --worker SPEC`` in a fresh interpreter, echo what it prints,
    and return the JSON it reports. Raises RuntimeError if it fails."""
    command = [sys.executable, str(script), "--worker", json.dumps(spec)]
    result = None
    with tempfile.TemporaryFile(mode="w+") as stderr:
        # Lines are echoed as they come (progress of a long build), except the result.
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   env=measurement_env(threads))
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        try:
            for line in process.stdout:
                if line.startswith(RESULT_PREFIX):
                    result = json.loads(line[len(RESULT_PREFIX):])
                else:
                    print(line, end="", flush=True)
            code = process.wait()
        finally:
            timed_out = not timer.is_alive()
            timer.cancel()
        if timed_out:
            raise RuntimeError(f"{script.name} worker took longer than {timeout:.0f} s and was stopped; "
                               f"use smaller sizes or a larger --timeout")
        if code != 0 or result is None:
            stderr.seek(0)
            tail = "\n".join(stderr.read().strip().splitlines()[-20:])
            raise RuntimeError(f"the {spec.get('variant', 'measuring')} process failed (exit code {code}):\n{tail}")
    return result


def report(result: dict) -> None:
    """Print a worker's result for the parent process to read."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
