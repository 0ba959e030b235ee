"""Chapter 07's first code cell installs the course in Colab and Kaggle. Here it runs as
it would there, as far as this machine allows: in a fresh virtual environment, told it
is on Kaggle, with the course's repository given as a local clone.

To avoid downloading every pinned library again, the fresh environment sees the course
environment's site-packages through a ``.pth`` file, so pip finds the pins satisfied and
installs the course itself (an editable install of the clone) and the model package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS_WITH_THE_CELL = ["07_finetune_7b.ipynb"]
MARKER = "COURSE_REPO = "


def install_cell(notebook: str) -> str:
    cells = json.loads((ROOT / "notebooks" / notebook).read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert MARKER in "".join(code[0]["source"]), f"{notebook}: the install cell must be the first code cell"
    return "".join(code[0]["source"])


def course_repository(where: Path) -> Path:
    """The repository the learner would name: a clone of this checkout's committed
    state, or, where this copy of the course is not a git checkout (an unpacked
    archive), a new repository holding its files."""
    inside = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--is-inside-work-tree"], capture_output=True,
                            text=True).stdout.strip() == "true"
    if inside:
        subprocess.run(["git", "clone", "--quiet", "--depth", "1", f"file://{ROOT}", str(where)], check=True,
                       timeout=120)
        return where
    shutil.copytree(ROOT, where, ignore=shutil.ignore_patterns(".venv", "runs", "node_modules", "__pycache__",
                                                                 "*.slides.html", ".pytest_cache"))
    git = ["git", "-C", str(where), "-c", "user.name=qlora-lab", "-c", "user.email=tests@qlora-lab.invalid"]
    for command in (["init", "--quiet"], ["add", "--all"], ["commit", "--quiet", "-m", "course"]):
        subprocess.run(git + command, check=True, timeout=120)
    return where


def test_the_cell_is_the_first_code_cell_everywhere():
    for notebook in NOTEBOOKS_WITH_THE_CELL:
        assert "pip" in install_cell(notebook)


def test_the_install_cell_runs_in_a_fresh_environment(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    fresh = venv / "bin" / "python"
    fresh_site = subprocess.run([str(fresh), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    Path(fresh_site, "course-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    repo = course_repository(tmp_path / "origin")

    workdir = tmp_path / "kaggle-working"
    workdir.mkdir()
    script = install_cell("07_finetune_7b.ipynb") + (
        "\nimport qlora_lab\nprint('qlora_lab from', qlora_lab.__file__)\nprint('cwd', os.getcwd())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(KAGGLE_KERNEL_RUN_TYPE="Interactive", QLORA_LAB_REPO=str(repo),
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    result = subprocess.run([str(fresh), "-c", script], cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    checkout = workdir / "qlora-lab"
    assert f"qlora_lab from {checkout}/qlora_lab/__init__.py" in result.stdout, result.stdout
    assert f"cwd {checkout}/notebooks" in result.stdout
    assert "the command-line preset is smollm2-cpu" in result.stdout  # no GPU here
    installed = subprocess.run([str(fresh), "-m", "pip", "show", "qlora-lab"], capture_output=True, text=True,
                               env=env).stdout
    assert f"Editable project location: {checkout}" in installed, installed


def test_the_cell_refuses_without_a_repository(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "QLORA_LAB_REPO"}
    env["KAGGLE_KERNEL_RUN_TYPE"] = "Interactive"
    result = subprocess.run([sys.executable, "-c", install_cell("07_finetune_7b.ipynb")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Set COURSE_REPO" in result.stderr
    assert not (tmp_path / "qlora-lab").exists()
