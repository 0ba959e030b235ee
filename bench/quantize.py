"""Throughput of qlora_lab's 4-bit quantize/dequantize against bitsandbytes on CPU, shape by shape.

    .venv/bin/python bench/quantize.py                       # the table of shapes below, NF4, blocks of 64
    .venv/bin/python bench/quantize.py --shapes 576x1536 4096x4096 --definitions
    .venv/bin/python bench/quantize.py --size 256 --runs 3 --quant-type fp4

The shapes (``SHAPES``) are the weight matrices the course really quantizes:
SmolLM2-135M's (every training step of chapters 05-07 dequantizes its 576 x 576,
576 x 1536 and 1536 x 576 projections; the 49152 x 576 embedding is the largest
matrix it has) and a 7B LLaMA's (4096 x 4096 attention, 4096 x 11008 and
11008 x 4096 MLP). A ratio measured at one shape says nothing about another:
small matrices are bound by per-call overhead, large ones by writing the output.

For each shape the script checks that every implementation gives the same
bytes, absmax and dequantized values (the race is between equal results), then
times, in rounds (each implementation once per round, one after the other, so
that all see the same machine load; medians reported):

* **quantize**: ``fast`` (``qlora_lab.fast.nf4``, which the training path runs)
  against ``bnb`` (``bitsandbytes.functional``);
* **dequantize into a fresh output**, as both libraries do by default, beside
  the floor of that write: ``torch.empty(shape).fill_(1)``, a fresh tensor of the
  output's size written once (large fresh tensors cost the operating system's
  page faults, which no decoder avoids);
* **dequantize into a reused output** (``out=``, which both libraries accept),
  beside its floor: ``buffer.fill_(1)``.

``--definitions`` adds the chapter's readable definitions (``qlora_lab.quant.nf4``),
run eagerly and under ``torch.compile(fullgraph=True)``, to the first two tables.
A ratio is bitsandbytes' time over the implementation's in the same round, the
median over the rounds (above 1: faster than bitsandbytes); "/ floor" is the
implementation's median over the floor's (1 would be as fast as writing the
output at all). Timings depend on the machine and on whatever else runs on it:
the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import qlora_lab  # noqa: F401  (before bitsandbytes: silences a CPU-dependent warning)
from qlora_lab.fast import nf4 as fast_nf4
from qlora_lab.quant import nf4

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import cpu_name, load_average, paired_ratios, positive_int  # noqa: E402

#: (rows, columns) of the weight matrices the course quantizes: SmolLM2-135M's, then a 7B LLaMA's.
SHAPES = ((576, 576), (576, 1536), (1536, 576), (49152, 576), (4096, 4096), (4096, 11008), (11008, 4096))


def shape_argument(text: str) -> tuple[int, int]:
    """``ROWSxCOLUMNS`` (``576x1536``) as a pair of positive integers."""
    try:
        rows, columns = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; write ROWSxCOLUMNS, e.g. 576x1536") from None
    if rows < 1 or columns < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: rows and columns must be positive integers")
    return rows, columns


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=shape_argument, nargs="+", default=list(SHAPES),
                        help="matrix shapes ROWSxCOLUMNS (default: the course's and a 7B model's, SHAPES)")
    parser.add_argument("--size", type=positive_int, default=None,
                        help="one SIZE x SIZE matrix instead of --shapes")
    parser.add_argument("--runs", type=positive_int, default=21,
                        help="timed rounds per shape (each implementation once per round); medians are reported "
                             "(default 21)")
    parser.add_argument("--blocksize", type=int, default=64, choices=nf4.BLOCKSIZES,
                        help="block size (default 64)")
    parser.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4"),
                        help="data type; bitsandbytes has no Int4 kernels (default nf4)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="dtype of the matrix (default float32)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch.set_num_threads for the run (default: PyTorch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random matrices (default 0)")
    parser.add_argument("--definitions", action="store_true",
                        help="also time the readable definitions, eager and torch.compile'd (compiling takes tens "
                             "of seconds per shape)")
    parser.add_argument("--no-compile", action="store_true",
                        help="with --definitions: leave out the torch.compile'd definitions")
    args = parser.parse_args(argv)
    if args.size is not None:
        args.shapes = [(args.size, args.size)]
    return args


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


def bnb_takes_out(dequantize) -> bool:
    """Whether bitsandbytes' ``dequantize_4bit(..., out=)`` runs on this device
    (its CPU backend registers no ``out`` kernel in 0.50: the reused-output
    table then compares with its fresh-output call, and says so)."""
    try:
        dequantize()
    except NotImplementedError:
        return False
    return True


def implementations(x: torch.Tensor, args) -> tuple[dict, dict, dict] | str:
    """The quantizers, the fresh-output and the reused-output dequantizers for
    ``x``, after checking that they agree; a sentence saying which did not."""
    import bitsandbytes.functional as bnbf

    kwargs = dict(blocksize=args.blocksize, quant_type=args.quant_type)
    packed, state = nf4.quantize_4bit(x, **kwargs)
    bnb_packed, bnb_state = bnbf.quantize_4bit(x, **kwargs)
    mine, theirs = torch.empty_like(x), torch.empty_like(x)
    quantizers = {"fast": lambda: fast_nf4.quantize_4bit(x, **kwargs)}
    fresh = {"fast": lambda: fast_nf4.dequantize_4bit(packed, state)}
    reused = {"fast": lambda: fast_nf4.dequantize_4bit(packed, state, out=mine),
              "bnb": lambda: bnbf.dequantize_4bit(bnb_packed, bnb_state, out=theirs),
              "floor": lambda: mine.fill_(1)}
    if not bnb_takes_out(reused["bnb"]):  # bitsandbytes 0.50 has no CPU kernel for out=
        reused["bnb"] = lambda: bnbf.dequantize_4bit(bnb_packed, bnb_state)
    if args.definitions:
        quantizers["readable"] = lambda: nf4.quantize_4bit(x, **kwargs)
        fresh["readable"] = lambda: nf4.dequantize_4bit(packed, state)
        if not args.no_compile:
            compiled_quantize = torch.compile(nf4.quantize_4bit, fullgraph=True, dynamic=False)
            compiled_dequantize = torch.compile(nf4.dequantize_4bit, fullgraph=True, dynamic=False)
            quantizers["compiled"] = lambda: compiled_quantize(x, **kwargs)
            fresh["compiled"] = lambda: compiled_dequantize(packed, state)
    quantizers["bnb"] = lambda: bnbf.quantize_4bit(x, **kwargs)
    fresh["bnb"] = lambda: bnbf.dequantize_4bit(bnb_packed, bnb_state)
    fresh["floor"] = lambda: torch.empty_like(x).fill_(1)

    for name, quantize in quantizers.items():
        their_packed, their_state = quantize()
        if not (torch.equal(their_packed, packed) and torch.equal(their_state.absmax, state.absmax)):
            return f"{name} and qlora_lab.quant.nf4 quantized {tuple(x.shape)} differently"
    values = nf4.dequantize_4bit(packed, state)
    for table in (fresh, reused):
        for name, dequantize in table.items():
            if name != "floor" and not torch.equal(dequantize().reshape(values.shape), values):
                return f"{name} and qlora_lab.quant.nf4 dequantized {tuple(x.shape)} differently"
    return quantizers, fresh, reused


def table(title: str, rows: list[tuple[str, dict[str, list[float]]]], with_floor: bool) -> str:
    """One operation's times at every shape, as a Markdown table."""
    names = [name for name in rows[0][1] if name not in ("bnb", "floor")]
    header = ["shape", *[f"{name} ms" for name in names], "bnb ms", *[f"ratio {name}" for name in names]]
    if with_floor:
        header += ["floor ms", *[f"{name} / floor" for name in names], "bnb / floor"]
    lines = [f"{title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for shape, times in rows:
        median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        cells = [shape, *[f"{median[n]:.2f}" for n in names], f"{median['bnb']:.2f}",
                 *[f"{ratio_to_bnb(times, n):.2f}" for n in names]]
        if with_floor:
            cells += [f"{median['floor']:.2f}", *[f"{median[n] / median['floor']:.1f}" for n in [*names, "bnb"]]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    results: dict[str, list] = {"quantize": [], "fresh": [], "reused": []}
    for rows, columns in args.shapes:
        torch.manual_seed(args.seed)
        x = torch.randn(rows, columns).to(dtype)
        built = implementations(x, args)
        if isinstance(built, str):
            print(f"error: {built}; not timing", file=sys.stderr)
            return 1
        shape = f"{rows} x {columns}"
        for key, functions in zip(results, built):
            results[key].append((shape, round_seconds(functions, args.runs)))
        del x, built

    print(f"{args.dtype}, {args.quant_type}, blocks of {args.blocksize}, median of {args.runs} rounds, "
          f"{torch.get_num_threads()} threads, {cpu_name()}, load average {load_average()}\n")
    print(table("quantize", results["quantize"], with_floor=False) + "\n")
    print(table("dequantize into a fresh output (floor: torch.empty(shape).fill_(1))", results["fresh"], True) + "\n")
    import bitsandbytes.functional as bnbf

    bnb_reuses = bnb_takes_out(lambda: bnbf.dequantize_4bit(*bnbf.quantize_4bit(torch.randn(8, 64)),
                                                            out=torch.empty(8, 64)))
    print(table("dequantize into a reused output, out= (floor: buffer.fill_(1))"
                + ("" if bnb_reuses else "; bitsandbytes has no CPU kernel for out=, so its column is its fresh-output "
                                         "call"), results["reused"], True) + "\n")
    print("ms: median; ratio: bitsandbytes' time / the implementation's in the same round, median over the rounds "
          "(above 1: faster than bitsandbytes); / floor: the median over the floor's median. The training path "
          "runs 'fast'.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
