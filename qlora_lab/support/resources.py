"""Where the course's files are: the data set, the evaluation text, committed results.

The results ship inside the package (``qlora_lab/results/``). The data set and
the evaluation text live at the top of the repository (``datasets/``), and
``pyproject.toml`` installs that folder as ``qlora_lab/datasets/``. So a plain
``pip install .`` finds them inside the installed package, and a checkout (or
an editable install, which runs from the checkout) finds them in the
repository's ``datasets/`` beside the package. Both are found through the
package's own location, never the current directory. Everything else asks this
module.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["AFTER_FINETUNING_RESULTS", "COURSE_DATASET_DIR", "EVAL_TEXT_DIR", "EXPERIMENT_RESULTS", "JUDGE_RESULTS",
           "RESULTS_DIR", "TASK_ADAPTERS_DIR", "datasets_path", "package_path"]


def package_path(*parts: str) -> Path:
    """The path of a file or directory shipped inside ``qlora_lab``."""
    resource = files("qlora_lab").joinpath(*parts)
    if not isinstance(resource, Path):
        raise RuntimeError(f"qlora_lab is installed in a form whose files are not on disk ({type(resource).__name__}); "
                           f"install it as a directory (pip install ., not a zipped egg)")
    return resource


def datasets_path(*parts: str) -> Path:
    """A path inside the course's ``datasets/``: the installed copy
    (``qlora_lab/datasets/``) if there is one, else the checkout's top-level
    ``datasets/`` next to the ``qlora_lab`` folder."""
    installed = package_path("datasets")
    if installed.is_dir():
        return installed.joinpath(*parts)
    checkout = package_path().parent / "datasets"
    if checkout.is_dir():
        return checkout.joinpath(*parts)
    raise RuntimeError(f"the course's data is missing: neither {installed} (an installed qlora-lab) nor {checkout} "
                       f"(a checkout) exists; reinstall with pip install . from a full checkout of the repository")


#: The course's instruction data set: ``train``, ``validation`` and ``test``
#: JSONL files with their datasheet (``README.md``) and generator.
COURSE_DATASET_DIR = datasets_path("qlora_lab_instruct")

#: The course's fixed text for perplexity (``*.txt``, with a datasheet).
EVAL_TEXT_DIR = datasets_path("eval_text")

#: The results of ``make experiments`` that chapter 07 plots.
EXPERIMENT_RESULTS = package_path("results", "experiments.json")

#: Every committed result of a ``make`` target that a chapter shows.
RESULTS_DIR = package_path("results")

#: The results of ``make after-finetuning`` that chapter 08 shows.
AFTER_FINETUNING_RESULTS = RESULTS_DIR / "after_finetuning.json"

#: Chapter 08's two task adapters (``date_iso``, ``time_24h``), in peft's format.
TASK_ADAPTERS_DIR = RESULTS_DIR / "adapters"

#: The results of ``make rank-and-judge``: chapter 07's judged pairs and Elo.
JUDGE_RESULTS = RESULTS_DIR / "judge.json"
