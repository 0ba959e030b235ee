"""Throughput of qlora_lab's 4-bit quantize/dequantize against bitsandbytes on CPU.

    .venv/bin/python bench/quantize.py                 # 4096 x 4096 float32, NF4, blocks of 64
    .venv/bin/python bench/quantize.py --size 256 --runs 3 --quant-type fp4

Both libraries get the same input; before timing, the script checks that they
produce the same bytes, absmax and dequantized values (so the race is between
equal results). Each operation runs once to warm up, then ``--runs`` times,
alternating ours and bitsandbytes' so that both see the same machine load; the
median is reported. ``ratio`` is bitsandbytes' time over ours: above 1 means
ours is faster. Timings depend on the machine and on whatever else runs on it:
the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import qlora_lab  # noqa: F401  (before bitsandbytes: silences a CPU-dependent warning)
from qlora_lab import nf4

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import positive_int  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=positive_int, default=4096,
                        help="the matrix is SIZE x SIZE (default 4096)")
    parser.add_argument("--runs", type=positive_int, default=9,
                        help="timed runs per operation and library; the median is reported (default 9)")
    parser.add_argument("--blocksize", type=int, default=64, choices=nf4.BLOCKSIZES,
                        help="block size (default 64)")
    parser.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4"),
                        help="data type; bitsandbytes has no Int4 kernels (default nf4)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="dtype of the matrix (default float32)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch.set_num_threads for the run (default: PyTorch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random matrix (default 0)")
    return parser.parse_args(argv)


def median_seconds(functions: dict[str, callable], runs: int) -> dict[str, float]:
    """Median wall time of each function, runs interleaved so that a burst of
    load on the machine hits all of them alike."""
    for fn in functions.values():
        fn()  # warm-up: allocator, caches, lazy initialisation
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(runs):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import bitsandbytes.functional as bnbf

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    x = torch.randn(args.size, args.size).to(dtype)
    kwargs = dict(blocksize=args.blocksize, quant_type=args.quant_type)

    packed, state = nf4.quantize_4bit(x, **kwargs)
    bnb_packed, bnb_state = bnbf.quantize_4bit(x, **kwargs)
    if not (torch.equal(packed, bnb_packed) and torch.equal(state.absmax, bnb_state.absmax)):
        print("error: qlora_lab and bitsandbytes quantized differently; not timing", file=sys.stderr)
        return 1
    ours = nf4.dequantize_4bit(packed, state)
    theirs = bnbf.dequantize_4bit(bnb_packed, bnb_state)
    if not torch.equal(ours, theirs.reshape(ours.shape)):
        print("error: qlora_lab and bitsandbytes dequantized differently; not timing", file=sys.stderr)
        return 1

    quantize = median_seconds({"ours": lambda: nf4.quantize_4bit(x, **kwargs),
                               "bnb": lambda: bnbf.quantize_4bit(x, **kwargs)}, args.runs)
    dequantize = median_seconds({"ours": lambda: nf4.dequantize_4bit(packed, state),
                                 "bnb": lambda: bnbf.dequantize_4bit(bnb_packed, bnb_state)}, args.runs)

    n = x.numel()
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"{args.size} x {args.size} {args.dtype}, {args.quant_type}, blocks of {args.blocksize}, "
          f"median of {args.runs} runs, {torch.get_num_threads()} threads, load average {load}")
    print(f"{'operation':<12}{'ours ms':>10}{'bnb ms':>10}{'ours Melem/s':>15}{'bnb Melem/s':>14}"
          f"{'ratio ours/bnb':>16}")
    for name, times in (("quantize", quantize), ("dequantize", dequantize)):
        print(f"{name:<12}{times['ours'] * 1e3:>10.1f}{times['bnb'] * 1e3:>10.1f}"
              f"{n / times['ours'] / 1e6:>15.1f}{n / times['bnb'] / 1e6:>14.1f}"
              f"{times['bnb'] / times['ours']:>16.2f}")
    print("ratio = throughput of ours / throughput of bitsandbytes (above 1: ours is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
