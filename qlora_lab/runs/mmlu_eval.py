"""``python -m qlora_lab mmlu``: MMLU 5-shot (:mod:`qlora_lab.finetune.mmlu`) of a
finetuned adapter on its 4-bit base, or of a base model alone.

    python -m qlora_lab mmlu --adapter runs/guanaco-7b/adapter --data cais/mmlu
    python -m qlora_lab mmlu --model Qwen/Qwen2.5-7B --data data/mmlu --limit 500

The base is quantized as the run trained it (bitsandbytes while loading on a
GPU, the course's layers on a CPU; :func:`qlora_lab.after.chat.load_with_adapter`).
The whole test split is 14,042 questions: ``--limit`` scores the first N.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--adapter", help="the adapter directory a finetuning run wrote")
    parser.add_argument("--model", help="the base model (default with --adapter: the one the adapter names)")
    parser.add_argument("--data", default="cais/mmlu", help="cais/mmlu, or a downloaded copy of it (default cais/mmlu)")
    parser.add_argument("--split", default="test", choices=["test", "validation"])
    parser.add_argument("--shots", type=int, default=5, help="solved questions before each one (default 5, the paper's)")
    parser.add_argument("--limit", type=int, help="score only the first N questions")
    parser.add_argument("--max-length", type=int, default=2048, dest="max_length",
                        help="drop shots until a prompt fits this many tokens (default 2048)")
    parser.add_argument("--no-quantize", action="store_false", dest="quantize",
                        help="keep the base in float instead of NF4 + double quantization")


def run_from_args(args) -> int:
    from qlora_lab.after.chat import load_with_adapter
    from qlora_lab.finetune import mmlu
    from qlora_lab.models import load_model
    from qlora_lab.qlora import quantize_model

    if args.adapter is None and args.model is None:
        raise ValueError("mmlu needs --adapter DIR (a finetuned adapter) or --model NAME (a base model alone)")
    if args.shots < 0 or (args.limit is not None and args.limit < 1):
        raise ValueError("--shots must be 0 or more and --limit 1 or more")
    splits = mmlu.load_mmlu(args.data)  # the data first: a missing download stops before a model loads
    if args.adapter is not None:
        model, tokenizer = load_with_adapter(args.adapter, args.model, quantize=args.quantize)
    else:
        model, tokenizer = load_model(args.model)
        if args.quantize:
            quantize_model(model)
    result = mmlu.score(model, tokenizer, splits[args.split], splits["dev"], shots=args.shots,
                           max_length=args.max_length, limit=args.limit)
    print(f"{result} ({args.split} split, {args.shots}-shot; the paper's MMLU is 5-shot on the test split)")
    for subject, (correct, total) in sorted(result.per_subject.items()):
        print(f"  {subject:<40} {correct:>5}/{total:<5} {correct / total:.1%}")
    return 0
