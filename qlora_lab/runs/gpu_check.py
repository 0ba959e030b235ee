"""``make gpu-check``: the 7B path on one GPU, offline, in about ten minutes.

``make gpu-smoke`` needs a downloaded 7B model; this check needs nothing from the
hub. It builds random models with the exact layer shapes of today's 7B models,
two decoder layers deep (every linear layer, the embedding and the output layer
at full size; a 7B model repeats the layer 28 to 32 times), writes each as a
model directory, and asserts what the course claims for a GPU:

1. **Bits.** NF4 with double quantization of sample 7B layers (bfloat16 on the
   GPU) gives the same bytes and block constants as the course's quantization of
   the same weights on the CPU, and bitsandbytes' CUDA kernel gives the same bytes.
2. **A run per shape and backend** (``train``, exactly what ``python -m qlora_lab
   finetune --max-steps N`` runs), on a LLaMA-7B-, a Mistral-7B- (8 key/value
   heads, 14,336 wide) and a Qwen2.5-7B-shaped model (biases on q, k, v; a
   152,064-token vocabulary), with both backends, 30 steps on one fixed batch:
   the loss falls; the peak GPU memory PyTorch allocated is within 10% of
   ``--dry-run``'s estimate of it (:func:`~qlora_lab.finetune.plan.run_estimate`
   without the Adam states, which bitsandbytes keeps in unified memory); the
   optimizer's states are paged; tokens per second.
3. **A 24 GB card.** On a larger GPU every run is capped at 24 GB
   (``torch.cuda.set_per_process_memory_fraction``); one step is repeated with
   ``torch.cuda.set_sync_debug_mode`` to count the host-device syncs it makes.
4. **The adapter** reloads in stock peft on the base that transformers quantizes
   with bitsandbytes, and gives the trained model's logits (bfloat16 rounding).

Everything goes to ``runs/gpu-check/results.json``; a failed check exits 1 and
says which. Without CUDA the command says so and exits 0, claiming nothing.
``--device cpu --tiny`` runs the same code at tiny width on a CPU, without the
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
SHAPED_LIKE = {"llama-7b": "llama", "mistral-7b-v0.3": "mistral", "qwen2.5-7b": "qwen2"}  # shipped config -> family
TINY_SIZES = {"llama": {}, "mistral": {"num_key_value_heads": 1}, "qwen2": {"intermediate_size": 384}}


def full_width_sizes(shipped: str) -> dict:
    """The layer shapes of a shipped config (``qlora_lab/configs/``), for a model
    two decoder layers deep."""
    from qlora_lab.support.model_config import config_value, read_model_config

    config = read_model_config(shipped)
    heads = config_value(config, "num_attention_heads")
    return {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_attention_heads": heads, "num_key_value_heads": config_value(config, "num_key_value_heads", heads),
            "head_dim": config.hidden_size // heads, "vocab_size": config.vocab_size}


BACKENDS = ("qlora_lab", "bitsandbytes")


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/gpu-check", help="where results.json goes (default runs/gpu-check)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of each run (default 30)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu runs the same code without the GPU measurements (with --tiny: the tests)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths instead of the 7B models' (a quick run)")


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

    from qlora_lab.finetune.backends import bitsandbytes_config
    from qlora_lab.finetune.plan import run_estimate
    from qlora_lab.finetune.train import preset, train

    name = "llama-7b-gpu" if device.type == "cuda" else "smollm2-cpu"
    # The course's double quantization may round a few block constants to another 8-bit
    # code than bitsandbytes' (chapter 03), so the base peft reloads would not be the one
    # the course's layers trained on: that backend runs without it (check_bits covers it).
    double_quant = backend == "bitsandbytes"
    config = preset(name, model=str(model_dir), backend=backend, data=str(data_dir), double_quant=double_quant,
                    max_steps=steps, batch_size=4,
                    gradient_accumulation_steps=1, max_length=256, warmup_ratio=0.0, learning_rate=1e-3, eval_every=steps,
                    save_every=steps, eval_examples=4, eval_batch_size=4, lora_dropout=0.0, memory_config=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the preflight's epochs warning: one batch, on purpose
        result = train(config, out, progress="none")
    losses = result.losses()
    tokens = sum(h["tokens"] for h in result.history[1:])
    seconds = sum(h["seconds"] for h in result.history[1:])
    row = {"losses": [round(x, 4) for x in losses], "loss_falls": losses[-1] < losses[0] - 0.05,
           "tokens_per_second": round(tokens / seconds, 1) if seconds else None}
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
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map={"": device.index or 0}
                                                if device.type == "cuda" else None,
                                                quantization_config=bitsandbytes_config("nf4", double_quant, dtype))
    reloaded = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = torch.tensor([[1, 17, 230, 300, 9, 42]], device=device)
    with torch.no_grad():
        expected = result.model.eval()(ids).logits.float()
        got = reloaded(ids).logits.float()
    # bitsandbytes' layer rounds the adapter's output to the compute dtype before adding it,
    # the course's layer adds first and rounds once: a few units of its last place.
    allowed = 8 * torch.finfo(dtype).eps * expected.abs().max().item()
    row["reload_max_logit_difference"] = (got - expected).abs().max().item()
    row["reload_same_logits"] = row["reload_max_logit_difference"] <= allowed
    return row


def run(out_dir: str | Path = "runs/gpu-check", steps: int = 30, device: str = "cuda", tiny: bool = False) -> dict:
    """All the checks; writes ``results.json`` in ``out_dir`` and returns it."""
    from qlora_lab.models.tiny import write_tiny_chat_model

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
    if tiny:
        shapes = {"q_proj": (128, 128), "down_proj": (128, 256)}
    else:
        llama, mistral, qwen = (full_width_sizes(name) for name in SHAPED_LIKE)
        shapes = {"llama-7b q_proj": (llama["hidden_size"],) * 2,
                  "llama-7b down_proj": (llama["hidden_size"], llama["intermediate_size"]),
                  "mistral-7b up_proj": (mistral["intermediate_size"], mistral["hidden_size"]),
                  "qwen2.5-7b gate_proj": (qwen["intermediate_size"], qwen["hidden_size"])}
    started = time.perf_counter()
    results["bits"] = check_bits(device, shapes)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = fixed_batch_data(Path(tmp) / "data", 4)
        for name, architecture in SHAPED_LIKE.items():
            sizes = TINY_SIZES[architecture] if tiny else full_width_sizes(name)
            model_dir = write_tiny_chat_model(Path(tmp) / name, architecture=architecture,
                                              dtype=torch.float32 if tiny else torch.bfloat16, **sizes)
            for backend in BACKENDS:
                print(f"{name} with {backend}: {steps} steps", flush=True)
                results["runs"][f"{name} {backend}"] = check_run(model_dir, data_dir, backend, steps, device,
                                                                 out_dir / name / backend)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
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
    results = run(args.out, args.steps, args.device, args.tiny)
    for name, row in results["runs"].items():
        shown = {k: v for k, v in row.items() if k != "losses"}
        print(f"{name}: loss {row['losses'][0]} -> {row['losses'][-1]}; {shown}")
    print(f"{len(results['failed'])} failed check(s) in {results['seconds']} s; results in {Path(args.out) / 'results.json'}")
    for line in results["failed"]:
        print(f"failed: {line}")
    return 1 if results["failed"] else 0
