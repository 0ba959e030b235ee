"""The checks of the repository as a whole (pins, install, documented commands,
layout, notebooks' times and slides)."""

import tempfile
from pathlib import Path


def pytest_collection_finish(session):
    """Start the pinned-set resolutions of tests/repo/test_python_versions.py as soon as the
    tests are known: they wait on PyPI, not on the CPU, so the other tests run meanwhile."""
    if any(item.nodeid.startswith("tests/repo/test_python_versions.py::test_every_pin") for item in session.items):
        from wheel_resolution import RESOLUTIONS, AllResolutions

        root = Path(tempfile.mkdtemp(prefix="qlora-lab-resolve-"))
        session.config.stash[RESOLUTIONS] = AllResolutions(root)
