"""Run the benchmarks and write their results as one Markdown page.

    .venv/bin/python bench/run_all.py                     # what `make bench` runs; writes bench/RESULTS.md
    .venv/bin/python bench/run_all.py --skip seven_b --threads 1 --output /tmp/results.md

In this order, each in its own process:

1. ``bench/quantize.py``: 4-bit quantize/dequantize throughput, qlora_lab
   against bitsandbytes (its output is copied as it is).
2. ``bench/train_step.py``: a QLoRA training step on SmolLM2, qlora_lab
   against transformers + bitsandbytes + peft, and 16-bit LoRA, each in a
   fresh process (time and peak memory); then ``--interleave`` with the two
   QLoRA variants, whose steps taken in turn give the throughput ratio.
3. ``bench/seven_b.py``: one QLoRA step of LLaMA-7B's architecture, peak
   memory and time, with the memory estimate; with the recipe's 32-bit
   AdamW states.
4. ``bench/seven_b.py --optimizer adamw8``: the same step with 8-bit AdamW
   states (``seven_b_8bit``), which take a quarter of the memory.

The page records the date, the machine (CPU, cores, memory), the library
versions and the load average, since every timing depends on them. A
benchmark that fails is reported on the page and makes the exit code 1; the
others still run. ``--model``, ``--config`` and the size options exist so
that the tests can run the whole pipeline on a tiny model in seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _shared  # noqa: E402

BENCHMARKS = ("quantize", "train_step", "seven_b", "seven_b_8bit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"),
                        help="the Markdown file to write (default bench/RESULTS.md)")
    parser.add_argument("--json-dir", default=None,
                        help="keep each benchmark's raw results as NAME.json in this directory (default: discard)")
    parser.add_argument("--skip", nargs="+", default=[], choices=BENCHMARKS, metavar="NAME",
                        help=f"benchmarks not to run ({', '.join(BENCHMARKS)})")
    parser.add_argument("--threads", type=_shared.positive_int, default=None,
                        help="torch threads for every benchmark (default: PyTorch's choice)")
    parser.add_argument("--quantize-shapes", nargs="+", default=None, metavar="ROWSxCOLUMNS",
                        help="quantize.py --shapes (default: its table of the course's and a 7B model's shapes)")
    parser.add_argument("--quantize-runs", type=_shared.positive_int, default=21,
                        help="quantize.py --runs (default 21)")
    parser.add_argument("--model", default="smollm2", help="train_step.py --model (default smollm2)")
    parser.add_argument("--batch", type=_shared.positive_int, default=8, help="train_step.py --batch (default 8)")
    parser.add_argument("--seq-len", type=_shared.positive_int, default=256,
                        help="train_step.py --seq-len (default 256)")
    parser.add_argument("--steps", type=_shared.positive_int, default=5, help="train_step.py --steps (default 5)")
    parser.add_argument("--config", default="llama-7b", help="seven_b.py --config (default llama-7b)")
    parser.add_argument("--seven-b-seq-len", type=_shared.positive_int, default=256,
                        help="seven_b.py --seq-len (default 256)")
    args = parser.parse_args(argv)
    if len(set(args.skip)) == len(BENCHMARKS):
        parser.error("--skip leaves nothing to run")
    output = Path(args.output)
    if not output.parent.is_dir():
        parser.error(f"--output: the directory {output.parent} does not exist")
    if args.json_dir is not None and not Path(args.json_dir).is_dir():
        parser.error(f"--json-dir: {args.json_dir} is not a directory")
    return args


def _run(command: list[str]) -> tuple[int, str, str]:
    """Run ``command``, echoing its output as it comes; ``(exit code, stdout, stderr)``."""
    print("$ " + " ".join(command), flush=True)
    lines = []
    with tempfile.TemporaryFile(mode="w+") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        for line in process.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        code = process.wait()
        stderr.seek(0)
        errors = stderr.read()
    sys.stderr.write(errors)
    return code, "".join(lines), errors


def _threads(args) -> list[str]:
    return [] if args.threads is None else ["--threads", str(args.threads)]


def run_benchmarks(args, workdir: Path) -> dict[str, dict]:
    """Run each benchmark; ``{name: {"ok", "stdout", "error", "json"}}``."""
    seven_b = ["seven_b.py", "--config", args.config, "--seq-len", str(args.seven_b_seq_len), *_threads(args)]
    train_step = ["train_step.py", "--model", args.model, "--batch", str(args.batch),
                  "--seq-len", str(args.seq_len), "--steps", str(args.steps), *_threads(args)]
    commands = {
        "quantize": ["quantize.py", *(["--shapes", *args.quantize_shapes] if args.quantize_shapes else []),
                     "--runs", str(args.quantize_runs), *_threads(args)],
        "train_step": train_step,
        # Part of "train_step": the throughput ratio of record (see its section).
        "train_step_turns": [*train_step, "--variants", "qlora_lab", "bitsandbytes", "--interleave"],
        "seven_b": seven_b,
        "seven_b_8bit": [*seven_b, "--optimizer", "adamw8"],
    }
    outcomes = {}
    for name, command in commands.items():
        if name.removesuffix("_turns") in args.skip:
            continue
        json_path = workdir / f"{name}.json"
        # quantize.py (chapter 02) prints a table and has no --json.
        extra = [] if name == "quantize" else ["--json", str(json_path)]
        code, stdout, stderr = _run([sys.executable, str(HERE / command[0]), *command[1:], *extra])
        outcomes[name] = {
            "ok": code == 0,
            "command": " ".join(["bench/" + command[0], *command[1:]]),
            "stdout": stdout,
            "error": "" if code == 0 else (stderr.strip().splitlines() or [f"exit code {code}"])[-1],
            "json": json.loads(json_path.read_text()) if code == 0 and json_path.exists() else None,
        }
    if "train_step_turns" in outcomes:
        turns = outcomes["train_step"]["turns"] = outcomes.pop("train_step_turns")
        if not turns["ok"]:
            outcomes["train_step"].update(ok=False, error=f"{turns['command']}: {turns['error']}")
    return outcomes


# --------------------------------------------------------------------------- #
# The Markdown page
# --------------------------------------------------------------------------- #
def _failed(outcome: dict) -> str:
    return f"**Failed:** `{outcome['error']}`\n"


def quantize_section(outcome: dict) -> str:
    text = f"Command: `{outcome['command']}`\n\n"
    if not outcome["ok"]:
        return text + _failed(outcome)
    return text + "```text\n" + outcome["stdout"].strip() + "\n```\n"


SHORT_NAMES = {
    "qlora_lab": "qlora_lab (`quantize_model` + `add_lora`)",
    "bitsandbytes": "transformers `BitsAndBytesConfig` + peft",
    "lora16": "16-bit LoRA (bf16 weights, peft)",
}


def _model_name(model_dir: str) -> str:
    name = Path(model_dir).name
    return "SmolLM2-135M-Instruct" if name.startswith("smollm2-135m-instruct") else f"`{name}`"


def train_step_section(outcome: dict) -> str:
    text = f"Command: `{outcome['command']}`\n\n"
    if not outcome["ok"]:
        return text + _failed(outcome)
    data = outcome["json"]
    s, results = data["settings"], data["results"]
    first = next(iter(results.values()))
    checkpointing = "on" if s["gradient_checkpointing"] else "off"
    text += (f"{_model_name(s['model_dir'])}, NF4 with double quantization and fp32 compute, "
             f"LoRA r={s['lora_r']} on all linear layers, batch {s['batch']} x {s['seq_len']} tokens, "
             f"gradient checkpointing {checkpointing}, AdamW; median of {s['steps']} steps after "
             f"{s['warmup']} warm-up; {first['threads']} torch threads; each variant in a fresh process. "
             f"Load average at start {data['load_average']['start']}.\n\n")
    text += ("| variant | build s | median step s | tokens/s | peak MB | weights MB |\n"
             "|---|---:|---:|---:|---:|---:|\n")
    for name, r in results.items():
        text += (f"| {SHORT_NAMES[name]} | {r['build_seconds']:.1f} | {r['median_step_seconds']:.2f} | "
                 f"{r['tokens_per_second']:.1f} | {r['peak_bytes'] / _shared.MB:.0f} | "
                 f"{r['weights_bytes'] / _shared.MB:.1f} |\n")
    ratios = data.get("ratios")
    turns = outcome.get("turns")
    if ratios:
        text += f"\nOurs / bitsandbytes: **peak memory {ratios['peak_memory']:.3f}** (target <= 1.0)"
        if turns is None:
            text += f", **throughput {ratios['throughput']:.3f}** (target >= 1.0).\n"
        else:
            text += (f"; throughput {ratios['throughput']:.3f} from the table, whose variants ran minutes "
                     "apart (the ratio of record is below).\n")
    if turns is not None and turns["ok"]:
        runs = turns["json"]["results"]
        pairs = turns["json"]["ratios"]["pairs"]
        ours, theirs = runs["qlora_lab"], runs["bitsandbytes"]
        text += (f"\n**Steps taken in turn** (`{turns['command']}`): both QLoRA models in one process, step i "
                 f"of ours then step i of bitsandbytes', so a change in the machine's load hits both. Median "
                 f"step {ours['median_step_seconds']:.2f} s (ours) and {theirs['median_step_seconds']:.2f} s "
                 f"(bitsandbytes); per-step ratios " + ", ".join(f"{r:.3f}" for r in pairs)
                 + f". Ours / bitsandbytes: **throughput {turns['json']['ratios']['throughput']:.3f}** (median; "
                 "target >= 1.0).\n")
    text += ("\nPeak MB: highest resident set during the measured steps minus the process's resident set after "
             "its imports (kernel high-water mark); float32 weights that transformers leaves as views of the "
             "memory-mapped file are copied first, in every variant. Weights MB: bytes of parameters and buffers. "
             "Build: loading (and for bitsandbytes quantizing while loading), excluded from the step times.\n")
    return text


def seven_b_section(outcome: dict) -> str:
    text = f"Command: `{outcome['command']}`\n\n"
    if not outcome["ok"]:
        return text + _failed(outcome)
    data = outcome["json"]
    r, s = data["result"], data["settings"]
    size = _shared.human_bytes
    above = r["step_peak_bytes"] - r["runtime_bytes"]
    text += (f"`{s['config']}` architecture with random weights, {r['layers']} layers, "
             f"{r['parameters'] / 1e9:.2f} B parameters ({r['quantized_weights'] / 1e9:.2f} B "
             f"in NF4 + double quantization), LoRA r={s['lora_r']} on all linear layers "
             f"({r['trainable_parameters'] / 1e6:.1f} M trainable, bf16), gradient checkpointing, "
             f"{s['compute_dtype']} compute in the 4-bit layers, bitsandbytes AdamW with "
             f"{s['optimizer'][5:]}-bit states; one step "
             f"of batch {s['batch']} x {s['seq_len']} tokens; {r['threads']} torch threads. Load average at start "
             f"{data['load_average']['start']}.\n\n")
    text += "| | |\n|---|---:|\n"
    rows = [
        ("peak resident set during the step, whole process", size(r["step_peak_bytes"])),
        ("of which above the runtime (Python, torch, libraries)", size(above)),
        ("`qlora_lab.memory.estimate`, same setting (tensors only)", size(data["estimate_peak_bytes"])),
        ("measured above the runtime / estimate", f"{above / data['estimate_peak_bytes']:.3f}"),
        ("estimate for full 16-bit finetuning, same setting", size(data["full16_estimate_peak_bytes"])),
        ("step time (forward / backward / optimizer)",
         f"{r['step_seconds']:.1f} s ({r['forward_seconds']:.1f} / {r['backward_seconds']:.1f} / "
         f"{r['optimizer_seconds']:.1f})"),
        ("building the model (generate / quantize weights)",
         f"{r['build_seconds']:.1f} s ({r['generate_seconds']:.1f} / {r['quantize_seconds']:.1f})"),
    ]
    text += "".join(f"| {label} | {value} |\n" for label, value in rows)
    return text


SECTIONS = {
    "quantize": ("4-bit quantize and dequantize: qlora_lab against bitsandbytes", quantize_section),
    "train_step": ("A QLoRA training step: qlora_lab against transformers + bitsandbytes + peft",
                   train_step_section),
    "seven_b": ("One QLoRA training step of a 7B model on this CPU", seven_b_section),
    "seven_b_8bit": ("The same 7B step with 8-bit AdamW states", seven_b_section),
}


SPEED_CHOICES = HERE / "speed_choices.md"
"""The hand-kept table of what each speed choice of ``qlora_lab/fast/`` gained."""


def markdown(outcomes: dict[str, dict], machine: dict, load_start: str, started: datetime.datetime) -> str:
    v = machine["versions"]
    lines = [
        "# Benchmark results",
        "",
        f"Written by `make bench` (`bench/run_all.py`) on {started:%Y-%m-%d %H:%M} UTC. Timings depend on the "
        "machine and on whatever else ran on it; see `bench/README.md` for what each benchmark measures.",
        "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB memory, {machine['os']}, "
        f"torch CPU capability {machine['cpu_capability']}",
        f"- Versions: Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"peft {v['peft']}, bitsandbytes {v['bitsandbytes']}, qlora_lab {v['qlora_lab']}",
        f"- Load average (1, 5, 15 min) at start: {load_start}",
        "",
    ]
    for number, (name, (title, section)) in enumerate(SECTIONS.items(), start=1):
        if name in outcomes:
            lines += [f"## {number}. {title}", "", section(outcomes[name])]
    # The dated measurements behind qlora_lab/fast/'s choices are kept by hand
    # (they are not re-run) and carried into every RESULTS.md unchanged.
    lines += [SPEED_CHOICES.read_text().rstrip()]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = _shared.load_average()
    machine = _shared.machine()
    if args.threads is not None:
        machine["torch_threads"] = args.threads
    if args.json_dir is not None:
        outcomes = run_benchmarks(args, Path(args.json_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="qlora-lab-bench-") as workdir:
            outcomes = run_benchmarks(args, Path(workdir))
    Path(args.output).write_text(markdown(outcomes, machine, load_start, started))
    failed = [name for name, o in outcomes.items() if not o["ok"]]
    print(f"\nwrote {args.output}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
