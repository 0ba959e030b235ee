"""Training-step speed and memory of QLoRA on SmolLM2: qlora_lab against
transformers + bitsandbytes + peft, with 16-bit LoRA as a reference.

    .venv/bin/python bench/train_step.py                      # the default setting below
    .venv/bin/python bench/train_step.py --steps 3 --threads 1
    .venv/bin/python bench/train_step.py --variants qlora_lab bitsandbytes --profile torch

The setting (QLoRA Sec. 4 recipe scaled to a CPU): SmolLM2-135M-Instruct, LoRA
r=16, alpha=16, no dropout, on every linear layer except the lm_head, batch
8 x 256 tokens, gradient checkpointing (the recipe's; ``--no-gradient-checkpointing``
turns it off), PyTorch AdamW, lr 2e-4. The variants:

  qlora_lab     the model loaded in float32, ``qlora_lab.qlora.quantize_model``
                (NF4, double quantization, blocks of 64, fp32 compute), then
                ``qlora_lab.lora.add_lora``.
  bitsandbytes  ``AutoModelForCausalLM.from_pretrained`` with
                ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)``,
                then peft's ``get_peft_model`` with ``target_modules="all-linear"``.
  lora16        the reference without quantization: the model in bfloat16
                (weights and activations), peft LoRA (peft keeps adapters in fp32).

How it is measured. Each variant runs in its own fresh Python process (so
that nothing else lives in its memory), one after the other. The process
imports torch, transformers, peft, bitsandbytes and qlora_lab and
records its resident set size: the *runtime* baseline, subtracted from every
figure. It
builds the model (the time is reported as "build", and excluded from the
step times: loading with BitsAndBytesConfig quantizes on the CPU), gives
every plain parameter its own memory (transformers keeps float32 weights as
views of the memory-mapped safetensors file, which would put the pages of
the whole file that loading touched into the resident set, in one variant
and not in another; see ``qlora_lab.support.measure.own_parameter_memory``), runs
``--warmup`` training steps (they create AdamW's states and initialise the
kernels), then ``--steps`` measured steps (forward with the loss, backward,
``AdamW.step``, ``zero_grad``), each on a fresh batch of random token ids
from a seeded generator. Reported: the median step time, tokens/s = batch x
seq_len / median, and the peak resident set during the measured steps from
the kernel's high-water mark (``VmHWM`` after a reset through
``/proc/self/clear_refs``) minus the runtime baseline. glibc is told to hand
every freed block above 64 KiB back to the kernel (``MALLOC_MMAP_THRESHOLD_``),
so the resident set follows live tensors; this is chapter 03's method
(``qlora_lab.memory.measured_step.measure_training_step``). "weights" is the bytes of the
model's parameters and buffers (``qlora_lab.qlora.memory_footprint``).

The ratios printed at the end are ours over bitsandbytes': throughput (above
1: ours is faster; target >= 1.0) and peak memory (below 1: ours needs less;
target <= 1.0). Timings depend on everything else that runs on the machine:
the load average is printed with them, and ``--threads`` pins torch's thread
count (with more busy threads than cores, OpenMP's spinning threads can slow
a step down many times). Fresh processes run minutes apart, so a change in the
load between them moves their throughput ratio: on the course's "idle" 2-core
VM three such runs gave 0.973, 1.027 and 1.193 (the last of one step). ``--interleave`` takes the
variants' steps in turn in one process (memory figures are then not
separable) and reports the median of the per-step ratios, which such a change
hits on both sides alike; ``make bench`` takes the throughput ratio from there
and the memory from the fresh processes.

``--profile torch`` (or ``cprofile``) runs one more step per variant under
``torch.profiler`` (or Python's ``cProfile``) after the measurement and prints
where its time went.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import qlora_lab  # noqa: F401  (before bitsandbytes: silences a CPU-dependent warning)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _shared  # noqa: E402

from qlora_lab.support.measure import report  # noqa: E402

VARIANTS = {
    "qlora_lab": "qlora_lab quantize_model + add_lora (NF4, double quant, fp32 compute)",
    "bitsandbytes": "transformers BitsAndBytesConfig (NF4, double quant, fp32 compute) + peft",
    "lora16": "16-bit LoRA: bf16 weights and compute, peft (no quantization)",
}
PROFILERS = ("none", "torch", "cprofile")
LEARNING_RATE = 2e-4


# --------------------------------------------------------------------------- #
# The three ways to build a QLoRA (or LoRA) model
# --------------------------------------------------------------------------- #
def _from_pretrained(model_dir: str, dtype: torch.dtype):
    from qlora_lab.models import load_model

    return load_model(model_dir, dtype=dtype, with_tokenizer=False)


def _peft_lora(model, r: int, alpha: float):
    from qlora_lab.finetune.backends import peft_lora

    return peft_lora(model, r, alpha, dropout=0.0, target_modules="all-linear")


def build_qlora_lab(model_dir: str, r: int, alpha: float) -> tuple[torch.nn.Module, dict]:
    from qlora_lab.lora import add_lora
    from qlora_lab.qlora import quantize_model

    start = time.perf_counter()
    model = _from_pretrained(model_dir, torch.float32)
    loaded = time.perf_counter()
    quantize_model(model, quant_type="nf4", double_quant=True, blocksize=64, compute_dtype=torch.float32)
    quantized = time.perf_counter()
    add_lora(model, r=r, alpha=alpha, dropout=0.0, target_modules="all-linear")
    return model, {"load_seconds": loaded - start, "quantize_seconds": quantized - loaded}


def build_bitsandbytes(model_dir: str, r: int, alpha: float) -> tuple[torch.nn.Module, dict]:
    from qlora_lab.finetune.backends import bitsandbytes_qlora_model

    start = time.perf_counter()
    # transformers quantizes while it loads: the two cannot be timed apart
    # (the load time includes peft's wrapping, a few milliseconds).
    model = bitsandbytes_qlora_model(model_dir, r, alpha, compute_dtype=torch.float32)
    return model, {"load_seconds": time.perf_counter() - start, "quantize_seconds": None}


def build_lora16(model_dir: str, r: int, alpha: float) -> tuple[torch.nn.Module, dict]:
    start = time.perf_counter()
    model = _from_pretrained(model_dir, torch.bfloat16)
    loaded = time.perf_counter()
    return _peft_lora(model, r, alpha), {"load_seconds": loaded - start, "quantize_seconds": None}


BUILDERS = {"qlora_lab": build_qlora_lab, "bitsandbytes": build_bitsandbytes, "lora16": build_lora16}


# --------------------------------------------------------------------------- #
# The measuring process
# --------------------------------------------------------------------------- #
#: Where a step's time goes: each operator of the torch profile, by the first
#: category whose names it matches (its self time: time inside it, not in operators it calls);
#: ``aten::mul`` is left in "other operators": it is both the absmax multiply of our
#: dequantization and the elementwise work of the model (RMSNorm, SiLU gating, RoPE).
CATEGORIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product",
                "aten::_flash_attention", "aten::matmul", "aten::linear", "MmBackward", "AddmmBackward",
                "BmmBackward")),
    ("dequantization", ("bitsandbytes::", "aten::index_select", "DequantizeLinear", "MatMul4Bit")),
    ("loss", ("aten::log_softmax", "aten::_log_softmax", "aten::nll_loss", "aten::cross_entropy")),
    ("optimizer", ("aten::_fused_adamw", "aten::_foreach", "aten::addcdiv", "aten::addcmul", "aten::lerp",
                   "aten::sqrt")),
)


def matmul_peak_flops(size: int = 2048, repeats: int = 10) -> float:
    """This machine's float32 matrix-multiply rate (FLOP/s) with the current thread count:
    the median of ``repeats`` products of two ``size`` x ``size`` matrices."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times)


def profile_breakdown(prof, wall: float) -> tuple[dict[str, float], int]:
    """Seconds of a profiled step by category (the self CPU time of its operators), the rest
    of the wall time as Python and framework overhead; and the matmul FLOPs the profiler counted."""
    spent = {name: 0.0 for name, _ in CATEGORIES}
    spent["other operators"] = 0.0
    flops = 0
    for event in prof.key_averages():
        category = next((name for name, prefixes in CATEGORIES if event.key.startswith(prefixes)), "other operators")
        spent[category] += event.self_cpu_time_total / 1e6
        flops += event.flops or 0
    # PyTorch's worker threads run inside the operators of the main thread, whose self
    # times add up to at most the wall time: the rest is time outside any operator.
    spent["Python and framework overhead"] = max(0.0, wall - sum(spent.values()))
    return spent, flops


def profile_summary(prof, wall: float, peak: float) -> str:
    """:func:`profile_breakdown` as a table, and the matmul FLOPs against ``peak`` FLOP/s."""
    spent, flops = profile_breakdown(prof, wall)
    lines = [f"{'where the step goes':32s}{'s':>8s}{'share':>8s}"]
    for name, seconds in spent.items():
        lines.append(f"{name:32s}{seconds:>8.2f}{seconds / wall:>8.1%}")
    lines.append(f"{'wall time of the profiled step':32s}{wall:>8.2f}")
    lines.append(f"matmul FLOPs counted by the profiler: {flops / 1e9:.1f} GFLOP; at this machine's measured "
                 f"float32 matmul rate ({peak / 1e9:.1f} GFLOP/s, 2048 x 2048) they need {flops / peak:.2f} s, "
                 f"{flops / peak / wall:.1%} of the step")
    return "\n".join(lines)


def _profile_step(step, batch: torch.Tensor, profiler: str, rows: int) -> None:
    if profiler == "torch":
        from torch.profiler import ProfilerActivity, profile

        peak = matmul_peak_flops()
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            start = time.perf_counter()
            step(batch)
            wall = time.perf_counter() - start
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
        print(profile_summary(prof, wall, peak))
    else:
        import cProfile
        import io
        import pstats

        profiler_ = cProfile.Profile()
        profiler_.enable()
        step(batch)
        profiler_.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler_, stream=out)
        stats.sort_stats("tottime").print_stats(rows)
        stats.sort_stats("cumulative").print_stats(rows)
        print(out.getvalue())


def _import_runtime() -> None:
    """Everything any variant imports, before the runtime baseline is taken."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401


class Trainer:
    """One variant's model, optimizer and batches, ready to take steps."""

    def __init__(self, spec: dict, variant: str):
        from qlora_lab.support.measure import own_parameter_memory

        start = time.perf_counter()
        self.model, self.build_times = BUILDERS[variant](spec["model_dir"], spec["lora_r"], spec["lora_alpha"])
        own_parameter_memory(self.model)
        self.build_seconds = time.perf_counter() - start
        self.variant = variant
        self.model.train()
        self.model.config.use_cache = False
        if spec["gradient_checkpointing"]:
            # transformers 5's name; non-reentrant checkpointing needs no input
            # that requires grad, so the frozen embedding is fine.
            self.model.activation_checkpointing_enable({"use_reentrant": False})
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=LEARNING_RATE)
        # The same token ids for every variant.
        generator = torch.Generator().manual_seed(spec["seed"])
        shape = (spec["batch"], spec["seq_len"])
        self.batches = [torch.randint(0, self.model.config.vocab_size, shape, generator=generator)
                        for _ in range(spec["warmup"] + spec["steps"])]
        self.warmup = spec["warmup"]
        self.losses: list[float] = []
        self.step_seconds: list[float] = []

    def step(self, tokens: torch.Tensor) -> float:
        loss = self.model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def warm_up(self) -> None:
        self.losses += [self.step(tokens) for tokens in self.batches[: self.warmup]]

    def measured_step(self, index: int) -> None:
        start = time.perf_counter()
        self.losses.append(self.step(self.batches[self.warmup + index]))
        self.step_seconds.append(time.perf_counter() - start)

    def result(self, spec: dict) -> dict:
        from qlora_lab.qlora import memory_footprint
        from qlora_lab.support.counting import parameter_count

        median = statistics.median(self.step_seconds)
        return {
            "variant": self.variant,
            "description": VARIANTS[self.variant],
            "threads": torch.get_num_threads(),
            "build_seconds": self.build_seconds,
            **self.build_times,
            "step_seconds": self.step_seconds,
            "median_step_seconds": median,
            "tokens_per_second": spec["batch"] * spec["seq_len"] / median,
            "weights_bytes": memory_footprint(self.model),
            "trainable_parameters": parameter_count(self.model, trainable=True),
            "losses": self.losses,
        }


def worker(spec: dict) -> dict:
    """One variant in this (fresh) process: time and peak memory; see the module docstring."""
    _import_runtime()
    from qlora_lab.support.measure import PeakTracker, release_freed_memory

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    tracker = PeakTracker()
    release_freed_memory()
    runtime = tracker.current()

    with tracker:
        trainer = Trainer(spec, spec["variant"])
    build_peak = tracker.peak - runtime
    trainer.warm_up()
    release_freed_memory()
    model_bytes = tracker.current() - runtime
    with tracker:
        for index in range(spec["steps"]):
            trainer.measured_step(index)
    peak = tracker.peak - runtime

    if spec["profile"] != "none":
        print(f"--- profile of one {spec['variant']} step ({spec['profile']}) ---")
        _profile_step(trainer.step, trainer.batches[-1], spec["profile"], spec["profile_rows"])
    return {**trainer.result(spec), "runtime_bytes": runtime, "build_peak_bytes": build_peak,
            "model_bytes": model_bytes, "peak_bytes": peak, "how": tracker.how}


def interleaved_worker(spec: dict) -> dict:
    """Every variant in this one process, their measured steps taken in turn
    (A B C A B C ...), so that a change in the machine's load hits all of them
    alike. Times only: the memory of one variant cannot be told apart here."""
    _import_runtime()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    trainers = []
    for variant in spec["variants"]:
        torch.manual_seed(spec["seed"])
        trainers.append(Trainer(spec, variant))
        trainers[-1].warm_up()
    for index in range(spec["steps"]):
        for trainer in trainers:
            trainer.measured_step(index)
    return {"results": {t.variant: t.result(spec) for t in trainers}}


# --------------------------------------------------------------------------- #
# Arguments and the parent process
# --------------------------------------------------------------------------- #
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (the course's cached SmolLM2-135M-Instruct) or a local model directory "
                             "with config.json and safetensors weights (default smollm2)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="VARIANT",
                        help=f"which to run, in this order: {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--batch", type=_shared.positive_int, default=8, help="sequences per step (default 8)")
    parser.add_argument("--seq-len", type=_shared.positive_int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--lora-r", type=_shared.positive_int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--lora-alpha", type=_shared.positive_float, default=16.0, help="LoRA alpha (default 16)")
    parser.add_argument("--steps", type=_shared.positive_int, default=5,
                        help="measured steps per variant; the median is reported (default 5)")
    parser.add_argument("--warmup", type=_shared.positive_int, default=1,
                        help="unmeasured steps first: AdamW's states, kernel initialisation (default 1)")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                        help="keep every activation instead of recomputing them (the recipe checkpoints)")
    parser.add_argument("--interleave", action="store_true",
                        help="time all variants in one process, taking their steps in turn (robust to a "
                             "changing machine load); no memory figures")
    parser.add_argument("--threads", type=_shared.positive_int, default=None,
                        help="torch threads in each measuring process (default: PyTorch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the token ids and LoRA init (default 0)")
    parser.add_argument("--profile", default="none", choices=PROFILERS,
                        help="after measuring, profile one more step of each variant (default none)")
    parser.add_argument("--profile-rows", type=_shared.positive_int, default=25,
                        help="rows of the profile tables (default 25)")
    parser.add_argument("--timeout", type=_shared.positive_float, default=3600.0,
                        help="seconds each variant may take (default 3600)")
    parser.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                        help="start even if the estimated peak memory exceeds the available memory")
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(map(repr, unknown))}; choose from {', '.join(VARIANTS)}")
    if args.interleave and args.profile != "none":
        parser.error("--profile runs in the one-process-per-variant mode; leave out --interleave")
    if len(set(args.variants)) != len(args.variants):
        parser.error(f"each variant at most once, got {' '.join(args.variants)}")
    try:
        args.model_dir = resolve_model(args.model)
    except ValueError as err:
        parser.error(str(err))
    from qlora_lab.support.model_config import config_value, read_model_config

    max_positions = config_value(read_model_config(args.model_dir), "max_position_embeddings")
    if max_positions and args.seq_len > max_positions:
        parser.error(f"--seq-len {args.seq_len} is longer than the model's context ({max_positions} tokens)")
    return args


def resolve_model(name: str) -> str:
    """The directory of ``name``: the SmolLM2 cache for ``"smollm2"``, else a
    local model directory (config.json plus safetensors weights)."""
    if name.lower() == "smollm2":
        from qlora_lab.models import smollm2_cache_path

        return str(smollm2_cache_path())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ValueError(f"unknown model {name!r}: pass 'smollm2' or a local model directory "
                         f"(with config.json and *.safetensors)")
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise ValueError(f"{path} is not a model directory: it needs config.json and *.safetensors weights "
                         f"(save a model with model.save_pretrained(path))")
    return str(path)


def estimated_peak(args: argparse.Namespace) -> int:
    """The largest peak that ``qlora_lab.memory.estimate`` predicts for the
    chosen variants (tensor bytes, no runtime)."""
    from qlora_lab import memory
    from qlora_lab.memory.measured_step import MEASUREMENT_SETTINGS

    peaks = []
    for variant in args.variants:
        if variant == "lora16":
            settings = dict(weight_dtype=torch.bfloat16, compute_dtype=torch.bfloat16,
                            adapter_dtype=torch.float32, optimizer_temporaries="per-tensor")
            method = "lora16"
        else:
            settings, method = MEASUREMENT_SETTINGS["qlora"], "qlora"
        peaks.append(memory.estimate(args.model_dir, method, args.lora_r, args.seq_len, args.batch,
                                     args.gradient_checkpointing, **settings).peak)
    return max(peaks)


# Imports, a float32 copy of the weights while loading, allocator slack.
RUNTIME_ALLOWANCE = 1.5e9


def check_memory(args: argparse.Namespace) -> str | None:
    """None if the run should fit in the available memory, else why not."""
    needed = estimated_peak(args) * 1.2 + RUNTIME_ALLOWANCE
    available = _shared.available_bytes()
    if needed > available:
        return (f"not enough free memory: a training step of batch {args.batch} x {args.seq_len} tokens needs "
                f"about {needed / _shared.GB:.1f} GB (estimate + 20% + {RUNTIME_ALLOWANCE / _shared.GB:.1f} GB for "
                f"the runtime), but only {available / _shared.GB:.1f} GB is available. Use a smaller --batch or "
                f"--seq-len, keep gradient checkpointing on, or close other programs "
                f"(--no-memory-check starts anyway).")
    return None


def ratios(results: dict[str, dict], interleaved: bool = False) -> dict | None:
    """Ours over bitsandbytes': throughput (>1: faster) and peak memory (<1: smaller;
    None when measured with --interleave).

    In fresh processes the throughput ratio is that of the two medians. With
    ``interleaved`` the steps were taken in turn, so step i of one variant and
    step i of the other ran seconds apart under the same load: the ratio is the
    median of the per-pair ratios (``pairs``), which a change in the machine's
    load between the two variants cannot shift."""
    if "qlora_lab" not in results or "bitsandbytes" not in results:
        return None
    ours, theirs = results["qlora_lab"], results["bitsandbytes"]
    peak = ours["peak_bytes"] / theirs["peak_bytes"] if "peak_bytes" in ours else None
    summary = {"throughput": ours["tokens_per_second"] / theirs["tokens_per_second"], "peak_memory": peak,
               "weights": ours["weights_bytes"] / theirs["weights_bytes"], "pairs": None}
    if interleaved:
        summary["pairs"] = _shared.paired_ratios(ours["step_seconds"], theirs["step_seconds"])
        summary["throughput"] = statistics.median(summary["pairs"])
    return summary


def _mb(r: dict, key: str) -> str:
    return f"{r[key] / _shared.MB:.0f}" if key in r else "-"


def table(results: dict[str, dict]) -> str:
    lines = [f"{'variant':<14}{'build s':>9}{'median step s':>15}{'tokens/s':>10}{'peak MB':>10}"
             f"{'model MB':>10}{'weights MB':>12}{'first loss':>12}"]
    for name, r in results.items():
        lines.append(f"{name:<14}{r['build_seconds']:>9.1f}{r['median_step_seconds']:>15.2f}"
                     f"{r['tokens_per_second']:>10.1f}{_mb(r, 'peak_bytes'):>10}{_mb(r, 'model_bytes'):>10}"
                     f"{r['weights_bytes'] / _shared.MB:>12.1f}{r['losses'][0]:>12.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        spec = json.loads(argv[1])
        report(interleaved_worker(spec) if "variants" in spec else worker(spec))
        return 0
    args = parse_args(argv)
    if args.memory_check:
        problem = check_memory(args)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2

    checkpointing = "on" if args.gradient_checkpointing else "off"
    print(f"model {args.model_dir}\nLoRA r={args.lora_r}, alpha={args.lora_alpha:g}, all linear layers; batch "
          f"{args.batch} x {args.seq_len} tokens; gradient checkpointing {checkpointing}; AdamW lr {LEARNING_RATE}; "
          f"{args.warmup} warm-up + {args.steps} measured steps; "
          f"{'all variants in one process' if args.interleave else 'one fresh process per variant'}", flush=True)
    loads = {"start": _shared.load_average()}
    common = {"model_dir": args.model_dir, "lora_r": args.lora_r, "lora_alpha": args.lora_alpha,
              "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
              "gradient_checkpointing": args.gradient_checkpointing, "threads": args.threads, "seed": args.seed,
              "profile": args.profile, "profile_rows": args.profile_rows}
    script = Path(__file__).resolve()
    results: dict[str, dict] = {}
    try:
        if args.interleave:
            print(f"running {', '.join(args.variants)} in one process, steps in turn", flush=True)
            results = _shared.run_worker(script, {**common, "variants": args.variants}, args.threads,
                                         args.timeout * len(args.variants))["results"]
            loads["end"] = _shared.load_average()
        else:
            for variant in args.variants:
                print(f"running {variant}: {VARIANTS[variant]} (load average {_shared.load_average()})", flush=True)
                results[variant] = _shared.run_worker(script, {**common, "variant": variant}, args.threads,
                                                      args.timeout)
                loads[variant] = _shared.load_average()
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    first = next(iter(results.values()))
    print(f"\n{first['threads']} torch threads; load average at start {loads['start']}, "
          + "; ".join(f"after {v} {load}" for v, load in loads.items() if v != "start"))
    print(table(results))
    if "how" in first:
        print("peak MB: highest resident set during the measured steps minus the runtime baseline "
              f"({first['how']}); model MB: resident after the warm-up; weights MB: parameter and buffer bytes")
    else:
        print("--interleave: steps timed in turn in one process; run without it for the memory figures")
    quantize = results.get("qlora_lab", {}).get("quantize_seconds")
    if quantize is not None:
        print(f"qlora_lab build = load {results['qlora_lab']['load_seconds']:.1f} s + quantize_model "
              f"{quantize:.1f} s; bitsandbytes quantizes while loading")
    summary = ratios(results, interleaved=args.interleave)
    if summary:
        peak = "-" if summary["peak_memory"] is None else f"{summary['peak_memory']:.3f}"
        how = "" if summary["pairs"] is None else (
            " (median of the per-step ratios " + ", ".join(f"{r:.3f}" for r in summary["pairs"]) + ")")
        print(f"ours / bitsandbytes: throughput {summary['throughput']:.3f}{how} (target >= 1.0), "
              f"peak memory {peak} (target <= 1.0), weights {summary['weights']:.3f}")
    _shared.write_json(args.json, {"benchmark": "train_step", "machine": _shared.machine(),
                                   "settings": {k: v for k, v in vars(args).items() if k != "json"},
                                   "load_average": loads, "results": results, "ratios": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
