"""One QLoRA training step of LLaMA-7B's architecture on this CPU: peak memory and time.

    .venv/bin/python bench/seven_b.py                    # LLaMA-7B, batch 1 x 256 tokens, LoRA r=64
    .venv/bin/python bench/seven_b.py --layers 4          # the first 4 of its 32 layers (a quick look)
    .venv/bin/python bench/seven_b.py --config my.json    # any Llama-style config

The course's evidence that a 7B QLoRA step fits where a 16-bit one never could
(QLoRA Sec. 1 and Sec. 3). The weights are random, N(0, 0.02) (the config's
``initializer_range``): memory and time do not depend on their values, and no
7B checkpoint can be downloaded here.

How the model is built, without the full-precision model ever existing:

1. The skeleton comes from the config on the meta device (accelerate's
   ``init_empty_weights``: parameters without memory; buffers such as the
   rotary frequencies are real).
2. Every linear layer of every decoder block, one at a time: its float32
   weight is drawn from a generator seeded with (seed, layer index), quantized
   to NF4 with double quantization in blocks of 64
   (``qlora_lab.quant.nf4.quantize_4bit``), wrapped in a ``qlora_lab.qlora.LinearNF4``
   (compute dtype float32) and put into the model; the float32 weight is then
   dropped. At most one layer's float32 weight (11008 x 4096: 180 MB) exists
   at any time.
3. What QLoRA does not quantize is materialised in bfloat16, as the paper's
   scripts keep it: the token embedding and the lm_head (N(0, 0.02)) and the
   RMSNorm weights (ones; the released ``qlora.py`` keeps norms in float32,
   a 0.5 MB difference). The residual stream therefore runs in bfloat16; each
   4-bit layer dequantizes its weight and multiplies in float32 (bfloat16
   matmuls are slower than float32 ones on most CPUs; ``--compute-dtype``
   changes it) and returns bfloat16.
4. LoRA (``qlora_lab.lora.add_lora``) on every linear layer except the
   lm_head: r=64, alpha=16, dropout 0.1, adapters in bfloat16 (the Guanaco 7B
   recipe). Gradient checkpointing on every decoder layer.
5. The optimizer is bitsandbytes' AdamW with 32-bit states (the recipe's
   ``paged_adamw_32bit`` without the paging, which needs a GPU; 8 bytes per
   trainable parameter); lr 2e-4. ``--optimizer adamw8`` uses its 8-bit
   states instead (2 bytes per parameter, Dettmers et al. 2022).

Then one training step on ``--batch`` x ``--seq-len`` random token ids:
forward with the loss, backward, optimizer step, each timed.

Memory: the script runs the measurement in a fresh process (glibc returns
freed blocks above 64 KiB to the kernel, ``MALLOC_MMAP_THRESHOLD_``), records
the resident set after the imports (the runtime baseline), and reads the
kernel's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``)
over the build and over the training step. It prints the step's peak both as
the whole process's resident set and above the runtime baseline, next to
``qlora_lab.memory.estimate`` for the same setting (tensor bytes, no runtime)
and the estimate for full 16-bit finetuning. Before anything is built it
checks that the estimate fits in the available memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import qlora_lab  # noqa: F401  (before bitsandbytes: silences a CPU-dependent warning)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _shared  # noqa: E402

from qlora_lab.support.measure import report  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STORAGE_DTYPE = torch.bfloat16
"""Embeddings, lm_head, norms and LoRA adapters (QLoRA Eq. 5: ``L^BF16``)."""
LEARNING_RATE = 2e-4
OPTIMIZERS = {"adamw32": (32, 8), "adamw8": (8, 2)}
"""``--optimizer``: bitsandbytes AdamW's ``optim_bits`` and the bytes of state per parameter."""


# --------------------------------------------------------------------------- #
# Building the 4-bit model one layer at a time
# --------------------------------------------------------------------------- #
def skeleton(config):
    """The model from ``config`` with every parameter on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=STORAGE_DTYPE)


def layer_generator(seed: int, index: int) -> torch.Generator:
    # One generator per tensor: a layer's weights depend only on the seed and
    # the layer's position, not on how many layers come after it.
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def quantize_linear_layers(model, std: float, seed: int, compute_dtype: torch.dtype,
                           progress=None) -> dict:
    """Replace every meta ``nn.Linear`` except the output head by a
    :class:`~qlora_lab.qlora.LinearNF4` holding a random N(0, std) weight,
    generated in float32 and quantized (NF4, double quantization, blocks of
    64) one layer at a time. Returns counts and the time spent generating and
    quantizing."""
    from torch import nn

    from qlora_lab.fast.nf4 import quantize_4bit
    from qlora_lab.qlora import LinearNF4

    head = model.get_output_embeddings()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
    names = list(linears)
    largest = max(m.weight.numel() for m in linears.values())
    scratch = torch.empty(largest, dtype=torch.float32)  # reused for every layer's float32 weight
    generate_seconds = quantize_seconds = 0.0
    weights = 0
    for index, name in enumerate(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if linear.bias is not None:
            raise ValueError(f"{name} has a bias; this benchmark builds bias-free Llama layers only")
        start = time.perf_counter()
        weight = scratch[: linear.weight.numel()].view(linear.out_features, linear.in_features)
        weight.normal_(0.0, std, generator=layer_generator(seed, index))
        generated = time.perf_counter()
        packed, state = quantize_4bit(weight, blocksize=64, quant_type="nf4", double_quant=True)
        setattr(parent, child, LinearNF4(linear.in_features, linear.out_features, packed, state,
                                         compute_dtype=compute_dtype))
        quantize_seconds += time.perf_counter() - generated
        generate_seconds += generated - start
        weights += weight.numel()
        if progress is not None:
            progress(index + 1, len(names))
    return {"layers": len(names), "quantized_weights": weights,
            "generate_seconds": generate_seconds, "quantize_seconds": quantize_seconds}


@torch.no_grad()
def materialise_rest(model, std: float, seed: int) -> int:
    """Give every parameter still on the meta device (embeddings, lm_head,
    norms) real bfloat16 memory: N(0, std) for embeddings and the head, ones
    for the norms (their initial value). Returns the number of parameters."""
    from torch import nn

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head = model.get_output_embeddings()
    count = tensors = 0
    for module in model.modules():
        if tied and module is head:
            continue  # shares the embedding's weight: re-tied below
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            data = torch.empty(param.shape, dtype=STORAGE_DTYPE)
            if isinstance(module, (nn.Embedding, nn.Linear)):
                tensors += 1
                data.normal_(0.0, std, generator=layer_generator(seed, -tensors))
            else:
                data.fill_(1.0)
            setattr(module, name, nn.Parameter(data, requires_grad=False))
            count += data.numel()
    if tied:
        head.weight = model.get_input_embeddings().weight
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise RuntimeError(f"tensors left on the meta device: {still_meta[:5]}")
    return count


# --------------------------------------------------------------------------- #
# The measuring process
# --------------------------------------------------------------------------- #
def worker(spec: dict) -> dict:
    import bitsandbytes as bnb

    from qlora_lab.lora import add_lora
    from qlora_lab.qlora import memory_footprint
    from qlora_lab.support.counting import parameter_count
    from qlora_lab.support.measure import PeakTracker, release_freed_memory

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    config = configure(spec["config"], spec["layers"])
    std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    tracker = PeakTracker()
    release_freed_memory()
    runtime = tracker.current()
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done * 8 // total != (done - 1) * 8 // total:  # eight reports in all
            print(f"  quantized {done}/{total} linear layers, {time.perf_counter() - started:.0f} s, "
                  f"resident {tracker.current() / _shared.GB:.2f} GB", flush=True)

    with tracker:
        model = skeleton(config)
        built = quantize_linear_layers(model, std, spec["seed"], DTYPES[spec["compute_dtype"]], progress)
        other = materialise_rest(model, std, spec["seed"])
        add_lora(model, r=spec["lora_r"], alpha=spec["lora_alpha"], dropout=spec["lora_dropout"],
                 target_modules="all-linear", adapter_dtype=STORAGE_DTYPE)
        release_freed_memory()
    build_seconds = time.perf_counter() - started
    build_peak = tracker.peak
    model_resident = tracker.current()

    model.train()
    model.config.use_cache = False
    model.activation_checkpointing_enable({"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW(trainable, lr=LEARNING_RATE, optim_bits=OPTIMIZERS[spec["optimizer"]][0])
    generator = torch.Generator().manual_seed(spec["seed"])
    tokens = torch.randint(0, config.vocab_size, (spec["batch"], spec["seq_len"]), generator=generator)

    release_freed_memory()
    with tracker:
        t0 = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
    step_peak = tracker.peak
    if not torch.isfinite(loss):
        raise RuntimeError(f"the loss is {loss.item()}: the step went wrong")
    return {
        "config": spec["config"],
        "layers": config.num_hidden_layers,
        "threads": torch.get_num_threads(),
        "parameters": built["quantized_weights"] + other,
        "quantized_weights": built["quantized_weights"],
        "other_parameters": other,
        "trainable_parameters": parameter_count(model, trainable=True),
        "generate_seconds": built["generate_seconds"],
        "quantize_seconds": built["quantize_seconds"],
        "build_seconds": build_seconds,
        "forward_seconds": t1 - t0,
        "backward_seconds": t2 - t1,
        "optimizer_seconds": t3 - t2,
        "step_seconds": t3 - t0,
        "loss": loss.item(),
        "runtime_bytes": runtime,
        "build_peak_bytes": build_peak,
        "model_resident_bytes": model_resident,
        "step_peak_bytes": step_peak,
        "weights_bytes": memory_footprint(model),
        "how": tracker.how,
    }


# --------------------------------------------------------------------------- #
# Arguments, the estimate, the parent process
# --------------------------------------------------------------------------- #
def configure(name: str, layers: int | None):
    """The config called ``name`` (shipped name or path), with
    ``num_hidden_layers`` replaced by ``layers`` if given."""
    from qlora_lab.support.model_config import read_model_config

    config = read_model_config(name)
    config._name_or_path = Path(str(name)).stem
    if layers is not None:
        config.num_hidden_layers = layers
        config._name_or_path += f", {layers} layers"
    return config


def estimate_settings(args) -> dict:
    """``qlora_lab.memory.estimate`` arguments describing what the worker does."""
    return dict(
        lora_r=args.lora_r, seq_len=args.seq_len, batch=args.batch, gradient_checkpointing=True,
        weight_dtype=STORAGE_DTYPE,
        # Saved activations live in the bf16 residual stream; the float32
        # copies inside each 4-bit layer are temporaries.
        compute_dtype=STORAGE_DTYPE,
        adapter_dtype=STORAGE_DTYPE,
        optimizer_state_bytes=OPTIMIZERS[args.optimizer][1],
        optimizer_temporaries="per-tensor",  # its CPU update works tensor by tensor in float32
        lora_dropout=args.lora_dropout,
        dropout_mask_bytes=2,  # PyTorch on a CPU keeps the mask in the input's dtype (bf16)
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default="llama-7b",
                        help="a shipped config (llama-7b, llama-13b, ...) or a path to a config JSON or model "
                             "directory (default llama-7b)")
    parser.add_argument("--layers", type=_shared.positive_int, default=None,
                        help="build only this many decoder layers (default: the config's)")
    parser.add_argument("--seq-len", type=_shared.positive_int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--batch", type=_shared.positive_int, default=1, help="sequences (default 1)")
    parser.add_argument("--lora-r", type=_shared.positive_int, default=64, help="LoRA rank (default 64)")
    parser.add_argument("--lora-alpha", type=_shared.positive_float, default=16.0, help="LoRA alpha (default 16)")
    parser.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA dropout, in [0, 1) (default 0.1)")
    parser.add_argument("--compute-dtype", default="float32", choices=DTYPES,
                        help="dtype in which the 4-bit layers dequantize and multiply (default float32)")
    parser.add_argument("--optimizer", default="adamw32", choices=OPTIMIZERS,
                        help="bitsandbytes AdamW with 32-bit (the recipe) or 8-bit states (default adamw32)")
    parser.add_argument("--threads", type=_shared.positive_int, default=None,
                        help="torch threads (default: PyTorch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and token ids (default 0)")
    parser.add_argument("--timeout", type=_shared.positive_float, default=7200.0,
                        help="seconds the measuring process may take (default 7200)")
    parser.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                        help="start even if the estimated peak exceeds the available memory")
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    args = parser.parse_args(argv)
    if not 0.0 <= args.lora_dropout < 1.0:
        parser.error(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    from qlora_lab.support.model_config import model_shape

    try:
        config = configure(args.config, args.layers)
        model_shape(config)  # names any field the estimate (and a Llama block) needs
    except (ValueError, TypeError, OSError) as err:
        parser.error(f"--config: {err}")
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions and args.seq_len > max_positions:
        parser.error(f"--seq-len {args.seq_len} is longer than the model's context ({max_positions} tokens)")
    args.model_config = config
    return args


# Imports (~0.4 GB), one layer's float32 weight and quantization temporaries
# (up to ~0.6 GB for LLaMA-7B's MLP), allocator slack.
RUNTIME_ALLOWANCE = 1.2e9


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        report(worker(json.loads(argv[1])))
        return 0
    args = parse_args(argv)
    from qlora_lab import memory

    qlora = memory.estimate(args.model_config, "qlora", **estimate_settings(args))
    full16 = memory.estimate(args.model_config, "full16", seq_len=args.seq_len, batch=args.batch,
                             gradient_checkpointing=True)
    needed = qlora.peak + RUNTIME_ALLOWANCE
    available = _shared.available_bytes()
    name = f"{args.config}" + (f" with {args.layers} layers" if args.layers else "")
    if args.memory_check and needed > available:
        print(f"error: not enough free memory for one QLoRA step of {name}: it needs about "
              f"{needed / _shared.GB:.1f} GB (estimate {qlora.peak / _shared.GB:.2f} GB + "
              f"{RUNTIME_ALLOWANCE / _shared.GB:.1f} GB for the runtime and one layer's quantization), but only "
              f"{available / _shared.GB:.1f} GB is available. Close other programs, or try a smaller model "
              f"(--layers 4) (--no-memory-check starts anyway).", file=sys.stderr)
        return 2

    print(f"{name}: {qlora.parameters / 1e9:.2f} B parameters; QLoRA (NF4 + double quantization, blocks of 64), "
          f"LoRA r={args.lora_r} alpha={args.lora_alpha:g} dropout {args.lora_dropout:g} on all linear layers, "
          f"bf16 adapters, embeddings and norms, {args.compute_dtype} compute in the 4-bit layers, gradient "
          f"checkpointing, bitsandbytes AdamW ({OPTIMIZERS[args.optimizer][0]}-bit states); one step of batch "
          f"{args.batch} x {args.seq_len} "
          f"tokens", flush=True)
    print(f"available memory {available / _shared.GB:.1f} GB, estimated need {needed / _shared.GB:.1f} GB; "
          f"load average {_shared.load_average()}", flush=True)
    spec = {"config": args.config, "layers": args.layers, "seq_len": args.seq_len, "batch": args.batch,
            "lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
            "compute_dtype": args.compute_dtype, "optimizer": args.optimizer, "threads": args.threads,
            "seed": args.seed}
    load_start = _shared.load_average()
    try:
        r = _shared.run_worker(Path(__file__).resolve(), spec, args.threads, args.timeout)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    load_end = _shared.load_average()

    size = _shared.human_bytes
    above = r["step_peak_bytes"] - r["runtime_bytes"]
    rate = r["quantized_weights"] / r["quantize_seconds"] / 1e6 if r["quantize_seconds"] else float("nan")
    print(f"\n{r['threads']} torch threads; load average at start {load_start}, at end {load_end}")
    print(f"build   {r['build_seconds']:7.1f} s  (generate {r['generate_seconds']:.1f} s + quantize "
          f"{r['quantize_seconds']:.1f} s for {r['quantized_weights'] / 1e9:.3f} B weights, {rate:.1f} M weights/s)")
    print(f"step    {r['step_seconds']:7.1f} s  (forward {r['forward_seconds']:.1f} s, backward "
          f"{r['backward_seconds']:.1f} s, optimizer {r['optimizer_seconds']:.1f} s); loss {r['loss']:.4f}")
    print(f"memory  runtime baseline {size(r['runtime_bytes'])}; resident after build "
          f"{size(r['model_resident_bytes'])} (peak while building {size(r['build_peak_bytes'])}); "
          f"weights and adapters {size(r['weights_bytes'])}")
    print(f"peak    {size(r['step_peak_bytes'])} resident during the step (whole process), "
          f"{size(above)} above the runtime baseline ({r['how']})")
    print(f"estimate (qlora_lab.memory.estimate, same setting): peak {size(qlora.peak)}; measured above the "
          f"runtime / estimate = {above / qlora.peak:.3f}")
    print(qlora.table())
    print(f"full 16-bit finetuning, same model and tokens (bf16 weights and gradients, 32-bit Adam): "
          f"{size(full16.peak)} peak")
    target = 6e9

    def verdict(value: float) -> str:
        return f"{size(value)}, {'under' if value < target else 'NOT under'} {size(target)}"

    print(f"target, peak under {size(target)}: above the runtime {verdict(above)}; "
          f"whole process {verdict(r['step_peak_bytes'])}")
    _shared.write_json(args.json, {
        "benchmark": "seven_b", "machine": _shared.machine(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "model_config")},
        "load_average": {"start": load_start, "end": load_end}, "result": r,
        "estimate": qlora.as_dict(), "estimate_peak_bytes": qlora.peak,
        "full16_estimate": full16.as_dict(), "full16_estimate_peak_bytes": full16.peak,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
