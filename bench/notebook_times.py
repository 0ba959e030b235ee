"""Each notebook's wall time under nbval, one notebook at a time: the numbers of the
README's chapter table (``make notebook-times``).

Every notebook runs in its own ``pytest --nbval`` process exactly as ``make test``
runs it (same sanitizer, same strict comparison), so a time is only reported for a
notebook that also passes. The time includes starting the kernel and importing the
libraries, as a learner's Run All does.

    .venv/bin/python bench/notebook_times.py                   # every notebook
    .venv/bin/python bench/notebook_times.py notebooks/07_finetune_7b.ipynb
    .venv/bin/python bench/notebook_times.py --json times.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import _shared

ROOT = Path(__file__).resolve().parent.parent
NBVAL_ARGS = ["--nbval", "--nbval-current-env", "--nbval-sanitize-with", str(ROOT / "nbval_sanitize.cfg"),
              "--nbval-cell-timeout", "600", "-q", "-p", "no:cacheprovider"]
#: The budgets of COURSE.md on 2 cores without AVX-512, in seconds.
BUDGET_SECONDS = {"07_finetune_7b.ipynb": 360}
DEFAULT_BUDGET = 180


def budget(notebook: Path) -> int:
    return BUDGET_SECONDS.get(notebook.name, DEFAULT_BUDGET)


def time_notebook(notebook: Path) -> dict:
    """``{"notebook", "seconds", "passed", "budget"}`` for one nbval run."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", str(notebook), *NBVAL_ARGS], cwd=ROOT,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    tail = result.stdout.strip().splitlines()[-1:] or [""]
    name = str(notebook.relative_to(ROOT)) if notebook.is_relative_to(ROOT) else str(notebook)
    return {"notebook": name, "seconds": round(seconds, 1),
            "passed": result.returncode == 0, "budget": budget(notebook), "summary": tail[0]}


def table(rows: list[dict]) -> str:
    width = max(len(r["notebook"]) for r in rows)
    lines = [f"{'notebook':<{width}}  {'time':>8}  {'budget':>6}  result"]
    for r in rows:
        verdict = "passed" if r["passed"] else f"FAILED ({r['summary']})"
        over = "" if r["seconds"] <= r["budget"] else "  OVER BUDGET"
        lines.append(f"{r['notebook']:<{width}}  {r['seconds']:>7.1f}s  {r['budget']:>5}s  {verdict}{over}")
    lines.append(f"{'total':<{width}}  {sum(r['seconds'] for r in rows):>7.1f}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to time (default: every notebook, chapters then solutions)")
    parser.add_argument("--json", type=Path, help="also write the rows and the machine to this file")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or [*sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")),
                                   *sorted((ROOT / "notebooks" / "solutions").glob("*.ipynb"))]
    missing = [str(n) for n in notebooks if not n.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    machine = _shared.machine()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']}, "
          f"CPU capability {machine['cpu_capability']}", flush=True)
    rows = []
    for notebook in notebooks:
        rows.append(time_notebook(notebook.resolve()))
        print(f"  {rows[-1]['notebook']}: {rows[-1]['seconds']:.1f} s, {'passed' if rows[-1]['passed'] else 'FAILED'}",
              flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "notebooks": rows}, indent=1) + "\n")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
