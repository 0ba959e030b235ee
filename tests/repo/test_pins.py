"""pyproject.toml and environment.yml must pin the same versions."""

import re
import sys
import tomllib
from pathlib import Path

from wheel_resolution import pinned_requirements

ROOT = Path(__file__).resolve().parents[2]


def _parse(requirement: str) -> tuple[str, str]:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([\w.]+)\s*", requirement)
    assert match, f"not an exact pin: {requirement!r} (the course pins every dependency with ==)"
    return match.group(1).lower(), match.group(2)


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return dict(_parse(r) for r in pinned_requirements(project))


def environment_pins() -> dict[str, str]:
    """The pip section of environment.yml (a plain-text read: no YAML library needed)."""
    pins = {}
    in_pip = False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("- pip:"):
            in_pip = True
            continue
        if in_pip and stripped.startswith("- "):
            item = stripped[2:].strip()
            if item.startswith("-e"):
                continue
            name, version = _parse(item)
            pins[name] = version
        elif in_pip and stripped and not stripped.startswith("#"):
            in_pip = False
    return pins


def test_every_dependency_is_pinned_exactly():
    pins = pyproject_pins()
    for required in ["torch", "transformers", "peft", "bitsandbytes", "accelerate", "gguf", "scipy",
                     "matplotlib", "jupyterlab", "nbval", "pytest", "safetensors", "tqdm"]:
        assert required in pins, f"{required} is not pinned in pyproject.toml"
    assert pins["torch"] == "2.13.0"
    assert pins["transformers"] == "5.23.0"
    assert pins["peft"] == "0.21.2"
    assert pins["bitsandbytes"] == "0.50.2"


def test_environment_yml_agrees_with_pyproject():
    ours, conda = pyproject_pins(), environment_pins()
    only_pyproject = sorted(set(ours) - set(conda))
    only_conda = sorted(set(conda) - set(ours))
    different = {k: (ours[k], conda[k]) for k in set(ours) & set(conda) if ours[k] != conda[k]}
    assert not only_pyproject, f"pinned in pyproject.toml but not in environment.yml: {only_pyproject}"
    assert not only_conda, f"pinned in environment.yml but not in pyproject.toml: {only_conda}"
    assert not different, f"versions differ (pyproject, environment.yml): {different}"


def test_environment_yml_allows_the_same_pythons_as_pyproject():
    text = (ROOT / "environment.yml").read_text()
    match = re.search(r"^\s*-\s*python([<>=!,.\d]+)", text, re.M)
    assert match, "environment.yml must name a python range"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    conda = set(match.group(1).split(","))
    assert conda == set(requires.split(",")), (
        f"environment.yml asks for python{match.group(1)}, pyproject.toml for {requires}")


def test_parser_catches_a_disagreement(tmp_path, monkeypatch):
    """The agreement test above must be able to fail: feed it a drifted file."""
    drifted = (ROOT / "environment.yml").read_text().replace("peft==0.21.2", "peft==0.20.0")
    (tmp_path / "environment.yml").write_text(drifted)
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert environment_pins()["peft"] == "0.20.0"
    assert pyproject_pins()["peft"] != environment_pins()["peft"]
