"""Host memory of loading LLaMA-7B into 4 bits with the course's streaming loader.

    .venv/bin/python bench/streaming_load.py                  # LLaMA-7B, bfloat16 shards of up to 10 GB
    .venv/bin/python bench/streaming_load.py --layers 4       # the first 4 of its 32 layers (a quick look)
    .venv/bin/python bench/streaming_load.py --dir /big/disk --keep

The question (chapter 07, ``qlora_lab.finetune.streaming``): can a machine with less
RAM than the 16-bit model load it in 4 bits? LLaMA-7B in bfloat16 is 13.5 GB;
a free Colab machine has about 12.7 GB of RAM. The target: the whole load
under 8 GB of host memory, with the 4-bit model kept on the CPU (the worst
case: on a GPU it leaves the host as it is built).

1. A checkpoint of the config with random weights, N(0, 0.02) (memory and
   time do not depend on the values), is written shard by shard and tensor by
   tensor (``qlora_lab.support.checkpoints.write_random_checkpoint``) into a
   temporary directory, as transformers lays one out: bfloat16 shards (two of
   them for LLaMA-7B with ``--shard-gb 10``, as the published checkpoints
   are split) and ``model.safetensors.index.json``. It needs 13.5 GB of disk.
2. A fresh process loads it with ``qlora_lab.finetune.streaming.load_quantized`` (NF4 +
   double quantization, bfloat16 storage, onto the CPU) and reports its
   resident set after the imports, the kernel's high-water mark over the load
   (``VmHWM``, the whole process) and the model's bytes
   (``qlora_lab.support.checkpoints.measure_load``; glibc returns freed blocks
   above 64 KiB to the kernel, as in chapter 03's measurements).
3. The figures are printed next to ``qlora_lab.finetune.streaming.load_memory``'s
   account (4-bit model + one tensor while it is read, cast and quantized),
   and the files are deleted (``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import qlora_lab  # noqa: F401  (before bitsandbytes: silences a CPU-dependent warning)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _shared  # noqa: E402

TARGET_BYTES = 8e9
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default="llama-7b",
                        help="a shipped config (llama-7b, ...) or a path to a config JSON or model directory")
    parser.add_argument("--layers", type=_shared.positive_int, default=None,
                        help="write only this many decoder layers (default: the config's)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                        help="dtype of the checkpoint and of what is not quantized (default bfloat16)")
    parser.add_argument("--shard-gb", type=_shared.positive_float, default=10.0,
                        help="largest shard, in GB (default 10)")
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: the system's temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint instead of deleting it")
    parser.add_argument("--threads", type=_shared.positive_int, default=None,
                        help="torch threads of the loading process (default: PyTorch's choice)")
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    args = parser.parse_args(argv)
    from qlora_lab.support.model_config import read_model_config

    try:
        config = read_model_config(args.config)
    except (ValueError, TypeError, OSError) as err:
        parser.error(f"--config: {err}")
    if args.layers is not None:
        config.num_hidden_layers = args.layers
    args.model_config = config
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from qlora_lab.finetune.streaming import load_memory
    from qlora_lab.support.checkpoints import measure_load, write_random_checkpoint
    from qlora_lab.support.model_config import count_parameters

    dtype = DTYPES[args.dtype]
    size = _shared.human_bytes
    checkpoint_bytes = count_parameters(args.model_config).total * dtype.itemsize
    parent = Path(args.dir or tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    if free < checkpoint_bytes * 1.05:
        print(f"error: the checkpoint needs {size(checkpoint_bytes)} of disk and {parent} has {size(free)} free; "
              f"pass --dir on a larger disk (or --layers 4).", file=sys.stderr)
        return 2
    account = load_memory(args.model_config, file_dtype=dtype, dtype=dtype, device="cpu")
    name = args.config + (f" with {args.layers} layers" if args.layers else "")
    print(f"{name}: {size(checkpoint_bytes)} in {args.dtype}; load_memory's account: 4-bit model "
          f"{size(account.resident)} + one tensor at a time {size(account.transient)}", flush=True)
    directory = Path(tempfile.mkdtemp(prefix="qlora-lab-streaming-", dir=parent))
    try:
        started = time.perf_counter()
        written = write_random_checkpoint(args.model_config, directory, dtype=dtype,
                                          max_shard_bytes=int(args.shard_gb * 1e9))
        write_seconds = time.perf_counter() - started
        print(f"wrote {written['files']} shards, {size(written['total_bytes'])}, in {write_seconds:.0f} s "
              f"({directory})", flush=True)
        print(f"loading in a fresh process (load average {_shared.load_average()}) ...", flush=True)
        r = measure_load(directory, backend="qlora_lab", dtype=dtype, device="cpu", threads=args.threads,
                         timeout=7200)
    finally:
        if args.keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    above = r["peak_bytes"] - r["runtime_bytes"]
    print(f"load    {r['seconds']:.0f} s, {r['checkpoint_bytes'] / r['seconds'] / 1e6:.0f} MB/s of checkpoint")
    print(f"memory  runtime {size(r['runtime_bytes'])}; peak {size(r['peak_bytes'])} (whole process), "
          f"{size(above)} above the runtime ({r['how']}); resident afterwards {size(r['resident_bytes'])}")
    print(f"        4-bit model {size(r['model_bytes'])}; largest tensor {size(r['largest_tensor_bytes'])}; "
          f"16-bit checkpoint {size(r['checkpoint_bytes'])}")
    print(f"account above the runtime {size(account.total)}: measured / account = {above / account.total:.3f}")
    print(f"target: the whole load under {size(TARGET_BYTES)}: {size(r['peak_bytes'])}, "
          f"{'met' if r['peak_bytes'] < TARGET_BYTES else 'NOT met'}")
    _shared.write_json(args.json, {
        "benchmark": "streaming_load", "machine": _shared.machine(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "model_config")},
        "write_seconds": write_seconds, "written": written, "result": r,
        "account": {"resident": account.resident, "transient": account.transient},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
