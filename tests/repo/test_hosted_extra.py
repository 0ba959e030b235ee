"""pyproject.toml's ``hosted`` extra: the version ranges the install cell of chapters 00-07 gives pip
on Colab and Kaggle, where the course itself goes in with ``--no-deps``. A range keeps the runtime's
own torch when it falls inside; these tests check that every range holds the course's pin and that the
whole set installs from wheels next to the torch a hosted runtime has (the same ``uv pip compile``
as tests/repo/test_python_versions.py, against PyPI)."""

from __future__ import annotations

import re

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from wheel_resolution import HOSTED_EXTRA, PROJECT, finish, start_resolution

HOSTED = [Requirement(r) for r in PROJECT["optional-dependencies"][HOSTED_EXTRA]]
#: What the chapters import beyond the runtime dependencies: the explorers' widgets (course extra).
FROM_THE_COURSE_EXTRA = {"ipywidgets"}
PINS = [Requirement(r) for r in PROJECT["dependencies"]] + [
    r for r in map(Requirement, PROJECT["optional-dependencies"]["course"]) if r.name in FROM_THE_COURSE_EXTRA]

#: The torch of the hosted runtimes, looked up on 2026-12-07 in the upgrade issues PyTorch opens on
#: googlecolab/colabtools: #5801 (2.10.0) is closed, #5982 (2.12.1, opened 2026-05-13, Colab's team
#: on it in May and June), #6053 (2.13.0) and #6093 (2.14.0) are open. So Colab has 2.10 or, once
#: #5982 lands, 2.12.1; nothing was found for Kaggle. 2.15.0 is PyPI's newest torch today: the most
#: a runtime can have. The range's lower bound is resolved as well (HOSTED_TORCH below).
RUNTIME_TORCH = ["2.10.0", "2.12.1", "2.15.0"]
#: The hosted runtimes' Python: Colab's and Kaggle's images run 3.11 or 3.12 (not re-checked today).
HOSTED_PYTHONS = ["3.11", "3.12"]
PLATFORM = "x86_64-manylinux_2_28"  # what wheel_resolution.PLATFORMS names linux-x86_64


def hosted_range(name: str) -> Requirement:
    found = [r for r in HOSTED if r.name == name]
    assert len(found) == 1, f"the hosted extra names {name} {len(found)} times"
    return found[0]


def lower_bound(requirement: Requirement) -> str:
    (version,) = [s.version for s in requirement.specifier if s.operator == ">="]
    return version


#: RUNTIME_TORCH and the range's lower bound, once each (2.10 is 2.10.0).
HOSTED_TORCH = [str(v) for v in sorted({Version(v) for v in [*RUNTIME_TORCH, lower_bound(hosted_range("torch"))]})]


def test_every_pin_is_inside_its_range():
    """The install cell installs the course with --no-deps: every dependency must be in the extra,
    as a range (a pin would replace the runtime's torch) that holds the version the course pins."""
    assert sorted(r.name for r in HOSTED) == sorted(r.name for r in PINS), "the hosted extra and the pins differ"
    for pin in PINS:
        (version,) = [s.version for s in pin.specifier]
        wanted = hosted_range(pin.name)
        assert not any(s.operator in ("==", "===") for s in wanted.specifier), f"{wanted} is a pin, not a range"
        assert wanted.specifier.contains(version), f"the hosted range {wanted} leaves out the course's {pin}"
    for version in RUNTIME_TORCH:
        assert hosted_range("torch").specifier.contains(version), f"torch {version} of a hosted runtime is out of range"


@pytest.fixture(scope="module")
def resolutions(tmp_path_factory):
    """Every (torch, python) resolution of the hosted set, started at once (each waits on PyPI)."""
    root = tmp_path_factory.mktemp("hosted")
    requirements = [str(r) for r in HOSTED if r.name != "torch"]
    started = {(torch, python): start_resolution(requirements + [f"torch=={torch}"], python, PLATFORM,
                                                 root / f"torch-{torch}-py{python}")
               for torch in HOSTED_TORCH for python in HOSTED_PYTHONS}
    return {key: (*finish(process), root / f"torch-{key[0]}-py{key[1]}" / "resolved.txt")
            for key, process in started.items()}


@pytest.mark.parametrize("python", HOSTED_PYTHONS)
@pytest.mark.parametrize("torch", HOSTED_TORCH)
def test_the_hosted_set_installs_next_to_the_runtimes_torch(torch, python, resolutions):
    returncode, stderr, resolved_file = resolutions[torch, python]
    assert returncode == 0, (f"the hosted extra does not install next to torch {torch} on Python {python} "
                             f"(Linux x86-64, wheels only); uv says:\n{stderr}")
    resolved = dict(line.split("==", 1) for line in resolved_file.read_text().splitlines()
                    if "==" in line and not line.startswith("#"))
    assert Version(resolved["torch"]) == Version(torch), f"torch resolved to {resolved.get('torch')}, not the runtime's {torch}"
    for wanted in HOSTED:
        assert wanted.specifier.contains(resolved[wanted.name]), f"{wanted.name} resolved to {resolved[wanted.name]}"


def test_a_torch_the_set_does_not_accept_is_named(tmp_path):
    """The resolution can fail, and then names the conflict: bitsandbytes 0.50.2 needs torch>=2.4."""
    requirements = [str(r) for r in HOSTED if r.name not in ("torch", "bitsandbytes")]
    returncode, stderr = finish(start_resolution(requirements + ["bitsandbytes==0.50.2", "torch==2.3.0"], "3.12",
                                                 PLATFORM, tmp_path))
    assert returncode != 0
    assert re.search(r"bitsandbytes.*depends on torch>=2\.4", stderr), stderr
