"""Chapter 08's longer runs (``make after-finetuning``): two task adapters and
what serving them costs, measured once and committed.

``python -m qlora_lab after-finetuning`` does three things the notebook cannot
do inside its three-minute budget:

1. trains two small QLoRA adapters on SmolLM2-135M-Instruct, each on one task
   of the course's data set (``date_iso`` and ``time_24h``), with the course's
   own training loop (:func:`qlora_lab.train.train`) on the NF4 + double
   quantized base, and copies them to ``notebooks/results/adapters/<task>``
   (a few hundred kilobytes each, committed, so that the notebook starts from
   them);
2. scores each adapter on its task's whole test split (50 questions) three
   ways: beside the frozen 4-bit base (as trained), merged into the dequantized
   base (float32, what ``export --format hf`` writes), and merged into the 4-bit
   weights and quantized again (the merge QLoRA cannot do losslessly);
3. measures greedy generation speed (tokens per second) of the float base, the
   NF4 base + adapter and the merged model in one process.

Everything goes to ``notebooks/results/after_finetuning.json``.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from qlora_lab import data as data_lib

RESULTS_DIR = Path(__file__).resolve().parent.parent / "notebooks" / "results"
DEFAULT_RESULTS = RESULTS_DIR / "after_finetuning.json"
ADAPTERS_DIR = RESULTS_DIR / "adapters"
TASKS = ("date_iso", "time_24h")


def task_splits(task: str, splits: dict[str, list[dict]] | None = None) -> dict[str, list[dict]]:
    """The course's data set restricted to one task (every split)."""
    if task not in data_lib.SCORED_TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {data_lib.SCORED_TASKS}")
    splits = splits or data_lib.load_dataset()
    return {name: [r for r in records if r.get("task") == task] for name, records in splits.items()}


def train_task_adapter(task: str, out_dir: str | Path, steps: int = 60, r: int = 8, seed: int = 0) -> Path:
    """Train a QLoRA adapter on one task with the ``smollm2-cpu`` recipe (rank
    ``r``, alpha ``2r``, all linear layers) and return its directory."""
    from qlora_lab.models import load_smollm2
    from qlora_lab.train import preset, train

    splits = task_splits(task)
    model, tokenizer = load_smollm2()
    config = preset("smollm2-cpu", max_steps=steps, lora_r=r, lora_alpha=float(2 * r), seed=seed,
                    eval_every=steps, save_every=steps, eval_examples=25)
    result = train(config, out_dir, model=model, tokenizer=tokenizer, splits=splits, progress="log")
    return result.adapter_dir
