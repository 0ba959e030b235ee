"""The heavy half of two seminar topics, run once and committed as results:
the LoRA paper's "which rank?" analysis (chapter 04) and the QLoRA paper's
judge-and-Elo evaluation (chapter 07), both on the course's own adapters.

``make rank-and-judge`` (``python -m qlora_lab.runs.rank_and_judge``) does, with the
``smollm2-cpu`` preset and the same data, seed and steps for each run:

1. trains three adapters on SmolLM2: 16-bit LoRA (float32 base on a CPU) at
   r=8 and at r=64 (the LoRA paper, Sec. 7, compares A at r=8 with A at r=64
   trained on the same task), and QLoRA at r=8;
2. saves the q_proj and v_proj adapters of every layer of the two LoRA runs to
   ``qlora_lab/results/rank_adapters.safetensors`` for :mod:`qlora_lab.lora.subspace`
   (chapter 04 trains its own small adapters in the notebook instead, so this
   file is not committed);
3. generates greedy answers of the base model, QLoRA r=8 and 16-bit LoRA r=8 to
   held-out test conversations (scored tasks and open chat);
4. has a judge model compare every pair of answers to each question, in both
   orders (:mod:`qlora_lab.finetune.judge`), and on the scored questions also each
   player's answer against the gold answer (to measure the judge against
   exact match even when few players are right), and writes answers, verdicts
   and run details to ``qlora_lab/results/judge.json`` (chapter 07 computes
   the Elo table, the order bias and the agreement with exact match from it).

The defaults are small (8 steps on sequences cut at 48 tokens, 18 questions)
so that the committed results could be made on a shared two-core machine;
``--steps 150 --max-length 128 --scored-per-task 8 --chat 16`` gives adapters
that have learned the tasks and a larger tournament (about an hour).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from qlora_lab.finetune import data as data_lib
from qlora_lab.finetune import evaluate
from qlora_lab.finetune import judge as judge_lib
from qlora_lab.lora import lora_modules
from qlora_lab.support.resources import JUDGE_RESULTS, RESULTS_DIR

RUNS = {"lora16-r8": ("lora16", 8), "lora16-r64": ("lora16", 64), "qlora-r8": ("qlora", 8)}
PLAYERS = {"base": None, "QLoRA": "qlora-r8", "LoRA 16": "lora16-r8"}
RANK_RUNS = ("lora16-r8", "lora16-r64")
SAVED_MODULES = ("q_proj", "v_proj")


def committed_results() -> dict:
    """The judgements of the last ``make rank-and-judge`` committed with the
    course (``qlora_lab/results/judge.json``), which chapter 07 shows."""
    return json.loads(JUDGE_RESULTS.read_text())


def held_out_questions(records: list[dict], scored_per_task: int, chat: int) -> list[dict]:
    """The test conversations the players answer: ``scored_per_task`` of each
    scored task (their exact-match truth is known) and the first ``chat`` open
    conversations, cut before their last assistant turn."""
    out = list(evaluate.scored_records(records, per_task=scored_per_task))
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


def _stage_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.json"


def run_stage(stage: str, out_dir: Path, questions: list[dict], settings: dict) -> None:
    """One stage, whose result is kept in ``out_dir``: ``base`` (the base
    model's answers) or a run tag of :data:`RUNS` (train, keep the answers and
    for :data:`RANK_RUNS` the q/v adapters). Stages are independent, so they
    can run in separate processes side by side."""
    from safetensors.torch import save_file

    from qlora_lab.models import load_smollm2
    from qlora_lab.finetune.train import preset, train

    conversations = [q["messages"] for q in questions]
    model, tokenizer = load_smollm2()
    if stage == "base":
        out = {"settings": settings,
               "answers": evaluate.generate(model, tokenizer, conversations, max_new_tokens=settings["max_new_tokens"])}
    elif stage in RUNS:
        method, r = RUNS[stage]
        config = preset("smollm2-cpu", method=method, r=r, lora_alpha=2.0 * r, max_steps=settings["steps"],
                        seed=settings["seed"], max_length=settings["max_length"], eval_every=settings["steps"],
                        eval_examples=16, save_every=settings["steps"])
        started = time.perf_counter()
        result = train(config, out_dir / stage, model=model, tokenizer=tokenizer, splits=data_lib.load_dataset(),
                       progress="log")
        out = {"settings": settings, "method": method, "r": r, "alpha": 2.0 * r,
               "seconds": time.perf_counter() - started, "train_loss": result.losses(),
               "evaluations": result.evaluations}
        if stage in RANK_RUNS:
            save_file(_adapter_tensors(result.model, stage), str(out_dir / f"{stage}.safetensors"))
        if stage in PLAYERS.values():
            out["answers"] = evaluate.generate(result.model, tokenizer, conversations,
                                               max_new_tokens=settings["max_new_tokens"])
    else:
        raise ValueError(f"unknown stage {stage!r}; choose base, {', '.join(RUNS)} or all")
    _stage_path(out_dir, stage).write_text(json.dumps(out))


def run(steps: int = 8, scored_per_task: int = 3, chat: int = 6, max_length: int = 48,
        out_dir: str | Path = "runs/rank-and-judge", results_dir: str | Path = RESULTS_DIR, seed: int = 0,
        stage: str = "all", max_new_tokens: int = 40) -> dict | None:
    """Train, generate and judge (see the module docstring). ``stage="all"``
    runs every stage not yet kept in ``out_dir`` (with the same settings),
    then judges and writes the results; one stage name runs only that stage."""
    from safetensors.torch import load_file, save_file

    from qlora_lab.models import load_smollm2

    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = data_lib.load_dataset()
    questions = held_out_questions(splits["test"], scored_per_task, chat)
    settings = {"steps": steps, "max_length": max_length, "scored_per_task": scored_per_task, "chat": chat,
                "seed": seed, "max_new_tokens": max_new_tokens}
    if stage != "all":
        run_stage(stage, out_dir, questions, settings)
        return None
    kept = {}
    for name in ("base", *RUNS):
        path = _stage_path(out_dir, name)
        if not path.exists() or json.loads(path.read_text())["settings"] != settings:
            run_stage(name, out_dir, questions, settings)
        kept[name] = json.loads(path.read_text())
    answers = {p: kept[tag or "base"]["answers"] for p, tag in PLAYERS.items()}
    base, tokenizer = load_smollm2()
    judge = judge_lib.Judge(base, tokenizer)
    started = time.perf_counter()
    verdicts = judge_lib.judge_all_pairs(judge, questions, answers)
    # The judge against the truth: on the scored questions, the gold answer against each
    # player's answer, in both orders (a player that is right ties with the gold answer).
    reference_verdicts = []
    for q, record in enumerate(questions):
        if record.get("answer") is None:
            continue
        for player in PLAYERS:
            for first, second in (("reference", player), (player, "reference")):
                replies = {"reference": record["answer"], player: answers[player][q]}
                reference_verdicts.append({"question": q, "first": first, "second": second, "p_first":
                                           judge.prefers_first(record["messages"], replies[first], replies[second])})
    summary = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "settings": settings,
        "runs": {tag: {k: v for k, v in kept[tag].items() if k not in ("answers", "settings")} for tag in RUNS},
        "players": {p: tag or "base model" for p, tag in PLAYERS.items()},
        "judge_seconds": time.perf_counter() - started,
        "judge": {"model": "SmolLM2-135M-Instruct (the base model)", "instructions": judge_lib.JUDGE_INSTRUCTIONS},
        "questions": [{"id": q["id"], "task": q["task"], "answer": q.get("answer")} for q in questions],
        "answers": answers, "verdicts": verdicts, "reference_verdicts": reference_verdicts}
    results_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for tag in RANK_RUNS:
        tensors.update(load_file(str(out_dir / f"{tag}.safetensors")))
    save_file(tensors, str(results_dir / "rank_adapters.safetensors"), metadata={"steps": str(steps)})
    (results_dir / "judge.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--scored-per-task", type=int, default=3)
    parser.add_argument("--chat", type=int, default=6)
    parser.add_argument("--stage", default="all", help="base, one of the runs, or all (the default)")
    parser.add_argument("--out", default="runs/rank-and-judge")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    run(args.steps, args.scored_per_task, args.chat, args.max_length, args.out, args.results_dir, stage=args.stage)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
