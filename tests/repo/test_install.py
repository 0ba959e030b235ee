"""The course's data ships with the package: after a plain (non-editable)
``pip install .`` into a fresh virtual environment, the data set, the
evaluation text and the committed results load from the installed copy.

The fresh environment reuses the installed dependencies instead of
downloading them: a ``.pth`` file puts this interpreter's site-packages on its
path (a path line only, so the editable install of ``qlora_lab`` found there is
not activated), and pip runs offline (``--no-index --no-deps
--no-build-isolation``, setuptools from the same site-packages). pip writes
only into the fresh environment (``--ignore-installed``: nothing is
uninstalled anywhere else), and builds from a copy of the project, so the
checkout gets no ``build/`` or ``*.egg-info``.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

from qlora_lab.finetune import data, evaluate
from qlora_lab.support import resources

ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import json, sys
from pathlib import Path
import qlora_lab
import qlora_lab.after, qlora_lab.beyond, qlora_lab.finetune, qlora_lab.paging, qlora_lab.runs
from qlora_lab.finetune import data, evaluate
from qlora_lab.support import resources
splits = data.load_dataset()
print(json.dumps({
    "package": qlora_lab.__file__,
    "dataset": str(data.COURSE_DATASET_DIR),
    "eval_dir": str(resources.EVAL_TEXT_DIR),
    "sizes": {name: len(records) for name, records in splits.items()},
    "eval_text": evaluate.course_eval_text(),
    "results_steps": json.loads(resources.EXPERIMENT_RESULTS.read_text())["steps"],
}))
"""


def test_a_plain_install_finds_the_data_set_the_evaluation_text_and_the_results(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, project / name)
    for folder in ("qlora_lab", "datasets"):
        shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    (purelib / "_reuse_dependencies.pth").write_text("\n".join(sorted(p for p in ours if Path(p).is_dir())) + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir",
         "--ignore-installed", "--quiet", str(project)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr

    shutil.rmtree(project)  # the installed copy must not need the source tree
    run = subprocess.run([str(python), "-c", CHECK], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(purelib), found["package"]  # not the editable checkout
    assert Path(found["dataset"]).is_relative_to(purelib)  # datasets/ was installed as qlora_lab/datasets/
    assert Path(found["eval_dir"]).is_relative_to(purelib)
    assert found["sizes"] == {name: len(records) for name, records in data.load_dataset().items()}
    assert found["eval_text"] == evaluate.course_eval_text()
    assert found["results_steps"] == json.loads(resources.EXPERIMENT_RESULTS.read_text())["steps"]


def test_pyproject_names_every_package_and_maps_the_top_level_datasets():
    """``pyproject.toml`` lists the packages by name (it maps ``datasets/`` into the
    package, which rules out automatic discovery): a new stage folder must be added."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "qlora_lab").rglob("__init__.py")}
    assert set(setuptools["packages"]) == folders | {"qlora_lab.datasets"}
    assert setuptools["package-dir"] == {"qlora_lab.datasets": "datasets"}
    assert not (ROOT / "qlora_lab" / "datasets").exists(), "the data lives in the top-level datasets/"
    for pattern in setuptools["package-data"]["qlora_lab.datasets"]:
        assert list((ROOT / "datasets").glob(pattern)), pattern
