"""Process-group plumbing for chapter 09 (:mod:`qlora_lab.beyond.fsdp`).

``torchrun`` starts one Python process per device and tells each who it is
through environment variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``). This module reads them, refuses clearly
when they are missing, picks the communication backend (gloo on CPUs, nccl on
CUDA GPUs), starts and ends the process group, and offers the few collective
helpers the training loop needs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "BACKENDS",
    "TORCHRUN_VARIABLES",
    "all_reduce_sum",
    "check_environment",
    "choose_backend",
    "device_for_rank",
    "gather_to_rank0",
    "process_group",
    "run_torchrun",
]

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
BACKENDS = ("auto", "gloo", "nccl")
LAUNCH_HINT = ("start it with torchrun, one process per device, e.g. "
               "`torchrun --standalone --nproc_per_node 2 -m qlora_lab finetune --fsdp --preset smollm2-cpu --out DIR`")


def check_environment(environ: dict[str, str] | None = None) -> dict[str, int]:
    """``{"rank", "local_rank", "world_size"}`` from torchrun's variables; a
    ValueError naming the missing ones (and how to launch) if the process was
    not started by torchrun."""
    environ = os.environ if environ is None else environ
    missing = [name for name in TORCHRUN_VARIABLES if name not in environ]
    if missing:
        raise ValueError(f"--fsdp needs a distributed environment, but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not set: {LAUNCH_HINT}")
    try:
        info = {"rank": int(environ["RANK"]), "local_rank": int(environ["LOCAL_RANK"]),
                "world_size": int(environ["WORLD_SIZE"])}
    except ValueError:
        raise ValueError(f"RANK, LOCAL_RANK and WORLD_SIZE must be integers, got {environ['RANK']!r}, "
                         f"{environ['LOCAL_RANK']!r}, {environ['WORLD_SIZE']!r}") from None
    if not 0 <= info["rank"] < info["world_size"]:
        raise ValueError(f"RANK={info['rank']} is outside WORLD_SIZE={info['world_size']}")
    return info


def choose_backend(name: str = "auto", cuda: bool | None = None) -> str:
    """The process-group backend: ``auto`` is nccl on CUDA GPUs and gloo on
    CPUs. nccl without CUDA, or a backend this PyTorch build lacks, is a
    ValueError."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name not in BACKENDS:
        raise ValueError(f"the distributed backend must be one of {', '.join(BACKENDS)}, got {name!r} "
                         f"(FSDP needs all-gather and reduce-scatter, which gloo and nccl provide)")
    if name == "auto":
        name = "nccl" if cuda else "gloo"
    if name == "nccl" and not cuda:
        raise ValueError("the nccl backend talks between CUDA GPUs and this machine has none; "
                         "use --dist-backend gloo (or auto) to shard across CPU processes")
    if not dist.is_backend_available(name):
        raise ValueError(f"this PyTorch build has no {name} backend; use "
                         f"{'gloo' if name != 'gloo' else 'nccl on a CUDA build'}")
    return name


def device_for_rank(local_rank: int, backend: str) -> torch.device:
    """One device per process: ``cuda:LOCAL_RANK`` with nccl, the CPU with gloo."""
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@contextmanager
def process_group(backend: str = "auto"):
    """Start the process group (from torchrun's environment), yield
    ``(info, device)``, and end it however the block ends."""
    info = check_environment()
    backend = choose_backend(backend)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(backend=backend)
    try:
        yield {**info, "backend": backend}, device_for_rank(info["local_rank"], backend)
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sum(value: float) -> float:
    """The sum of a Python float over all ranks."""
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere)."""
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def run_torchrun(nproc: int, args: list[str], timeout: float = 900.0, threads_per_process: int = 1):
    """``torchrun --standalone --nproc_per_node nproc -m qlora_lab <args>`` in a
    subprocess (how a notebook launches a distributed run); the finished
    ``subprocess.CompletedProcess``, with a RuntimeError showing the end of
    its error output if it failed."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_process),
           "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    for name in TORCHRUN_VARIABLES:  # a launch from inside a distributed process starts afresh
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "qlora_lab", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"the distributed run failed (exit code {done.returncode}):\n{tail}")
    return done
