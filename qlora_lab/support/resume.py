"""Checkpoints of a training run, and resuming from the newest one.

A checkpoint ``checkpoint-<step>`` holds the adapter (peft's format), the
optimizer's and the scheduler's states and the random number generators'
states (``training_state.pt``), and the trainer's own record
(``trainer_state.json``: step, history, evaluations). It is written all at
once (:func:`qlora_lab.support.atomic.atomic_directory`), so a run that is
killed loses at most the steps since its last checkpoint, and
:func:`latest_checkpoint` only ever finds complete ones. Reading uses
``torch.load(weights_only=True)``: tensors and plain data, never code.

A checkpoint can still be damaged after it was written (a disk error, a copy
cut short, a file overwritten by hand). :func:`newest_intact_checkpoint`
reads every part of the newest checkpoint before the run trusts it; a damaged
one is named in a warning and the next older one is tried.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qlora_lab.support.atomic import atomic_directory

__all__ = ["ADAPTER_DIR", "CHECKPOINT_PREFIX", "TRAINER_STATE", "TRAINING_STATE", "DamagedCheckpointError",
           "checkpoints", "latest_checkpoint", "load_training_state", "newest_intact_checkpoint", "restore_rng_state",
           "rng_state", "save_checkpoint"]

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


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(out_dir: Path, step: int, write_adapter: Callable[[Path], Any], training_state: dict[str, Any],
                    state: dict, keep: int) -> Path:
    """Write ``checkpoint-<step>`` all at once: the adapter (``write_adapter(path)``
    saves it into the directory ``path``), ``training_state`` (the optimizer's,
    scheduler's and random generators' states: ``{"optimizer", "scheduler",
    "rng"}``, as ``train.OneProcess.training_state`` returns them) in
    ``training_state.pt``, and last the trainer state; then the whole
    directory is renamed into place, and all but the newest ``keep``
    checkpoints are deleted. A checkpoint of the same step left by an
    interrupted run (one that resumed from an earlier checkpoint) is replaced."""
    final = Path(out_dir) / f"{CHECKPOINT_PREFIX}{step}"
    try:
        with atomic_directory(final, overwrite=True) as staging:
            write_adapter(staging / ADAPTER_DIR)
            torch.save(training_state, staging / TRAINING_STATE)
            # The trainer state, written last, records every file's SHA-256: a
            # flipped bit on disk is then found on resume (torch.load does not check).
            digests = {str(f.relative_to(staging)): _sha256(f) for f in sorted(staging.rglob("*")) if f.is_file()}
            (staging / TRAINER_STATE).write_text(json.dumps({**state, "files": digests}, indent=1))
    except OSError as err:  # a full disk, a lost mount: the half-written copy is gone, the older ones are untouched
        previous = latest_checkpoint(out_dir)
        kept = f"the newest complete one, {previous.name}, is intact" if previous else "no earlier checkpoint exists"
        raise OSError(err.errno, f"could not write {final.name} in {out_dir} ({err.strerror or err}); nothing of it "
                      f"was kept and {kept}. Free space (or fix the disk) and run again with --resume.") from err
    for _, old in checkpoints(Path(out_dir))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


class DamagedCheckpointError(ValueError):
    """A checkpoint file that cannot be read back: truncated, overwritten or corrupted."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = Path(path)
        where = next((p for p in self.path.parents if p.name.startswith(CHECKPOINT_PREFIX)), self.path.parent)
        super().__init__(f"{path} is damaged: {what}. Delete {where} to resume from an older checkpoint, or start "
                         f"the run again in a new --out directory.")


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive; anything else is not a file this course wrote


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint's ``training_state.pt`` (optimizer, scheduler, random
    states) with ``torch.load(weights_only=True)``: tensors and plain Python
    data only. A pickle can name any function to call while it is read, so a
    file that holds anything else is refused, not run. A file that is not a
    whole archive (truncated, overwritten, corrupted) raises
    :class:`DamagedCheckpointError`; the two are told apart, since the first
    is a warning about where a file came from and the second a disk's fault."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise DamagedCheckpointError(path, "the file is missing")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _ZIP_MAGIC:
        raise DamagedCheckpointError(path, f"it is not a PyTorch archive (it starts with {head!r}, not {_ZIP_MAGIC!r})")
    try:
        saved = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" not in str(err) and "Unsupported global" not in str(err):
            raise DamagedCheckpointError(path, f"its contents cannot be read ({str(err).splitlines()[0]})") from None
        raise ValueError(
            f"{path} holds Python objects besides tensors and plain data, which could run code while loading, so it "
            f"was refused (torch.load with weights_only=True). A checkpoint written by this course never does: "
            f"resume only from checkpoints you wrote, or start the run again without --resume.") from None
    except (RuntimeError, EOFError, OSError, KeyError) as err:  # zip reader: truncated archive, bad CRC, lost record
        raise DamagedCheckpointError(path, f"the archive is incomplete or corrupted ({str(err).split('. ')[0]})") from None
    if not isinstance(saved, dict) or not {"optimizer", "scheduler", "rng"} <= set(saved):
        raise DamagedCheckpointError(path, "it does not hold the optimizer, scheduler and random states")
    return saved


def _read_checkpoint(checkpoint: Path) -> tuple[dict, dict]:
    """``(training_state, trainer_state)`` of one checkpoint, every file read
    and checked (the adapter's weights too), or :class:`DamagedCheckpointError`."""
    from safetensors.torch import load_file

    trainer_path = checkpoint / TRAINER_STATE
    try:
        state = json.loads(trainer_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DamagedCheckpointError(trainer_path, f"it is not readable JSON ({err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise DamagedCheckpointError(trainer_path, "it has no step number")
    for name, digest in state.pop("files", {}).items():  # checkpoints written before the digests have none
        if not (checkpoint / name).is_file():
            raise DamagedCheckpointError(checkpoint / name, "the file is missing")
        if _sha256(checkpoint / name) != digest:
            raise DamagedCheckpointError(checkpoint / name, "its contents changed after it was written (SHA-256 "
                                         f"differs from the one recorded in {TRAINER_STATE})")
    weights = next((checkpoint / ADAPTER_DIR).glob("*.safetensors"), None)
    if weights is None:
        raise DamagedCheckpointError(checkpoint / ADAPTER_DIR, "the adapter's weights file is missing")
    try:
        load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise DamagedCheckpointError(weights, f"it is not a readable safetensors file ({err})") from None
    return load_training_state(checkpoint / TRAINING_STATE), state


def newest_intact_checkpoint(out_dir: str | os.PathLike) -> tuple[Path, dict, dict] | None:
    """``(checkpoint, training_state, trainer_state)`` of the newest checkpoint
    in ``out_dir`` whose every file reads back, or None if there are none. Each
    damaged newer one is named in a warning (and left on disk: the run
    replaces it when it reaches that step again). If every checkpoint is
    damaged, the newest one's error is raised."""
    found = checkpoints(Path(out_dir))
    damaged = []
    for _, checkpoint in reversed(found):
        try:
            saved, state = _read_checkpoint(checkpoint)
        except DamagedCheckpointError as err:
            damaged.append(err)
            continue
        for err in damaged:
            warnings.warn(f"{err} Resuming from {checkpoint.name}, the newest intact checkpoint.", stacklevel=2)
        return checkpoint, saved, state
    if damaged:
        raise damaged[0]
    return None
