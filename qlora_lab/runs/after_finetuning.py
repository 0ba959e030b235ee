"""Chapter 08's longer runs (``make after-finetuning``): two task adapters and
what serving them costs, measured once and committed.

``python -m qlora_lab after-finetuning`` does three things the notebook cannot
do inside its three-minute budget:

1. trains two small QLoRA adapters on SmolLM2-135M-Instruct, each on one task
   of the course's data set (``date_iso`` and ``time_24h``), with the course's
   own training loop (:func:`qlora_lab.finetune.train.train`) on the NF4 + double
   quantized base, and copies them to ``qlora_lab/results/adapters/<task>``
   (about 9.8 MB each in float32, committed, so that the notebook starts from
   them);
2. scores each adapter on its task's test questions (all 50, or
   ``--per-task`` of them) three ways: beside the frozen 4-bit base (as trained), merged into the dequantized
   base (float32, what ``export --format hf`` writes), and merged into the 4-bit
   weights and quantized again (the merge QLoRA cannot do losslessly);
3. measures greedy generation speed (tokens per second) of the float base, the
   NF4 base + adapter and the merged model in one process.

Everything goes to ``qlora_lab/results/after_finetuning.json``.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from qlora_lab.finetune import chat_format
from qlora_lab.finetune import data as data_lib
from qlora_lab.finetune import evaluate
from qlora_lab.support.atomic import atomic_directory
from qlora_lab.support.resources import AFTER_FINETUNING_RESULTS, TASK_ADAPTERS_DIR

DEFAULT_RESULTS = AFTER_FINETUNING_RESULTS
ADAPTERS_DIR = TASK_ADAPTERS_DIR
TASKS = ("date_iso", "time_24h")
PARTS = ("scores", "gguf", "speed")


def task_splits(task: str, splits: dict[str, list[dict]] | None = None) -> dict[str, list[dict]]:
    """The course's data set restricted to one task (every split)."""
    if task not in data_lib.SCORED_TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {data_lib.SCORED_TASKS}")
    splits = splits or data_lib.load_dataset()
    return {name: [r for r in records if r.get("task") == task] for name, records in splits.items()}


def train_task_adapter(task: str, out_dir: str | Path, steps: int = 16, r: int = 8, batch_size: int = 4,
                       seed: int = 0) -> Path:
    """Train a QLoRA adapter on one task with the ``smollm2-cpu`` recipe (rank
    ``r``, alpha ``2r``, all linear layers; ``batch_size`` conversations a
    step) and return its directory. One narrow task needs few steps."""
    from qlora_lab.models import load_smollm2
    from qlora_lab.finetune.train import preset, train

    splits = task_splits(task)
    model, tokenizer = load_smollm2()
    config = preset("smollm2-cpu", max_steps=steps, r=r, lora_alpha=float(2 * r), seed=seed,
                    batch_size=batch_size, eval_every=steps, save_every=steps, eval_examples=8)
    result = train(config, out_dir, model=model, tokenizer=tokenizer, splits=splits, progress="log")
    return result.adapter_dir


def commit_adapter(adapter_dir: str | Path, task: str, base_name: str = "smollm2") -> Path:
    """Copy an adapter's two files to ``qlora_lab/results/adapters/<task>``,
    naming ``base_name`` as its base (a name every reader's machine resolves)."""
    from qlora_lab.lora import CONFIG_NAME, WEIGHTS_NAME

    config = json.loads((Path(adapter_dir) / CONFIG_NAME).read_text())
    config["base_model_name_or_path"] = base_name
    target = ADAPTERS_DIR / task
    with atomic_directory(target, overwrite=True) as staging:
        shutil.copyfile(Path(adapter_dir) / WEIGHTS_NAME, staging / WEIGHTS_NAME)
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return target


def _score(model, tokenizer, records: list[dict]) -> dict:
    report = evaluate.score(model, tokenizer, records, max_new_tokens=16)
    return {"correct": report.correct, "total": report.total, "predictions": report.predictions}


def run(steps: int = 16, out_dir: str | Path = "runs/after-finetuning", results: str | Path = DEFAULT_RESULTS,
        retrain: bool = False, per_task: int | None = None, speed_tokens: int = 32,
        parts: tuple[str, ...] = PARTS) -> dict:
    """The chapter's measured runs (module docstring). ``parts`` chooses among
    ``"scores"``, ``"gguf"`` and ``"speed"`` (separate processes may run
    separate parts); each part's results replace that part's entries in
    ``results`` (JSON), the others are kept."""
    import copy

    from qlora_lab.after.chat import AdapterSet, generation_speed
    from qlora_lab.after.export import merge_into_4bit, merged_model
    from qlora_lab.lora import load_adapter
    from qlora_lab.models import load_smollm2
    from qlora_lab.qlora import quantize_model

    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown part(s) {sorted(unknown)}; choose from {PARTS}")
    path = Path(results)
    summary = json.loads(path.read_text()) if path.is_file() else {}
    summary.update({"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": platform.processor() or
                    platform.machine(), "torch": torch.__version__, "steps": steps})
    if "scores" in parts:
        summary["per_task"] = per_task
    for task in TASKS:
        if retrain or not (ADAPTERS_DIR / task / "adapter_model.safetensors").is_file():
            started = time.perf_counter()
            trained = train_task_adapter(task, Path(out_dir) / f"{task}-{datetime.now():%Y%m%d-%H%M%S}", steps)
            summary.setdefault("train_seconds", {})[task] = time.perf_counter() - started
            commit_adapter(trained, task)
    splits = data_lib.load_dataset(splits=("test",))
    float_base, tokenizer = load_smollm2()
    nf4_base = copy.deepcopy(float_base)
    quantize_model(nf4_base)
    bank = AdapterSet(nf4_base)
    for task in TASKS:
        bank.add(task, ADAPTERS_DIR / task)
    fresh: dict = {"scores": {}, "requantize": {}, "gguf": {}, "speed": {}}
    for task in TASKS:
        records = evaluate.scored_records(splits["test"], tasks=(task,), per_task=per_task)
        merged, _ = merged_model(ADAPTERS_DIR / task, loaded=_dequantized(nf4_base), tokenizer=tokenizer)
        requantized = copy.deepcopy(nf4_base)
        load_adapter(requantized, ADAPTERS_DIR / task)
        report = merge_into_4bit(requantized)
        if "scores" in parts:
            fresh["requantize"][task] = dict(vars(report))
            fresh["scores"][task] = {"float base": _score(float_base, tokenizer, records),
                                     "NF4 base + adapter": _score(bank.use(task), tokenizer, records),
                                     "merged (float32)": _score(merged, tokenizer, records),
                                     "merged into NF4, re-quantized": _score(requantized, tokenizer, records)}
            bank.use(None)
        if task == TASKS[0] and "gguf" in parts:
            fresh["gguf"] = _gguf_checks(merged, tokenizer, records[:8])
        if task == TASKS[0] and "speed" in parts:
            threads = torch.get_num_threads()
            torch.set_num_threads(2)  # the speeds are measured with two threads; the caller's count comes back
            try:
                for name, model in (("float base", float_base), ("NF4 base + adapter", bank.use(task)),
                                    ("merged (float32)", merged), ("merged into NF4, re-quantized", requantized)):
                    fresh["speed"][name] = generation_speed(model, tokenizer, new_tokens=speed_tokens, repeats=3)
            finally:
                torch.set_num_threads(threads)
            bank.use(None)
        del merged, requantized
    # Read again: another process may have written its part meanwhile.
    summary = {**(json.loads(path.read_text()) if path.is_file() else {}), **summary}
    for part, keys in (("scores", ("scores", "requantize")), ("gguf", ("gguf",)), ("speed", ("speed",))):
        if part in parts:
            for key in keys:
                summary[key] = fresh[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _dequantized(nf4_base):
    import copy

    from qlora_lab.after.export import dequantize_model

    model = copy.deepcopy(nf4_base)
    dequantize_model(model)
    return model


def _gguf_checks(merged, tokenizer, records) -> dict:
    """Write the merged model as GGUF f16 and Q8_0, read each back with
    transformers, compare logits on the prompts and the greedy answers."""
    import tempfile

    from qlora_lab.after.gguf import load_gguf, write_gguf

    out = {}
    prompts = [chat_format.prompt_ids(r["messages"], tokenizer) for r in records]
    reference = evaluate.generate(merged, tokenizer, [r["messages"] for r in records], max_new_tokens=16)
    with tempfile.TemporaryDirectory() as tmp:
        for gguf_type in ("f16", "q8_0"):
            path = write_gguf(merged, tokenizer, Path(tmp) / f"model.{gguf_type}.gguf", gguf_type,
                              tokenizer_pre="smollm")
            started = time.perf_counter()
            loaded, loaded_tokenizer = load_gguf(path)
            seconds = time.perf_counter() - started
            worst = 0.0
            with torch.no_grad():
                for ids in prompts:
                    x = torch.tensor([ids])
                    worst = max(worst, (loaded(x).logits - merged(x).logits).abs().max().item())
            answers = evaluate.generate(loaded, loaded_tokenizer, [r["messages"] for r in records], max_new_tokens=16)
            out[gguf_type] = {"bytes": path.stat().st_size, "max_abs_logit_difference": worst,
                              "same_greedy_answers": sum(a == b for a, b in zip(answers, reference)),
                              "answers": len(records), "load_seconds": seconds}
            del loaded
    return out
