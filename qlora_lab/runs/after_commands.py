"""The commands of chapter 08, after finetuning: ``chat``, ``export`` and
``after-finetuning`` (``python -m qlora_lab <command> --help``).

    python -m qlora_lab chat --adapter runs/smollm2/adapter --prompt "Sort these words: pear, fig"
    python -m qlora_lab export --adapter runs/smollm2/adapter --out exported --format gguf

``chat`` loads the base in 4 bits as the run trained it (:func:`qlora_lab.after.chat.load_with_adapter`:
bitsandbytes while loading on a GPU, the course's layers on a CPU) and streams each reply.
"""

from __future__ import annotations

import sys


def add_commands(commands) -> None:
    """``chat``, ``export`` and ``after-finetuning`` (chapter 08)."""
    ch = commands.add_parser("chat", help="chat with a base model plus an adapter (tokens streamed)")
    ch.add_argument("--adapter", required=True, help="the adapter directory a finetuning run wrote")
    ch.add_argument("--model", help="base model name or directory (default: the one the adapter names)")
    ch.add_argument("--prompt", help="answer this one message and exit (no interactive session)")
    ch.add_argument("--max-new-tokens", type=int, default=128, dest="max_new_tokens")
    ch.add_argument("--no-quantize", action="store_false", dest="quantize",
                    help="keep the base in float instead of NF4 + double quantization (as QLoRA trained it)")
    exp = commands.add_parser("export", help="merge an adapter into its base and write a transformers directory or GGUF")
    exp.add_argument("--adapter", required=True, help="the adapter directory a finetuning run wrote")
    exp.add_argument("--model", help="base model name or directory (default: the one the adapter names)")
    exp.add_argument("--out", required=True, help="a new directory to write (never overwritten)")
    exp.add_argument("--format", default="hf", help="hf (transformers directory) or gguf (llama.cpp, Ollama)")
    exp.add_argument("--gguf-type", default="f16", dest="gguf_type", help="with --format gguf: f16 or q8_0")
    exp.add_argument("--base", default="nf4", help="nf4: merge into the dequantized 4-bit base the adapter was "
                                                  "trained with (default); float: into the float checkpoint")
    exp.add_argument("--dtype", default=None, help="with --format hf: float32, float16 or bfloat16 weights")
    af = commands.add_parser("after-finetuning", help="chapter 08's longer runs: task adapters, scores after "
                                                      "merging, tokens/s (writes qlora_lab/results/)")
    af.add_argument("--steps", type=int, default=16)
    af.add_argument("--out", default="runs/after-finetuning", help="where the training runs go")
    af.add_argument("--retrain", action="store_true", help="train the adapters again even if they are committed")
    af.add_argument("--per-task", type=int, default=None, dest="per_task",
                    help="score only this many test questions per task (default: all 50)")
    af.add_argument("--parts", default="scores,gguf,speed", help="which measurements (comma-separated): "
                                                                "scores, gguf, speed")


def chat(args) -> int:
    from qlora_lab.after.chat import chat_loop, load_with_adapter, reply

    model, tokenizer = load_with_adapter(args.adapter, args.model, quantize=args.quantize)
    if args.prompt is not None:
        reply(model, tokenizer, args.prompt, args.max_new_tokens, stream=sys.stdout)
        print()
        return 0
    chat_loop(model, tokenizer, max_new_tokens=args.max_new_tokens)
    return 0


def export(args) -> int:
    import torch

    from qlora_lab.after.export import export as run_export

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if args.dtype is not None and args.dtype not in dtypes:
        raise ValueError(f"--dtype must be one of {', '.join(dtypes)}, got {args.dtype!r}")
    path = run_export(args.adapter, args.out, args.format, args.model, args.base, args.gguf_type,
                      dtypes.get(args.dtype))
    print(f"wrote {path}")
    return 0


def after_finetuning(args) -> int:
    from qlora_lab.runs.after_finetuning import run

    summary = run(steps=args.steps, out_dir=args.out, retrain=args.retrain, per_task=args.per_task,
                  parts=tuple(args.parts.split(",")))
    for task, r in summary.get("scores", {}).items():
        print(task, {k: f"{v['correct']}/{v['total']}" for k, v in r.items()})
    for name, tokens_per_second in summary.get("speed", {}).items():
        print(f"{name}: {tokens_per_second:.1f} tokens/s")
    return 0


COMMANDS = {"chat": chat, "export": export, "after-finetuning": after_finetuning}
