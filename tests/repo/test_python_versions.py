"""The course installs on every Python it claims (3.11 to 3.14), on Linux x86-64 and
macOS arm64, and the Makefile finds such an interpreter by itself.

The resolution tests ask PyPI for the metadata of the whole pinned set, as it would be
installed on each supported version and platform, with wheels only (a learner should
never need a compiler). ``uv pip compile`` does this without downloading any wheel: it
reads the metadata PyPI serves beside each one. pip's own ``--dry-run --platform``
cannot stand in for it here, because pip evaluates environment markers against the
machine it runs on: asked for macOS, it still wants torch's Linux-only CUDA packages.
"""

from __future__ import annotations

import re
import stat
import subprocess
from pathlib import Path

import pytest

from wheel_resolution import (PLATFORMS, PROJECT, RESOLUTIONS, ROOT, AllResolutions, finish,
                              pinned_requirements, start_resolution, supported_versions)


def makefile_versions() -> list[str]:
    match = re.search(r"^SUPPORTED_PYTHONS\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, "the Makefile must define SUPPORTED_PYTHONS"
    return match.group(1).split()


@pytest.fixture
def resolutions(request, tmp_path_factory) -> AllResolutions:
    """The resolutions conftest.py started after collection, or new ones."""
    started = request.config.stash.get(RESOLUTIONS, None)
    if started is None:
        started = AllResolutions(tmp_path_factory.mktemp("resolve"))
        request.config.stash[RESOLUTIONS] = started
    return started


def test_the_supported_versions_agree_everywhere():
    versions = supported_versions()
    assert versions == ["3.11", "3.12", "3.13", "3.14"], versions
    assert sorted(makefile_versions()) == versions, "Makefile's SUPPORTED_PYTHONS differs from requires-python"
    classifiers = {c.rsplit(" :: ", 1)[1] for c in PROJECT["classifiers"] if c.startswith("Programming Language :: Python :: 3.")}
    assert sorted(classifiers) == versions, "pyproject's classifiers differ from requires-python"


@pytest.mark.parametrize("label, platform", PLATFORMS, ids=[p[0] for p in PLATFORMS])
@pytest.mark.parametrize("python", supported_versions())
def test_every_pin_has_a_wheel(python, label, platform, resolutions):
    returncode, stderr, resolved_file = resolutions.get(python, platform)
    assert returncode == 0, f"the pinned set does not install from wheels on Python {python}, {label}:\n{stderr}"
    resolved = dict(line.split("==", 1) for line in resolved_file.read_text().splitlines()
                    if "==" in line and not line.startswith("#"))
    for requirement in pinned_requirements():
        name, version = requirement.split("==")
        assert resolved.get(name) == version, f"{name} resolved to {resolved.get(name)}, pinned {version}"


def test_a_pin_without_a_wheel_is_named(tmp_path):
    """The check can fail, and then says which package is the problem: numpy 1.26.4 has
    no wheel for Python 3.13."""
    returncode, stderr = finish(start_resolution(["numpy==1.26.4", "tqdm==4.70.1"], "3.13",
                                                 "x86_64-manylinux_2_28", tmp_path))
    assert returncode != 0
    assert re.search(r"numpy==1\.26\.4 has no (usable )?wheels", stderr), stderr


# --- choosing the interpreter -------------------------------------------------------

def stand_in(directory: Path, name: str, version: str | None) -> None:
    """An executable called ``name`` that answers any question like a Python of
    ``version`` would answer ``print("%d.%d" % sys.version_info[:2])``; ``None`` makes
    one that fails, like a pyenv shim for a version that is not active."""
    path = directory / name
    path.write_text("#!/bin/sh\n" + (f"echo {version}\n" if version else "echo 'pyenv: not active' >&2; exit 127\n"))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def choose(tmp_path: Path, interpreters: dict[str, str | None], python: str | None = None):
    """``make python`` with nothing on the PATH but the stand-ins (and ``id``, which the
    Makefile asks whether it runs as root)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, version in interpreters.items():
        stand_in(bin_dir, name, version)
    (bin_dir / "id").symlink_to("/usr/bin/id")
    args = ["/usr/bin/make", "-s", "--no-print-directory", "-C", str(ROOT), "python"]
    if python is not None:
        args.append(f"PYTHON={python}")
    return subprocess.run(args, capture_output=True, text=True, timeout=60,
                          env={"PATH": str(bin_dir), "HOME": str(tmp_path)})


def test_the_newest_supported_python_on_the_path_is_chosen(tmp_path):
    result = choose(tmp_path, {"python3.12": "3.12", "python3.13": "3.13", "python3": "3.10"})
    assert result.returncode == 0, result.stderr
    assert "with python3.13 (Python 3.13)" in result.stdout


def test_a_broken_candidate_is_passed_over(tmp_path):
    result = choose(tmp_path, {"python3.14": None, "python3.11": "3.11"})
    assert result.returncode == 0, result.stderr
    assert "with python3.11 (Python 3.11)" in result.stdout


def test_plain_python3_is_used_when_it_is_supported(tmp_path):
    result = choose(tmp_path, {"python3": "3.12", "python": "2.7"})
    assert result.returncode == 0, result.stderr
    assert "with python3 (Python 3.12)" in result.stdout


def test_no_supported_python_is_refused_in_one_sentence(tmp_path):
    result = choose(tmp_path, {"python3": "3.10", "python": "3.9"})
    assert result.returncode != 0
    message = [line for line in result.stderr.splitlines() if line.startswith("qlora-lab")]
    assert len(message) == 1, result.stderr
    assert "3.11, 3.12, 3.13 or 3.14" in message[0] and "uv python install 3.12" in message[0]


def test_python_variable_wins_over_the_path(tmp_path):
    chosen = tmp_path / "bin" / "python3.12"
    result = choose(tmp_path, {"python3.13": "3.13", "python3.12": "3.12"}, python=str(chosen))
    assert result.returncode == 0, result.stderr
    assert f"with {chosen} (Python 3.12)" in result.stdout


def test_an_unsupported_python_variable_is_refused(tmp_path):
    old = tmp_path / "bin" / "python3.10"
    result = choose(tmp_path, {"python3.10": "3.10", "python3.13": "3.13"}, python=str(old))
    assert result.returncode != 0
    assert f"PYTHON={old} is Python 3.10" in result.stderr and "3.11, 3.12, 3.13 or 3.14" in result.stderr


def test_a_python_variable_that_does_not_run_is_refused(tmp_path):
    result = choose(tmp_path, {"python3.13": "3.13"}, python=str(tmp_path / "no-such-python"))
    assert result.returncode != 0
    assert "does not run" in result.stderr
