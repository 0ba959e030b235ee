"""Peak memory of a fresh process: the measuring machinery behind chapter 03's
check of the memory estimate, ``bench/train_step.py``, ``bench/seven_b.py``
and the checkpoint-loading measurement.

Plumbing, not course material. A number of resident bytes only means
something if nothing else lives in the process, so every measurement runs in
a new Python interpreter, a *worker*, that follows one protocol:

* its environment is :func:`measurement_env` (glibc hands every freed block
  above 64 KiB back to the kernel, so the resident set follows live tensors;
  optionally a fixed number of OpenMP threads);
* it prints its result as one line, :data:`RESULT_PREFIX` followed by JSON
  (:func:`report`); everything else it prints is progress;
* the parent (:func:`run_worker`) echoes the progress if asked, returns the
  JSON, and on a failure raises ``RuntimeError`` with the end of the worker's
  stderr.

A worker is either a function of the package, run by
:func:`measure_in_fresh_process` as ``python -m qlora_lab.support.measure
module:function SPEC``, or a script with a ``--worker SPEC`` mode (the
benchmarks). Inside it, :class:`PeakTracker` reads the kernel's high-water
mark of the resident set, :func:`release_freed_memory` returns freed pages
first, and :func:`own_parameter_memory` detaches parameters from
memory-mapped weight files.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

RESULT_PREFIX = "QLORA_LAB_RESULT "
"""A worker prints its result as one JSON line after this prefix."""

MEASUREMENT_ENV = {
    # Fixed mmap threshold: every block above 64 KiB is mmapped and handed back
    # to the kernel when freed, so the resident set size follows live tensors
    # instead of keeping freed heap pages. (glibc otherwise raises the
    # threshold as large blocks are freed and serves them from the heap.)
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
}
"""Environment variables every measuring process gets."""


def measurement_env(threads: int | None = None) -> dict[str, str]:
    """This process's environment plus :data:`MEASUREMENT_ENV`, and
    ``OMP_NUM_THREADS`` when ``threads`` is given."""
    env = {**os.environ, **MEASUREMENT_ENV}
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads <= 0:
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        env["OMP_NUM_THREADS"] = str(threads)
    return env


# --------------------------------------------------------------------------- #
# Inside the worker
# --------------------------------------------------------------------------- #
def resident_bytes(field: str = "VmRSS") -> int:
    """A field of ``/proc/self/status`` in bytes: ``VmRSS`` (resident now) or
    ``VmHWM`` (the high-water mark). Linux only."""
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1)) * 1024


def release_freed_memory() -> None:
    """Collect garbage and ask glibc to hand freed heap pages back to the
    kernel (``malloc_trim``), so that the resident set shows live memory."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakTracker:
    """Peak resident set from the kernel's high-water mark (Linux: reset by
    writing 5 to /proc/self/clear_refs), or from polling with psutil every
    millisecond where that is not available (a spike shorter than a
    millisecond can then be missed).

    ``with tracker: ...`` sets ``tracker.peak`` (bytes, the whole process);
    ``tracker.current()`` is the resident set now; ``tracker.how`` says which
    of the two ways it measures."""

    def __init__(self):
        self.kernel = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kernel = True
        except OSError:
            pass
        self.how = "kernel high-water mark (VmHWM after clear_refs)" if self.kernel else "psutil polling every 1 ms"
        self.peak: int | None = None

    def current(self) -> int:
        if self.kernel:
            return resident_bytes("VmRSS")
        import psutil

        return psutil.Process().memory_info().rss

    def __enter__(self):
        if self.kernel:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            import psutil

            self._process = psutil.Process()
            self._max = self._process.memory_info().rss
            self._stop = threading.Event()

            def poll():
                while not self._stop.is_set():
                    self._max = max(self._max, self._process.memory_info().rss)
                    time.sleep(0.001)

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.kernel:
            self.peak = resident_bytes("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self.current())
        return False


def own_parameter_memory(model) -> None:
    """Give every plain parameter its own memory.

    transformers loads float32 weights from a safetensors file as views of
    the memory-mapped file when no conversion is needed (for example the fp32
    embedding and norms of a 4-bit model). The mapping then stays alive,
    and every page of the file that loading touched counts in the resident
    set: 415 MB of SmolLM2's 538 MB file, for a 113 MB embedding. A copy
    releases it."""
    import torch

    seen = set()
    for p in model.parameters():
        if type(p) is torch.nn.Parameter and id(p) not in seen:
            seen.add(id(p))
            p.data = p.data.clone()
    release_freed_memory()


def report(result: dict) -> None:
    """Print a worker's result for the parent process to read."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def import_function(spec: str) -> Callable:
    """The function named by ``"package.module:function"``."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"expected 'package.module:function', got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {spec!r}: {err}") from None


# --------------------------------------------------------------------------- #
# The parent
# --------------------------------------------------------------------------- #
def run_worker(command: list[str], *, threads: int | None = None, timeout: float = 600.0, echo: bool = False,
               what: str = "measuring") -> dict:
    """Run ``command`` (a worker) in :func:`measurement_env` and return the
    JSON it reports. With ``echo`` its other output is printed as it comes
    (the progress of a long build). Raises ``RuntimeError`` when it fails,
    reports nothing, or runs longer than ``timeout`` seconds."""
    result = None
    with tempfile.TemporaryFile(mode="w+") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   env=measurement_env(threads))
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        try:
            for line in process.stdout:
                if line.startswith(RESULT_PREFIX):
                    result = json.loads(line[len(RESULT_PREFIX):])
                elif echo:
                    print(line, end="", flush=True)
            code = process.wait()
        finally:
            timed_out = not timer.is_alive()
            timer.cancel()
        if timed_out:
            raise RuntimeError(f"the {what} process took longer than {timeout:.0f} s and was stopped; "
                               f"use smaller sizes or a longer timeout")
        if code != 0 or result is None:
            stderr.seek(0)
            tail = "\n".join(stderr.read().strip().splitlines()[-20:])
            raise RuntimeError(f"the {what} process failed (exit code {code}):\n{tail}")
    return result


def measure_in_fresh_process(function: str, spec: dict, *, threads: int | None = None, timeout: float = 600.0,
                             echo: bool = False, what: str = "measuring") -> dict:
    """Call ``function`` (``"package.module:function"``, taking one dict and
    returning a JSON-able dict) with ``spec`` in a new Python interpreter
    and return what it returns: :func:`run_worker` on this module's entry
    point."""
    import_function(function)  # a clear error here rather than in the worker
    command = [sys.executable, "-m", "qlora_lab.support.measure", function, json.dumps(spec)]
    return run_worker(command, threads=threads, timeout=timeout, echo=echo, what=what)


def worker_environment(spec: dict) -> dict:
    """What a worker sees: its spec echoed back, its measuring environment and
    its resident set after the imports (a check of the protocol itself)."""
    return {"spec": spec, "environment": {name: os.environ.get(name) for name in MEASUREMENT_ENV},
            "omp_threads": os.environ.get("OMP_NUM_THREADS"), "resident_bytes": PeakTracker().current()}


def main(argv: list[str] | None = None) -> int:
    """``python -m qlora_lab.support.measure module:function SPEC_JSON``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m qlora_lab.support.measure package.module:function SPEC_JSON", file=sys.stderr)
        return 2
    report(import_function(argv[0])(json.loads(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
