"""Throughput of qlora_lab's 4-bit quantize/dequantize against bitsandbytes on CPU.

    .venv/bin/python bench/quantize.py                 # 4096 x 4096 float32, NF4, blocks of 64
    .venv/bin/python bench/quantize.py --size 256 --runs 3 --quant-type fp4

Four implementations get the same input:

* ``fast``: ``qlora_lab.fast.nf4``, the hand-written fast path that the
  training path (``LinearNF4``, ``quantize_model``) runs;
* ``readable``: ``qlora_lab.quant.nf4``, the chapter's definitions, run eagerly;
* ``compiled``: the same definitions under ``torch.compile(fullgraph=True)``
  (compiled during the warm-up run; ``--no-compile`` leaves it out);
* ``bnb``: ``bitsandbytes.functional``.

Before timing, the script checks that all of them produce the same bytes,
absmax and dequantized values (so the race is between equal results). Each
operation runs once to warm up, then ``--runs`` rounds in which each
implementation runs once, one after the other, so that all see the same
machine load; the median time is reported. A ratio is bitsandbytes' time over
the implementation's in the same round, the median over the rounds (above 1:
faster than bitsandbytes): a burst of load that slows one round down slows both
sides of its ratio, and a rare slow call (the operating system mapping fresh
memory late, a neighbour on a shared machine) moves the median by one rank at
most. Timings depend on the machine and on whatever else runs on it: the load
average is printed with the results.
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
from qlora_lab.fast import nf4 as fast_nf4
from qlora_lab.quant import nf4

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import paired_ratios, positive_int  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=positive_int, default=4096,
                        help="the matrix is SIZE x SIZE (default 4096)")
    parser.add_argument("--runs", type=positive_int, default=21,
                        help="timed rounds (each implementation once per round); medians are reported (default 21)")
    parser.add_argument("--blocksize", type=int, default=64, choices=nf4.BLOCKSIZES,
                        help="block size (default 64)")
    parser.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4"),
                        help="data type; bitsandbytes has no Int4 kernels (default nf4)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="dtype of the matrix (default float32)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch.set_num_threads for the run (default: PyTorch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random matrix (default 0)")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the torch.compile'd readable definitions (compiling takes tens of seconds)")
    return parser.parse_args(argv)


def round_seconds(functions: dict[str, callable], runs: int) -> dict[str, list[float]]:
    """Wall time of each function in each of ``runs`` rounds; within a round
    the functions run one after the other, so that a burst of load on the
    machine hits all of them alike."""
    for fn in functions.values():
        fn()  # warm-up: allocator, caches, lazy initialisation
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(runs):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def ratio_to_bnb(times: dict[str, list[float]], name: str) -> float:
    """bitsandbytes' time over ``name``'s in the same round, the median over
    the rounds (above 1: ``name`` is faster)."""
    return statistics.median(paired_ratios(times[name], times["bnb"]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import bitsandbytes.functional as bnbf

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    x = torch.randn(args.size, args.size).to(dtype)
    kwargs = dict(blocksize=args.blocksize, quant_type=args.quant_type)

    quantizers = {"fast": lambda: fast_nf4.quantize_4bit(x, **kwargs),
                  "readable": lambda: nf4.quantize_4bit(x, **kwargs)}
    packed, state = nf4.quantize_4bit(x, **kwargs)
    dequantizers = {"fast": lambda: fast_nf4.dequantize_4bit(packed, state),
                    "readable": lambda: nf4.dequantize_4bit(packed, state)}
    if not args.no_compile:
        compiled_quantize = torch.compile(nf4.quantize_4bit, fullgraph=True, dynamic=False)
        compiled_dequantize = torch.compile(nf4.dequantize_4bit, fullgraph=True, dynamic=False)
        quantizers["compiled"] = lambda: compiled_quantize(x, **kwargs)
        dequantizers["compiled"] = lambda: compiled_dequantize(packed, state)
    bnb_packed, bnb_state = bnbf.quantize_4bit(x, **kwargs)
    quantizers["bnb"] = lambda: bnbf.quantize_4bit(x, **kwargs)
    dequantizers["bnb"] = lambda: bnbf.dequantize_4bit(bnb_packed, bnb_state)

    for name, quantize in quantizers.items():
        their_packed, their_state = quantize()
        if not (torch.equal(their_packed, packed) and torch.equal(their_state.absmax, state.absmax)):
            print(f"error: {name} and qlora_lab.quant.nf4 quantized differently; not timing", file=sys.stderr)
            return 1
    values = nf4.dequantize_4bit(packed, state)
    for name, dequantize in dequantizers.items():
        if not torch.equal(dequantize().reshape(values.shape), values):
            print(f"error: {name} and qlora_lab.quant.nf4 dequantized differently; not timing", file=sys.stderr)
            return 1

    quantize = round_seconds(quantizers, args.runs)
    dequantize = round_seconds(dequantizers, args.runs)

    n = x.numel()
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"{args.size} x {args.size} {args.dtype}, {args.quant_type}, blocks of {args.blocksize}, "
          f"median of {args.runs} rounds, {torch.get_num_threads()} threads, load average {load}")
    names = [name for name in quantizers if name != "bnb"]
    print(f"{'operation':<12}" + "".join(f"{name + ' ms':>14}" for name in [*names, "bnb"])
          + "".join(f"{'ratio ' + name:>16}" for name in names))
    for operation, times in (("quantize", quantize), ("dequantize", dequantize)):
        print(f"{operation:<12}" + "".join(f"{statistics.median(times[name]) * 1e3:>14.1f}"
                                           for name in [*names, "bnb"])
              + "".join(f"{ratio_to_bnb(times, name):>16.2f}" for name in names))
    print(f"{n / 1e6:.1f} M values; ms: median; ratio: bitsandbytes' time / the implementation's in the same "
          f"round, median over the rounds (above 1: faster than bitsandbytes). The training path runs 'fast'.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
