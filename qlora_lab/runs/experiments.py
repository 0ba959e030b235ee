"""Longer runs than CI allows: QLoRA against 16-bit LoRA, the paper's central
comparison (QLoRA, Sec. 4, "4-bit NormalFloat yields better performance than
4-bit Floating Point" and Table 3/4: QLoRA matches 16-bit LoRA), in miniature.

``make experiments`` (``python -m qlora_lab experiments``) trains SmolLM2 with
the ``smollm2-cpu`` preset twice, once on the NF4 + double-quantized base and
once on the float32 base, with the same data, seed and steps, scores the
test split's scored tasks before and after, and writes everything to
``qlora_lab/results/experiments.json``
(:data:`qlora_lab.support.resources.EXPERIMENT_RESULTS`), which chapter 07 plots. Each
run's wall time is in the file (``seconds``); on one CPU thread of an idle
2-core machine a run of 300 steps takes about half an hour. The losses and
scores do not depend on the machine's load: a second run on another CPU
reproduced every evaluation loss to 1e-6 and every exact-match score.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from qlora_lab.finetune import data as data_lib
from qlora_lab.finetune import evaluate
from qlora_lab.support.resources import EXPERIMENT_RESULTS, datasets_path


def score_split(model, tokenizer, records: list[dict], per_task: int | None) -> dict:
    """Exact-match score of the scored tasks in ``records`` (``per_task`` items
    of each task, or all)."""
    selected = evaluate.scored_records(records, per_task=per_task)
    report = evaluate.score(model, tokenizer, selected)
    return {"exact_match": report.accuracy, "correct": report.correct, "total": report.total,
            "per_task": {t: {"correct": c, "total": n} for t, (c, n) in report.per_task.items()},
            "samples": [{"task": t, "prediction": p, "answer": a}
                        for t, p, a in list(zip(report.tasks, report.predictions, report.answers))[:8]]}


def portable_config(config) -> dict:
    """The run's configuration as JSON, with the data set named by its path
    inside the course's ``datasets/`` (``datasets/qlora_lab_instruct``) rather
    than this machine's absolute path, so the committed file reads the same
    on every clone."""
    record = dataclasses.asdict(config)
    data = Path(record["data"]).resolve()
    root = datasets_path().resolve()
    if data.is_relative_to(root):
        record["data"] = str(Path("datasets") / data.relative_to(root))
    return record


def committed_results() -> dict:
    """The results of the last ``make experiments`` committed with the course
    (``qlora_lab/results/experiments.json``), which chapter 07 plots."""
    return json.loads(EXPERIMENT_RESULTS.read_text())


def run(steps: int = 300, out_dir: str | Path = "runs/experiments", results: str | Path = EXPERIMENT_RESULTS,
        per_task: int | None = None, methods: tuple[str, ...] = ("qlora", "lora16"), seed: int = 0) -> dict:
    """Train each method for ``steps`` steps with the ``smollm2-cpu`` preset and
    write the scores, losses and evaluations to ``results`` (JSON)."""
    from qlora_lab.models import load_smollm2
    from qlora_lab.finetune.recipe import preset
    from qlora_lab.finetune.train import train

    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    splits = data_lib.load_dataset()
    base, tokenizer = load_smollm2()
    summary = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": steps, "runs": {}}
    summary["before"] = score_split(base, tokenizer, splits["test"], per_task)
    for method in methods:
        config = preset("smollm2-cpu", method=method, max_steps=steps, seed=seed, eval_every=max(steps // 6, 1),
                        save_every=max(steps // 3, 1))
        started = time.perf_counter()
        model, _ = load_smollm2()
        run_dir = Path(out_dir) / f"{method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        result = train(config, run_dir, model=model, tokenizer=tokenizer, splits=splits,
                       progress="log")
        seconds = time.perf_counter() - started
        summary["runs"][method] = {
            "config": portable_config(config),
            "seconds": seconds,
            "train_loss": [h["loss"] for h in result.history],
            "evaluations": result.evaluations,
            "test": score_split(result.model, tokenizer, splits["test"], per_task),
        }
        del model, result
    path = Path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
    return summary
