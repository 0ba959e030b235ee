"""Checkpoints of a training run, and resuming from the newest one.

A checkpoint ``checkpoint-<step>`` holds the adapter (peft's format), the
optimizer's and the scheduler's states and the random number generators'
states (``training_state.pt``), and the trainer's own record
(``trainer_state.json``: step, history, evaluations). It is written all at
once (:func:`qlora_lab.support.atomic.atomic_directory`), so a run that is
killed loses at most the steps since its last checkpoint, and
:func:`latest_checkpoint` only ever finds complete ones. Reading uses
``torch.load(weights_only=True)``: tensors and plain data, never code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qlora_lab.support.atomic import atomic_directory

__all__ = ["ADAPTER_DIR", "CHECKPOINT_PREFIX", "TRAINER_STATE", "TRAINING_STATE", "checkpoints", "latest_checkpoint",
           "load_training_state", "restore_rng_state", "rng_state", "save_checkpoint"]

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
TRAINING_STATE = "training_state.pt"
ADAPTER_DIR = "adapter"


def rng_state() -> dict[str, Any]:
    """The states of every random number generator a training step draws from."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the states :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of the complete checkpoints in ``out_dir``, oldest first."""
    found = []
    for p in out_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = p.name[len(CHECKPOINT_PREFIX):]
        if p.is_dir() and suffix.isdigit() and (p / TRAINER_STATE).is_file():
            found.append((int(suffix), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``out_dir`` (a directory renamed into
    place only once fully written), or None."""
    found = checkpoints(Path(out_dir))
    return found[-1][1] if found else None


def save_checkpoint(out_dir: Path, step: int, write_adapter: Callable[[Path], Any], optimizer, scheduler,
                    state: dict, keep: int) -> Path:
    """Write ``checkpoint-<step>`` all at once: the adapter (``write_adapter(path)``
    saves it into the directory ``path``), the optimizer's, scheduler's and
    random generators' states, and last the trainer state; then the whole
    directory is renamed into place, and all but the newest ``keep``
    checkpoints are deleted. A checkpoint of the same step left by an
    interrupted run (one that resumed from an earlier checkpoint) is replaced."""
    final = Path(out_dir) / f"{CHECKPOINT_PREFIX}{step}"
    with atomic_directory(final, overwrite=True) as staging:
        write_adapter(staging / ADAPTER_DIR)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_state()}, staging / TRAINING_STATE)
        (staging / TRAINER_STATE).write_text(json.dumps(state, indent=1))
    for _, old in checkpoints(Path(out_dir))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint's ``training_state.pt`` (optimizer, scheduler, random
    states) with ``torch.load(weights_only=True)``: tensors and plain Python
    data only. A pickle can name any function to call while it is read, so a
    file that holds anything else is refused, not run."""
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds Python objects besides tensors and plain data, which could run code while loading, so it "
            f"was refused (torch.load with weights_only=True). A checkpoint written by this course never does: "
            f"resume only from checkpoints you wrote, or start the run again without --resume. ({err})") from None
