"""The heavy half of two seminar topics, run once and committed as results:
the LoRA paper's "which rank?" analysis (chapter 04) and the QLoRA paper's
judge-and-Elo evaluation (chapter 07), both on the course's own adapters.

``make rank-and-judge`` (``python -m qlora_lab.rank_and_judge``) does, with the
``smollm2-cpu`` preset and the same data, seed and steps for each run:

1. trains three adapters on SmolLM2: 16-bit LoRA (float32 base on a CPU) at
   r=8 and at r=64 (the LoRA paper, Sec. 7, compares A at r=8 with A at r=64
   trained on the same task), and QLoRA at r=8;
2. saves the q_proj and v_proj adapters of every layer of the two LoRA runs to
   ``notebooks/results/rank_adapters.safetensors`` (what
   :mod:`qlora_lab.subspace` analyses in chapter 04);
3. generates greedy answers of the base model, QLoRA r=8 and 16-bit LoRA r=8 to
   held-out test conversations (scored tasks and open chat);
4. has a judge model compare every pair of answers to each question, in both
   orders (:mod:`qlora_lab.judge`), and writes answers, verdicts and run
   details to ``notebooks/results/judge.json`` (chapter 07 computes the Elo
   table, the order bias and the agreement with exact match from it).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from qlora_lab import data as data_lib
from qlora_lab import judge as judge_lib
from qlora_lab.lora import lora_modules

RESULTS_DIR = Path(__file__).resolve().parent.parent / "notebooks" / "results"
RUNS = {"lora16-r8": ("lora16", 8), "lora16-r64": ("lora16", 64), "qlora-r8": ("qlora", 8)}
PLAYERS = {"base": None, "QLoRA": "qlora-r8", "LoRA 16": "lora16-r8"}
RANK_RUNS = ("lora16-r8", "lora16-r64")
SAVED_MODULES = ("q_proj", "v_proj")


def held_out_questions(records: list[dict], scored_per_task: int, chat: int) -> list[dict]:
    """The test conversations the players answer: ``scored_per_task`` of each
    scored task (their exact-match truth is known) and the first ``chat`` open
    conversations, cut before their last assistant turn."""
    out = list(data_lib.scored_records(records, per_task=scored_per_task))
    out += [r for r in records if r["task"] == data_lib.CHAT_TASK][:chat]
    return out


def _adapter_tensors(model, tag: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, module in lora_modules(model).items():
        if name.rsplit(".", 1)[-1] in SAVED_MODULES:
            key = name.split("layers.", 1)[-1]  # "12.self_attn.q_proj"
            tensors[f"{tag}.{key}.lora_A"] = module.lora_A.detach().float().contiguous()
            tensors[f"{tag}.{key}.lora_B"] = module.lora_B.detach().float().contiguous()
            tensors[f"{tag}.{key}.scaling"] = torch.tensor([module.scaling], dtype=torch.float32)
    return tensors


def run(steps: int = 60, scored_per_task: int = 8, chat: int = 16, max_length: int = 96,
        out_dir: str | Path = "runs/rank-and-judge", results_dir: str | Path = RESULTS_DIR, seed: int = 0) -> dict:
    """Train, generate and judge (see the module docstring). Each finished run
    is kept in ``out_dir/partial.json`` so that an interrupted call resumes."""
    from safetensors.torch import load_file, save_file

    from qlora_lab.models import load_smollm2
    from qlora_lab.train import preset, train

    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = data_lib.load_dataset()
    questions = held_out_questions(splits["test"], scored_per_task, chat)
    conversations = [q["messages"] for q in questions]
    base, tokenizer = load_smollm2()
    settings = {"steps": steps, "max_length": max_length, "scored_per_task": scored_per_task, "chat": chat,
                "seed": seed}
    partial_path, tensors_path = out_dir / "partial.json", out_dir / "rank_adapters.safetensors"
    summary = json.loads(partial_path.read_text()) if partial_path.exists() else {}
    if summary.get("settings") != settings:
        summary = {"settings": settings, "runs": {}, "answers": {}}
    tensors = load_file(str(tensors_path)) if tensors_path.exists() and summary["runs"] else {}
    if "base" not in summary["answers"]:
        summary["answers"]["base"] = data_lib.generate(base, tokenizer, conversations, max_new_tokens=48)
    for tag, (method, r) in RUNS.items():
        if tag in summary["runs"]:
            continue
        config = preset("smollm2-cpu", method=method, lora_r=r, lora_alpha=2.0 * r, max_steps=steps, seed=seed,
                        max_length=max_length, eval_every=steps, eval_examples=32, save_every=steps)
        model, _ = load_smollm2()
        started = time.perf_counter()
        result = train(config, out_dir / tag, model=model, tokenizer=tokenizer, splits=splits, progress="log")
        summary["runs"][tag] = {"method": method, "r": r, "alpha": 2.0 * r, "seconds": time.perf_counter() - started,
                                "train_loss": result.losses(), "evaluations": result.evaluations}
        if tag in RANK_RUNS:
            tensors.update(_adapter_tensors(result.model, tag))
            save_file(tensors, str(tensors_path))
        for player, run_tag in PLAYERS.items():
            if run_tag == tag:
                summary["answers"][player] = data_lib.generate(result.model, tokenizer, conversations,
                                                               max_new_tokens=48)
        partial_path.write_text(json.dumps(summary))
        del model, result

    judge = judge_lib.Judge(base, tokenizer)
    started = time.perf_counter()
    answers = {p: summary["answers"][p] for p in PLAYERS}
    verdicts = judge_lib.judge_all_pairs(judge, questions, answers)
    summary.update({
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "players": list(PLAYERS),
        "judge_seconds": time.perf_counter() - started,
        "judge": {"model": "SmolLM2-135M-Instruct (the base model)", "instructions": judge_lib.JUDGE_INSTRUCTIONS},
        "questions": [{"id": q["id"], "task": q["task"], "answer": q.get("answer")} for q in questions],
        "answers": answers, "verdicts": verdicts})
    save_file({k: v for k, v in tensors.items() if k.split(".", 1)[0] in RANK_RUNS},
              str(results_dir / "rank_adapters.safetensors"), metadata={"steps": str(steps)})
    (results_dir / "judge.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--scored-per-task", type=int, default=8)
    parser.add_argument("--chat", type=int, default=16)
    parser.add_argument("--out", default="runs/rank-and-judge")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    run(args.steps, args.scored_per_task, args.chat, args.max_length, args.out, args.results_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
