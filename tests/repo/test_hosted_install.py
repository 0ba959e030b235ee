"""The first code cell of chapters 00-07 installs the course in Colab and Kaggle: the course and
the model package with ``--no-deps``, then pyproject.toml's ``hosted`` extra, version ranges that
keep the runtime's torch when it is inside (tests/repo/test_hosted_extra.py resolves them). The
install part is one text, the same in every chapter; chapter 07 adds its preset after it.

Here the cell runs as it would there, as far as this machine allows: in a fresh virtual
environment, told it is on Kaggle, with the course's repository given as a local clone. The fresh
environment sees the course environment's site-packages through a ``.pth`` file, standing in for the
runtime's preinstalled libraries: pip must find every range satisfied by them, keep their torch, and
install only the course itself (an editable install of the clone).
"""

from __future__ import annotations

import json
from importlib import metadata
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS_WITH_THE_CELL = sorted(p.name for p in (ROOT / "notebooks").glob("0[0-7]_*.ipynb"))
CANONICAL = "00_welcome.ipynb"  # the install part as every chapter has it; 07 adds its preset after it
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
    assert len(NOTEBOOKS_WITH_THE_CELL) == 8, NOTEBOOKS_WITH_THE_CELL
    for notebook in NOTEBOOKS_WITH_THE_CELL:
        assert "pip" in install_cell(notebook)


def test_the_install_part_is_one_text_everywhere():
    """One source of truth: chapters 00-06 have the install part exactly, 07 begins with it."""
    install = install_cell(CANONICAL)
    assert '["hosted"]' in install and '"--no-deps"' in install
    for notebook in NOTEBOOKS_WITH_THE_CELL:
        cell = install_cell(notebook)
        if notebook.startswith("07_"):
            assert cell.startswith(install + "\n\n"), f"{notebook}: the install part differs from {CANONICAL}'s"
        else:
            assert cell == install, f"{notebook}: the install cell differs from {CANONICAL}'s"


def test_the_stored_output_is_what_the_cell_prints_here():
    """Not hosted, the cell installs nothing and says so; the committed output is that line."""
    for notebook in NOTEBOOKS_WITH_THE_CELL:
        cells = json.loads((ROOT / "notebooks" / notebook).read_text())["cells"]
        cell = next(c for c in cells if c["cell_type"] == "code")
        text = "".join(o.get("text", "") if isinstance(o.get("text"), str) else "".join(o["text"])
                       for o in cell["outputs"])
        assert text.startswith("not on Colab or Kaggle: nothing to install"), f"{notebook}: {text!r}"
        # nbval refuses outputs without an execution count ("Unrun reference cell has outputs")
        assert cell["execution_count"] is not None, f"{notebook}: the install cell has outputs but no execution count"


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
        "\nimport qlora_lab, torch\nprint('qlora_lab from', qlora_lab.__file__)\nprint('cwd', os.getcwd())\n"
        "print('torch from', torch.__file__)\n")
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
    # the runtime's torch (here: the course environment's, in range) is kept, not installed again
    course_site = sysconfig.get_paths()["purelib"]
    assert f"torch from {course_site}/torch/__init__.py" in result.stdout, result.stdout
    assert not list(Path(fresh_site).glob("torch*")), "pip installed a torch of its own"
    assert f"with torch {metadata.version('torch')}" in result.stdout, result.stdout
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
