"""``make gpu-smoke``: the 7B recipe on a teacher's GPU, both backends side by side.

No GPU is lent to this project, so the CUDA paths of chapter 07 are checked
here, once, on the teacher's hardware before a seminar:

1. ``python -m qlora_lab finetune`` runs for a few optimizer steps with each
   backend (:mod:`qlora_lab.finetune.backends`), each in a fresh process so that one
   backend's GPU memory cannot be counted against the other: ``bitsandbytes``
   (transformers' 4-bit loading, bitsandbytes' CUDA kernels and paged AdamW,
   peft) and ``qlora_lab`` (the streaming 4-bit load and the course's layers,
   with the same paged AdamW).
2. For each: the peak GPU memory PyTorch allocated against
   ``qlora_lab.memory``'s estimate of the step's peak for the run
   (:func:`qlora_lab.finetune.plan.run_estimate`) without the Adam states, which
   bitsandbytes' paged AdamW keeps in CUDA unified memory, outside PyTorch's
   allocations; the estimate with them; the GPU memory in use at the end
   (``cudaMemGetInfo``: everything, the CUDA context and the paged states
   included); tokens per second over the steps after the first; and the
   losses of the steps side by side.
3. The ``bitsandbytes`` run is resumed from its checkpoint one step before
   the end (the checkpoint read back with ``weights_only=True``, the paged
   optimizer's states and CUDA's random generators restored) and redoes the
   last step.
4. It fails loudly (exit code 1, one line saying what) when a run fails, a
   loss is not finite, the two backends' losses differ by more than
   ``--tolerance`` (relative, default 1%), or the resumed step's loss differs
   from the first time's by more than that.

Why 1%: both backends start from the same weights and adapters and see the
same batches. They differ in rounding: bitsandbytes' ``Linear4bit`` under peft
rounds the adapter's output to bfloat16 before adding it (about 0.4% per
element), the course's layer adds in float32 and rounds once; and the 8-bit
codes of a few block constants may differ (chapter 03). Averaged over the
thousands of tokens of a step that stays near 0.1%; a step that computes
something else (a wrong dequantization, a dtype mix-up) moves a 7B model's
loss by far more.

Without a GPU the command says so in one line and exits with 1. ``--cpu``
runs the same comparison on the CPU with the ``smollm2-cpu`` preset (no GPU
figures); the course's tests use it with tiny-llama.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

SMOKE_TOLERANCE = 0.01
BACKEND_ORDER = ("bitsandbytes", "qlora_lab")


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="huggyllama/llama-7b",
                        help="hub id or local directory of the model (default huggyllama/llama-7b)")
    parser.add_argument("--data", help="directory with train.jsonl and validation.jsonl (default: the course's)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per backend (default 5)")
    parser.add_argument("--tolerance", type=float, default=SMOKE_TOLERANCE,
                        help=f"largest relative difference of the two backends' losses (default {SMOKE_TOLERANCE})")
    parser.add_argument("--out", default="runs/gpu-smoke", help="where the two runs go (default runs/gpu-smoke)")
    parser.add_argument("--cpu", action="store_true",
                        help="run the comparison on the CPU with the smollm2-cpu preset (checks the command itself)")


def compare_losses(first: list[float], second: list[float], tolerance: float) -> str | None:
    """Why two backends' losses disagree, or None if they agree: the same
    number of steps, every loss finite, and ``|a - b| <= tolerance * |b|``."""
    if len(first) != len(second) or not first:
        return f"the runs took {len(first)} and {len(second)} steps"
    for step, (a, b) in enumerate(zip(first, second), start=1):
        if not (math.isfinite(a) and math.isfinite(b)):
            return f"the loss of step {step} is not finite ({a} and {b})"
        if abs(a - b) > tolerance * abs(b):
            return (f"the losses of step {step} differ by {abs(a - b) / abs(b):.2%} ({a:.4f} and {b:.4f}), "
                    f"more than the tolerance of {tolerance:.2%}")
    return None


def _tokens_per_second(history: list[dict]) -> float:
    steps = history[1:] or history  # the first step warms up kernels and allocators
    return sum(h["tokens"] for h in steps) / sum(h["seconds"] for h in steps)


def finetune_command(backend: str, args, out: Path, resume: bool = False) -> list[str]:
    """The ``python -m qlora_lab finetune`` command of one backend's run: a
    checkpoint one step before the end, so that a resumed run can redo the last step."""
    preset = "smollm2-cpu" if args.cpu else "llama-7b-gpu"
    command = [sys.executable, "-m", "qlora_lab", "finetune", "--preset", preset, "--model", args.model,
               "--backend", backend, "--out", str(out), "--max-steps", str(args.steps), "--progress", "log",
               "--set", f"eval_every={args.steps}", "--set", "eval_examples=16",
               "--set", f"save_every={max(args.steps - 1, 1)}"]
    return command + (["--data", args.data] if args.data else []) + (["--resume"] if resume else [])


def execute(command: list[str]) -> subprocess.CompletedProcess:
    """Run a command in a fresh process (one backend's GPU memory must not
    count against the other's), capturing what it prints."""
    return subprocess.run(command, capture_output=True, text=True, check=False)


def run_backend(backend: str, args, out: Path, resume: bool = False) -> dict:
    """One backend's run; its metrics, or a RuntimeError with the tail of
    what it printed."""
    command = finetune_command(backend, args, out, resume)
    print(f"[{backend}] {' '.join(command[1:])}", flush=True)
    done = execute(command)
    for line in done.stdout.splitlines():
        print(f"[{backend}] {line}", flush=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-12:])
        raise RuntimeError(f"the {backend} run failed (exit code {done.returncode}):\n{tail}")
    return json.loads((out / "metrics.json").read_text())


def run_from_args(args) -> int:
    import torch

    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if not args.cpu and not torch.cuda.is_available():
        print("gpu-smoke needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False); "
              "the CPU parts are checked by make test.", file=sys.stderr)
        return 1
    from qlora_lab.finetune.plan import run_estimate
    from qlora_lab.finetune.recipe import preset

    config = preset("smollm2-cpu" if args.cpu else "llama-7b-gpu", model=args.model, max_steps=args.steps)
    device = "cpu" if args.cpu else f"{torch.cuda.get_device_name(0)}, " \
        f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB"
    print(f"gpu-smoke: {args.model}, {args.steps} steps per backend, on {device}", flush=True)
    try:
        estimate = run_estimate(config, "cpu" if args.cpu else "cuda")
    except (ValueError, OSError):
        estimate = None  # e.g. tiny-llama, which has no config on disk
    out = Path(args.out)
    metrics = {}
    for backend in BACKEND_ORDER:
        shutil.rmtree(out / backend, ignore_errors=True)  # a previous smoke test's run
        try:
            metrics[backend] = run_backend(backend, args, out / backend)
        except RuntimeError as err:
            print(f"FAILED: {err}", file=sys.stderr)
            return 1
    print(report(metrics, estimate))
    losses = {b: [h["loss"] for h in m["history"]] for b, m in metrics.items()}
    problem = compare_losses(losses["bitsandbytes"], losses["qlora_lab"], args.tolerance)
    if problem is None and args.steps >= 2:
        # Resuming reads the checkpoint back (weights_only) with the device's
        # optimizer states and random generators: redo the last step from it.
        try:
            resumed = run_backend(BACKEND_ORDER[0], args, out / BACKEND_ORDER[0], resume=True)
        except RuntimeError as err:
            print(f"FAILED: resuming: {err}", file=sys.stderr)
            return 1
        redone = resumed["history"][-1]["loss"]
        print(f"resumed {BACKEND_ORDER[0]} at step {args.steps - 1}: step {args.steps} loss {redone:.5f}, "
              f"{losses[BACKEND_ORDER[0]][-1]:.5f} the first time")
        problem = compare_losses([redone], losses[BACKEND_ORDER[0]][-1:], args.tolerance)
        problem = problem and f"after resuming, {problem}"
    if problem:
        print(f"FAILED: {problem}", file=sys.stderr)
        return 1
    print(f"OK: both backends ran {args.steps} steps and their losses agree within {args.tolerance:.2%}"
          + (f"; a resumed run redid step {args.steps} alike." if args.steps >= 2 else "."))
    return 0


def report(metrics: dict[str, dict], estimate) -> str:
    """The side-by-side table of the two runs."""
    gb = 1e9
    lines = [f"{'':<34}" + "".join(f"{b:>16}" for b in metrics)]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"{label:<34}" + "".join(f"{v:>16}" for v in values))

    if all("peak_gpu_allocated_bytes" in m for m in metrics.values()):
        peaks = [m["peak_gpu_allocated_bytes"] for m in metrics.values()]
        row("peak GPU memory allocated", [f"{p / gb:.2f} GB" for p in peaks])
        if estimate is not None:
            # Paged AdamW keeps its states in unified memory, outside PyTorch's allocations.
            outside = estimate.peak - estimate.optimizer
            row("estimate of that (no Adam states)", [f"{outside / gb:.2f} GB"] * len(peaks))
            row("allocated / estimate", [f"{p / outside:.3f}" for p in peaks])
            row("estimated peak with Adam states", [f"{estimate.peak / gb:.2f} GB"] * len(peaks))
        row("GPU in use at the end", [f"{m['gpu_used_bytes_at_end'] / gb:.2f} GB" for m in metrics.values()])
    else:
        row("peak GPU memory", ["(on the CPU)"] * len(metrics))
    row("tokens per second", [f"{_tokens_per_second(m['history']):,.0f}" for m in metrics.values()])
    histories = [m["history"] for m in metrics.values()]
    for i in range(min(len(h) for h in histories)):
        row(f"loss at step {i + 1}", [f"{h[i]['loss']:.5f}" for h in histories])
    return "\n".join(lines)
