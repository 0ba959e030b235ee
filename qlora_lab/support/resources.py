"""Where the course's files are: the data set, the evaluation text, committed results.

They ship inside the package (``qlora_lab/datasets/``, ``qlora_lab/results/``,
listed as package data in ``pyproject.toml``), so they are found the same way
from a checkout, an editable install and a plain ``pip install .``: through
``importlib.resources``, never relative to the current directory or to the
repository. Everything else asks this module.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["AFTER_FINETUNING_RESULTS", "COURSE_DATASET_DIR", "EVAL_TEXT_DIR", "EXPERIMENT_RESULTS", "JUDGE_RESULTS",
           "RESULTS_DIR", "TASK_ADAPTERS_DIR", "package_path"]


def package_path(*parts: str) -> Path:
    """The path of a file or directory shipped inside ``qlora_lab``."""
    resource = files("qlora_lab").joinpath(*parts)
    if not isinstance(resource, Path):
        raise RuntimeError(f"qlora_lab is installed in a form whose files are not on disk ({type(resource).__name__}); "
                           f"install it as a directory (pip install ., not a zipped egg)")
    return resource


#: The course's instruction data set: ``train``, ``validation`` and ``test``
#: JSONL files with their datasheet (``README.md``) and generator.
COURSE_DATASET_DIR = package_path("datasets", "qlora_lab_instruct")

#: The course's fixed text for perplexity (``*.txt``, with a datasheet).
EVAL_TEXT_DIR = package_path("datasets", "eval_text")

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
