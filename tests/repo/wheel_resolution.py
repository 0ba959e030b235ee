"""Resolving the course's pinned set for another Python and platform without
installing it (used by tests/repo/test_python_versions.py, started early by tests/repo/conftest.py).

``uv pip compile`` reads only the metadata PyPI serves beside each wheel, never a wheel
itself. pip's own ``--dry-run --platform`` cannot stand in for it here: pip evaluates
environment markers against the machine it runs on, so asked for macOS it still wants
torch's Linux-only CUDA packages.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def supported_versions() -> list[str]:
    """``["3.11", ...]``: the minor versions pyproject's requires-python admits."""
    spec = SpecifierSet(PROJECT["requires-python"])
    return [f"3.{minor}" for minor in range(40) if spec.contains(f"3.{minor}")]


#: The extra of version ranges for Colab and Kaggle (tests/repo/test_hosted_extra.py): not pins.
HOSTED_EXTRA = "hosted"


def pinned_requirements(project: dict = PROJECT) -> list[str]:
    """Every ``name==version`` line of the project: its dependencies and every extra but the hosted ranges."""
    lines = list(project["dependencies"])
    for name, extra in project.get("optional-dependencies", {}).items():
        if name != HOSTED_EXTRA:
            lines += extra
    return lines


#: (label, uv's --python-platform). torch 2.13.0's macOS wheels need macOS 14
#: (MACOSX_DEPLOYMENT_TARGET below); docs/laptop.md says so.
PLATFORMS = [("linux-x86_64", "x86_64-manylinux_2_28"), ("macos-arm64", "aarch64-apple-darwin")]
MACOS_VERSION = "14.0"


def start_resolution(requirements: list[str], python: str, platform: str, workdir: Path) -> subprocess.Popen:
    """Start ``uv pip compile`` of ``requirements`` for one Python and platform, wheels
    only; the resolved pins go to ``workdir/resolved.txt``."""
    uv = Path(sys.executable).with_name("uv")
    assert uv.exists(), f"uv is missing from the course environment ({uv}): run make test, which installs the pins"
    workdir.mkdir(parents=True, exist_ok=True)
    req = workdir / "requirements.in"
    req.write_text("\n".join(requirements) + "\n")
    env = {**os.environ, "MACOSX_DEPLOYMENT_TARGET": MACOS_VERSION, "UV_NO_PROGRESS": "1"}
    return subprocess.Popen(
        [str(uv), "pip", "compile", str(req), "--python-version", python, "--python-platform", platform,
         "--only-binary", ":all:", "--quiet",
         "--output-file", str(workdir / "resolved.txt")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


class AllResolutions:
    """Every (python, platform) resolution of the pinned set, all started at once: each
    mostly waits for PyPI, so ``tests/repo/conftest.py`` starts them as soon as the tests
    are collected and the other tests run meanwhile."""

    def __init__(self, root: Path):
        self.root = root
        self.processes = {(python, platform): start_resolution(pinned_requirements(), python, platform,
                                                               root / f"{python}-{label}")
                          for python in supported_versions() for label, platform in PLATFORMS}
        self.results: dict = {}

    def get(self, python: str, platform: str) -> tuple[int, str, Path]:
        """``(returncode, stderr, resolved file)`` of one resolution, waiting for it."""
        if (python, platform) not in self.results:
            label = {p: l for l, p in PLATFORMS}[platform]
            code, stderr = finish(self.processes[python, platform])
            self.results[python, platform] = (code, stderr, self.root / f"{python}-{label}" / "resolved.txt")
        return self.results[python, platform]


#: Where conftest.py keeps the resolutions it started, for the tests to read.
RESOLUTIONS = pytest.StashKey[AllResolutions]()
