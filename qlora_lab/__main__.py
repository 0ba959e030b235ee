r"""``python -m qlora_lab finetune``: the course's finale as a command.

    python -m qlora_lab finetune --preset smollm2-cpu --out runs/smollm2
    python -m qlora_lab finetune --preset llama-7b-gpu --model huggyllama/llama-7b --out runs/guanaco-7b
    python -m qlora_lab finetune --preset llama-7b-gpu --dry-run      # anywhere: configuration + memory per backend
    python -m qlora_lab finetune --preset smollm2-cpu --out runs/smollm2 --resume
    python -m qlora_lab gpu-smoke --model huggyllama/llama-7b          # both backends, a few steps on the GPU
    python -m qlora_lab gpu-check                                       # 7B-shaped random models on the GPU, offline
    torchrun --standalone --nproc_per_node 2 -m qlora_lab finetune --fsdp --preset smollm2-cpu --out runs/fsdp \
        --set gradient_accumulation_steps=2 --set batch_size=4   # the 2 processes share each step's micro-batches

Settings of a preset can be changed with ``--max-steps``, ``--model``, ``--data`` (the course's data set,
a hub data set such as ``timdettmers/openassistant-guanaco``, or a download of one), ``--data-format``,
``--train-on``, ``--backend`` or
``--set name=value`` (any field of ``qlora_lab.finetune.recipe.TrainConfig``). ``--backend`` chooses who builds
the model: ``bitsandbytes`` (transformers + bitsandbytes + peft, the default on CUDA) or ``qlora_lab``
(the course's layers, the default on a CPU); see ``qlora_lab.finetune.backends``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings

import qlora_lab  # noqa: F401  (quiets bitsandbytes before it is imported)


def _parse_value(text: str, current, optional: bool = False):
    """A --set value in the type of the field it replaces (``none`` clears an optional one)."""
    if (optional or current is None) and text.lower() == "none":
        return None
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    return text


def default_preset() -> str:
    """The preset a run without ``--preset`` uses: the 7B recipe where there is a CUDA GPU, else SmolLM2's."""
    import torch

    return "llama-7b-gpu" if torch.cuda.is_available() else "smollm2-cpu"


def default_out(config) -> str:
    """Where a run without ``--out`` writes: ``runs/<the model's name>``."""
    name = config.model.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1] or "model"
    return f"runs/{name}"


def resolve_config(args) -> "TrainConfig":  # noqa: F821
    from qlora_lab.finetune.recipe import PRESETS, TrainConfig, preset, renamed_hint

    if args.preset is None:
        args.preset = default_preset()
        print(f"preset: {args.preset} (the default on this machine; --preset chooses another)", file=sys.stderr)
    defaults = PRESETS[args.preset]
    overrides = {}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for item in args.set or []:
        if "=" not in item:
            raise ValueError(f"--set takes name=value, got {item!r}")
        name, value = item.split("=", 1)
        if not name:
            raise ValueError(f"--set takes name=value, got {item!r} (no name before '='); e.g. --set r=16")
        if name not in fields:
            raise ValueError(f"--set {name}: unknown setting{renamed_hint([name])}; valid settings: "
                             f"{', '.join(sorted(fields))}")
        try:
            overrides[name] = _parse_value(value, getattr(defaults, name), "None" in str(fields[name].type))
        except ValueError as err:
            raise ValueError(f"--set {name}={value}: {err}") from None
    for flag, name in [("model", "model"), ("data", "data"), ("max_steps", "max_steps"),
                       ("score", "score_examples"), ("backend", "backend"), ("train_on", "train_on"),
                       ("data_format", "data_format")]:
        if getattr(args, flag) is not None:
            overrides[name] = getattr(args, flag)
    if overrides.get("model", defaults.model) != defaults.model and "memory_config" not in overrides:
        overrides["memory_config"] = None  # the preset's stand-in config describes the preset's model, not this one
    return preset(args.preset, **overrides)


def _device_type(config) -> str:
    """The device a run would use: CUDA if there is one or the preset needs it."""
    import torch

    return "cuda" if torch.cuda.is_available() or config.requires_gpu else "cpu"


def finetune(args) -> int:
    from qlora_lab.finetune.plan import memory_estimate_text, memory_plan_text
    from qlora_lab.finetune.train import resolve_device, train

    config = resolve_config(args)
    if args.dry_run:
        device_type = _device_type(config)
        print("resolved configuration:")
        print(json.dumps(dataclasses.asdict(config), indent=2))
        print(memory_estimate_text(config, device_type))
        print(memory_plan_text(config, device_type))
        return 0
    if args.out is None:
        args.out = default_out(config)
        print(f"output: {args.out} (--out chooses another directory)", file=sys.stderr)
    device = resolve_device(config)  # refuses the GPU preset on a machine without a GPU
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    if args.fsdp:
        from qlora_lab.beyond.fsdp import train_fsdp

        result = train_fsdp(config, args.out, resume=args.resume, progress=args.progress,
                            dist_backend=args.dist_backend)
    else:
        result = train(config, args.out, resume=args.resume, progress=args.progress)
    if args.fsdp and not _is_rank0():
        return 0  # rank 0 reports for all
    first, last = result.evaluations[0], result.evaluations[-1]
    print(result.data)
    print(f"epochs: {config.max_steps} steps x {config.effective_batch_size} examples = {result.epochs:.2f} passes "
          f"over the training examples")
    print(f"trained {len(result.history)} steps with the {result.backend} backend"
          + (f" (resumed at step {result.resumed_from})" if result.resumed_from else ""))
    for key in ("eval_loss", "exact_match"):
        if key in last:
            before = f"{first[key]:.4f} at step {first['step']} -> " if key in first and first is not last else ""
            print(f"{key}: {before}{last[key]:.4f} at step {last['step']}")
    print(f"adapter (peft format): {result.adapter_dir}")
    if args.report_memory and device.type == "cuda":
        import torch

        peak = torch.cuda.max_memory_allocated()
        print(f"peak GPU memory allocated: {peak / 1e9:.2f} GB")
        print(memory_estimate_text(config, "cuda"))
    return 0


def _is_rank0() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def build_parser() -> argparse.ArgumentParser:
    from qlora_lab.finetune.chat_format import TRAIN_ON
    from qlora_lab.finetune.hub_data import DATA_FORMATS
    from qlora_lab.finetune.recipe import PRESETS

    parser = argparse.ArgumentParser(prog="python -m qlora_lab", description="qlora-lab commands")
    commands = parser.add_subparsers(dest="command", required=True)
    ft = commands.add_parser("finetune", help="QLoRA finetuning with the Guanaco recipe",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ft.add_argument("--preset", choices=sorted(PRESETS),
                    help="the recipe's settings (default: llama-7b-gpu where there is a CUDA GPU, else smollm2-cpu)")
    ft.add_argument("--model", help="model directory or hub id (smollm2 and tiny-llama are built in)")
    ft.add_argument("--data", help="the course's layout (a directory with train.jsonl and validation.jsonl; "
                                   "default: the course's data set), a hub data set (timdettmers/openassistant-"
                                   "guanaco), its download directory, or a .jsonl/.json/.parquet/.arrow file")
    ft.add_argument("--data-format", dest="data_format", choices=["auto", *DATA_FORMATS],
                    help="the data's schema (default auto: read from its columns; qlora_lab.finetune.hub_data)")
    ft.add_argument("--train-on", dest="train_on", choices=TRAIN_ON,
                    help="the loss on the assistant's replies (default) or on every token, as Guanaco was trained")
    ft.add_argument("--out", help="output directory for checkpoints, the adapter and metrics.json "
                                  "(default: runs/<the model's name>)")
    ft.add_argument("--max-steps", type=int, dest="max_steps")
    ft.add_argument("--backend", choices=["auto", "qlora_lab", "bitsandbytes"],
                    help="who builds the model: bitsandbytes (transformers + bitsandbytes + peft; default on CUDA) "
                         "or qlora_lab (the course's layers; default on a CPU)")
    ft.add_argument("--score", type=int, help="exact-match score this many validation items at each evaluation")
    ft.add_argument("--set", action="append", metavar="NAME=VALUE", help="change any setting (repeatable)")
    ft.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    ft.add_argument("--dry-run", action="store_true", dest="dry_run",
                    help="print the resolved configuration, the memory estimate and what each backend needs "
                         "(GPU, host memory to load, which GPUs fit), then stop")
    ft.add_argument("--progress", choices=["bar", "log", "none"], default="bar")
    ft.add_argument("--fsdp", action="store_true",
                    help="shard the run with FSDP2 across the processes torchrun starts (chapter 09): "
                         "torchrun --standalone --nproc_per_node N -m qlora_lab finetune --fsdp ...")
    ft.add_argument("--dist-backend", choices=["auto", "gloo", "nccl"], default="auto", dest="dist_backend",
                    help="with --fsdp: the process-group backend (auto: nccl on CUDA GPUs, gloo on CPUs)")
    ft.add_argument("--report-memory", action="store_true", dest="report_memory",
                    help="on a GPU: print the peak memory against the estimate at the end")
    from qlora_lab.runs.smoke import add_arguments

    add_arguments(commands.add_parser("gpu-smoke", help="both backends for a few steps on the GPU, side by side"))
    from qlora_lab.runs.gpu_check import add_arguments as add_check_arguments

    add_check_arguments(commands.add_parser("gpu-check", help="7B-shaped random models on the GPU, offline: bits, "
                                            "memory, loss, paging, reload"))
    from qlora_lab.runs import mmlu_eval

    mmlu_eval.add_arguments(commands.add_parser("mmlu", help="MMLU 5-shot of an adapter on its 4-bit base, or of a base"))
    ex = commands.add_parser("experiments", help="QLoRA vs 16-bit LoRA on SmolLM2, longer than CI allows")
    ex.add_argument("--steps", type=int, default=300)
    ex.add_argument("--out", default="runs/experiments", help="where the runs' checkpoints go")
    ex.add_argument("--results", default=None, help="the JSON file to write (default qlora_lab/results/experiments.json)")
    ex.add_argument("--per-task", type=int, default=None, dest="per_task",
                    help="score only this many test items per task (default: all)")
    from qlora_lab.runs import after_commands

    after_commands.add_commands(commands)
    return parser


def experiments(args) -> int:
    from qlora_lab.runs.experiments import run
    from qlora_lab.support.resources import EXPERIMENT_RESULTS

    summary = run(steps=args.steps, out_dir=args.out, results=args.results or EXPERIMENT_RESULTS, per_task=args.per_task)
    print(f"before: exact match {summary['before']['exact_match']:.1%}")
    for method, r in summary["runs"].items():
        print(f"{method}: exact match {r['test']['exact_match']:.1%} after {args.steps} steps ({r['seconds'] / 60:.1f} min)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # a run's preflight warnings read as one line each, as errors do
        shown = warnings.showwarning

        def show(message, category, *where, **kw):
            from qlora_lab.finetune.step import PreflightWarning  # imported once a run warns (torch is loaded)

            if issubclass(category, PreflightWarning):
                print(f"warning: {message}", file=sys.stderr)
            else:
                shown(message, category, *where, **kw)

        warnings.showwarning = show
        return run_command(args)


def run_command(args) -> int:
    try:
        if args.command == "finetune":
            return finetune(args)
        if args.command == "experiments":
            return experiments(args)
        if args.command in ("chat", "export", "after-finetuning"):
            from qlora_lab.runs.after_commands import COMMANDS

            return COMMANDS[args.command](args)
        if args.command == "mmlu":
            from qlora_lab.runs.mmlu_eval import run_from_args as run_mmlu

            return run_mmlu(args)
        if args.command == "gpu-check":
            from qlora_lab.runs.gpu_check import run_from_args as check_from_args

            return check_from_args(args)
        if args.command == "gpu-smoke":
            from qlora_lab.runs.smoke import run_from_args

            return run_from_args(args)
    except (ValueError, OSError, RuntimeError) as err:  # OSError: a missing file, an existing run, a full disk
        print(f"error: {err}", file=sys.stderr)
        if "gated" in str(err).lower():  # a licensed model (Llama 3.1, Mistral): the hub wants a login and a yes
            print("hint: accept the model's licence on its hub page, then log in on this machine with "
                  "`hf auth login` (or set HF_TOKEN)", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
