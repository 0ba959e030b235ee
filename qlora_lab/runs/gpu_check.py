"""``make gpu-check``: the 7B path on one GPU, offline.

``make gpu-smoke`` needs a downloaded 7B model; this check needs nothing from the
hub. It writes random checkpoints with the exact shapes of today's 7B models
(:func:`qlora_lab.support.checkpoints.write_random_checkpoint`, one tensor at a
time, with the course's tiny chat tokenizer beside them), finetunes each with
``train`` (what ``python -m qlora_lab finetune`` runs), and asserts what the course
claims for a GPU:

1. **Bits.** NF4 with double quantization of sample 7B layers (bfloat16 on the
   GPU) gives the same bytes, block constants and dequantized values as the
   course's quantization of the same weights on the CPU, and bitsandbytes' CUDA
   kernel gives the same bytes.
2. **Whole 7B models**, LLaMA-7B (32 layers; the course's own backend) and
   Qwen2.5-7B (28 layers, biases on q, k, v, a 152,064-token vocabulary;
   bitsandbytes'), 30 steps on one fixed batch: the loss falls; the peak GPU
   memory PyTorch allocated is within 10% of ``--dry-run``'s estimate of it
   (:func:`~qlora_lab.finetune.plan.run_estimate`'s step peak without the Adam
   states, which bitsandbytes keeps in unified memory); the optimizer's states
   are paged; tokens per second.
3. **Both backends** on Mistral-7B- (8 key/value heads, 14,336 wide) and
   Qwen2.5-7B-shaped models two decoder layers deep, 2 steps each.
4. **A 24 GB card.** On a larger GPU every run is capped at 24 GB
   (``torch.cuda.set_per_process_memory_fraction``); one forward and backward is
   repeated under ``torch.cuda.set_sync_debug_mode`` to count its host-device syncs.
5. **The adapter** reloads in stock peft on the base that transformers quantizes
   with bitsandbytes, and gives the trained model's logits (to the compute
   dtype's rounding).

Everything goes to ``runs/gpu-check/results.json``; a failed check exits 1 and
says which. Without CUDA the command says so and exits 0, claiming nothing. The
checkpoints need about 16 GB of free disk (``--dir``; one at a time). Never run
on a GPU, so never timed on one (the README says so).
``--device cpu --tiny`` runs the same code on tiny shapes on a CPU, without the
GPU-only measurements: the course's tests do.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import warnings
from pathlib import Path

import torch

CAP_BYTES = 24 * 10**9
PEAK_TOLERANCE = 0.10
RUNS = (  # (shipped config, decoder layers: None for all, backend, steps: None for --steps)
    ("llama-7b", None, "qlora_lab", None), ("qwen2.5-7b", None, "bitsandbytes", None),
    ("mistral-7b-v0.3", 2, "qlora_lab", 2), ("mistral-7b-v0.3", 2, "bitsandbytes", 2),
    ("qwen2.5-7b", 2, "qlora_lab", 2), ("qwen2.5-7b", 2, "bitsandbytes", 2))
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "vocab_size": 384, "num_hidden_layers": 2}


def checkpoint_config(shipped: str, layers: int | None, tiny: bool):
    """The transformers config of a shipped model (``qlora_lab/configs/``), cut to
    ``layers`` decoder layers, or at tiny width (``tiny``) for a CPU."""
    from qlora_lab.support.model_config import read_model_config

    fields = read_model_config(shipped).to_dict()
    if layers is not None:
        fields["num_hidden_layers"] = layers
    if tiny:
        fields.update(TINY)
    depth = fields["num_hidden_layers"]
    if fields.get("layer_types"):  # Qwen2 names each layer's attention; keep as many as there are layers
        fields["layer_types"] = fields["layer_types"][:depth]
    if fields.get("max_window_layers") is not None:  # Qwen2's sliding-window layer count
        fields["max_window_layers"] = depth
    return read_model_config(fields)


def write_checkpoint(shipped: str, layers: int | None, tiny: bool, directory: Path) -> Path:
    """A random checkpoint of the shipped model with the tiny chat tokenizer."""
    from qlora_lab.models.tiny import tiny_chat_tokenizer
    from qlora_lab.support.checkpoints import write_random_checkpoint

    write_random_checkpoint(checkpoint_config(shipped, layers, tiny), directory,
                            dtype=torch.float32 if tiny else torch.bfloat16)
    tiny_chat_tokenizer().save_pretrained(directory)
    return directory


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/gpu-check", help="where results.json goes (default runs/gpu-check)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of each run (default 30)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu runs the same code without the GPU measurements (with --tiny: the tests)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths instead of the 7B models' (a quick run)")
    parser.add_argument("--dir", help="where the random checkpoints are written, one at a time (about 16 GB; "
                        "default: the system's temporary directory)")


def check_bits(device: torch.device, shapes: dict[str, tuple[int, int]], seed: int = 0) -> dict:
    """NF4 + double quantization of a random bfloat16 weight of each shape: on
    ``device`` and on the CPU with the course's code, and with bitsandbytes."""
    import bitsandbytes.functional as bnbf

    from qlora_lab.quant.nf4 import dequantize_4bit, quantize_4bit

    out = {}
    generator = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        weight = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        cpu_packed, cpu_state = quantize_4bit(weight, 64, "nf4", double_quant=True)
        packed, state = quantize_4bit(weight.to(device), 64, "nf4", double_quant=True)
        theirs, _ = bnbf.quantize_4bit(weight.to(device), blocksize=64, quant_type="nf4", compress_statistics=True)
        out[name] = {"shape": list(shape),
                     "bytes_equal_cpu": torch.equal(packed.cpu(), cpu_packed),
                     "block_constants_equal_cpu": torch.equal(state.absmax_indices.cpu(), cpu_state.absmax_indices)
                     and torch.equal(state.nested.absmax.cpu(), cpu_state.nested.absmax),
                     "bytes_equal_bitsandbytes": torch.equal(packed.cpu(), theirs.cpu().reshape(packed.shape)),
                     "dequantized_equal_cpu": torch.equal(dequantize_4bit(packed, state).cpu(),
                                                          dequantize_4bit(cpu_packed, cpu_state))}
    return out


def fixed_batch_data(directory: Path, examples: int) -> Path:
    """A data directory whose training split is ``examples`` conversations, one
    batch: every step sees the same batch, so a working loop drives its loss down."""
    from qlora_lab.finetune import data

    splits = data.load_dataset(splits=("train", "validation"))
    directory.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", splits["train"][:examples]), ("validation", splits["validation"][:examples])):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


def count_syncs(step) -> int:
    """How many times ``step()`` makes the host wait for the GPU."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def check_run(model_dir: Path, data_dir: Path, backend: str, steps: int, device: torch.device, out: Path) -> dict:
    """Finetune ``model_dir`` with ``backend`` for ``steps`` steps on one fixed
    batch, then reload the adapter in stock peft; the measurements and verdicts."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_lab.finetune.backends import bitsandbytes_config, compute_dtype
    from qlora_lab.finetune.plan import run_estimate
    from qlora_lab.finetune.train import preset, train
    from qlora_lab.support.bitsandbytes_cpu import keep_compute_dtype_path

    name = "llama-7b-gpu" if device.type == "cuda" else "smollm2-cpu"
    # The course's double quantization may round a few block constants to another 8-bit
    # code than bitsandbytes' (chapter 03), so the base peft reloads would not be the one
    # the course's layers trained on: that backend runs without it (check_bits covers it).
    double_quant = backend == "bitsandbytes"
    no_bf16 = device.type == "cuda" and not torch.cuda.is_bf16_supported()  # a T4: float16, as chapter 07 does
    config = preset(name, model=str(model_dir), backend=backend, data=str(data_dir), double_quant=double_quant,
                    max_steps=steps, batch_size=4, gradient_accumulation_steps=1, max_length=256, warmup_ratio=0.0,
                    learning_rate=1e-3, eval_every=steps, save_every=steps, eval_examples=4, eval_batch_size=4,
                    lora_dropout=0.0, memory_config=None, **({"compute_dtype": "float16"} if no_bf16 else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the preflight's epochs warning: one batch, on purpose
        result = train(config, out, progress="none")
    losses = result.losses()
    tokens = sum(h["tokens"] for h in result.history[1:])
    seconds = sum(h["seconds"] for h in result.history[1:])
    row = {"losses": [round(x, 4) for x in losses], "tokens_per_second": round(tokens / seconds, 1) if seconds else None}
    if steps >= 10:  # a short run shows that the path works; a long one on one batch must learn it
        row["loss_falls"] = losses[-1] < losses[0] - 0.05
    metrics = json.loads((out / "metrics.json").read_text())
    if device.type == "cuda":
        estimate = run_estimate(config)
        without_states = estimate.peak - estimate.optimizer
        peak = metrics["peak_gpu_allocated_bytes"]
        row |= {"peak_allocated_gb": round(peak / 1e9, 3), "estimate_without_states_gb": round(without_states / 1e9, 3),
                "peak_within_10_percent": abs(peak / without_states - 1) <= PEAK_TOLERANCE,
                "states_paged": metrics["optimizer_state_tensors_paged"] == metrics["optimizer_state_tensors"] > 0}
        batch = torch.randint(0, 300, (4, 256), device=device)
        model = result.model.train()
        row["syncs_per_forward_backward"] = count_syncs(lambda: model(batch, labels=batch).loss.backward())
    dtype = compute_dtype(config, device)  # the base is reloaded as the run computed: bfloat16 on a GPU
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map={"": device.index or 0}
                                                if device.type == "cuda" else None,
                                                quantization_config=bitsandbytes_config("nf4", double_quant, dtype))
    # keep_compute_dtype_path: on a CPU with AVX-512 BF16 bitsandbytes would switch to a
    # bfloat16 kernel in eval mode; on a GPU it changes nothing.
    reloaded = keep_compute_dtype_path(PeftModel.from_pretrained(base, out / "adapter").eval())
    ids = torch.tensor([[1, 17, 230, 300, 9, 42]], device=device)
    with torch.no_grad():
        expected = keep_compute_dtype_path(result.model.eval())(ids).logits.float()
        got = reloaded(ids).logits.float()
    # bitsandbytes' layer rounds the adapter's output to the compute dtype before adding it,
    # the course's layer adds first and rounds once: a few units of its last place.
    allowed = 8 * torch.finfo(dtype).eps * expected.abs().max().item()
    row["reload_max_logit_difference"] = (got - expected).abs().max().item()
    row["reload_same_logits"] = row["reload_max_logit_difference"] <= allowed
    return row


def run(out_dir: str | Path = "runs/gpu-check", steps: int = 30, device: str = "cuda", tiny: bool = False,
        work_dir: str | Path | None = None) -> dict:
    """All the checks; writes ``results.json`` in ``out_dir`` and returns it.
    The checkpoints go to a temporary directory in ``work_dir``, one at a time."""
    import shutil

    from qlora_lab.support.model_config import count_parameters

    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "width": "tiny" if tiny else "7B", "steps": steps, "runs": {}}
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        results["gpu_memory_gb"] = round(total / 1e9, 1)
        if total > CAP_BYTES:
            torch.cuda.set_per_process_memory_fraction(CAP_BYTES / total, device)
            results["capped_at_gb"] = CAP_BYTES / 1e9
    llama, mistral, qwen = (checkpoint_config(name, None, tiny) for name in ("llama-7b", "mistral-7b-v0.3", "qwen2.5-7b"))
    shapes = {"llama-7b q_proj": (llama.hidden_size,) * 2,
              "llama-7b down_proj": (llama.hidden_size, llama.intermediate_size),
              "mistral-7b up_proj": (mistral.intermediate_size, mistral.hidden_size),
              "qwen2.5-7b gate_proj": (qwen.intermediate_size, qwen.hidden_size)}
    started = time.perf_counter()
    results["bits"] = check_bits(device, shapes)
    with tempfile.TemporaryDirectory(prefix="qlora-lab-gpu-check-", dir=work_dir) as tmp:
        data_dir = fixed_batch_data(Path(tmp) / "data", 4)
        for shipped, layers in dict.fromkeys((name, layers) for name, layers, _, _ in RUNS):
            needed = 2 * count_parameters(checkpoint_config(shipped, layers, tiny)).total
            free = shutil.disk_usage(tmp).free
            if free < 1.05 * needed:
                raise OSError(f"the random {shipped} checkpoint needs {needed / 1e9:.1f} GB of disk and "
                              f"{tmp} has {free / 1e9:.1f} GB free; pass --dir on a larger disk")
            model_dir = write_checkpoint(shipped, layers, tiny, Path(tmp) / "model")
            for name, depth, backend, run_steps in RUNS:
                if (name, depth) != (shipped, layers):
                    continue
                label = f"{name} {'all' if depth is None else depth} layers {backend}"
                print(f"{label}: {run_steps or steps} steps", flush=True)
                results["runs"][label] = check_run(model_dir, data_dir, backend, run_steps or steps, device,
                                                   out_dir / label.replace(" ", "-"))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            shutil.rmtree(model_dir)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["failed"] = failures(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def failures(results: dict) -> list[str]:
    """Every check whose verdict is False, named."""
    failed = [f"bits {layer}: {key}" for layer, row in results["bits"].items() for key, ok in row.items()
              if isinstance(ok, bool) and not ok]
    for run_name, row in results["runs"].items():
        failed += [f"{run_name}: {key}" for key, ok in row.items() if isinstance(ok, bool) and not ok]
        failed += [f"{run_name}: loss not finite" for x in row["losses"] if not math.isfinite(x)][:1]
    return failed


def run_from_args(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU and this machine has none: nothing was checked "
              "(--device cpu --tiny runs the same code here)")
        return 0
    results = run(args.out, args.steps, args.device, args.tiny, args.dir)
    for name, row in results["runs"].items():
        shown = {k: v for k, v in row.items() if k != "losses"}
        print(f"{name}: loss {row['losses'][0]} -> {row['losses'][-1]}; {shown}")
    print(f"{len(results['failed'])} failed check(s) in {results['seconds']} s; results in {Path(args.out) / 'results.json'}")
    for line in results["failed"]:
        print(f"failed: {line}")
    return 1 if results["failed"] else 0
