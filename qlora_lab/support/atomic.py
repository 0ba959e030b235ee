"""Writing a directory so that nobody ever sees it half written.

Adapters, training checkpoints, random-weight checkpoints and the SmolLM2
cache are directories of several files. A run that is killed while writing
one must not leave something that looks complete but is not. The recipe is
the usual one: write everything into a hidden staging directory beside the
target (the same file system, so a rename is atomic), flush every file and
directory to disk (``fsync``), then rename the staging directory into place.
:func:`atomic_directory` does that; it refuses to replace an existing target
unless it is told to (``overwrite=True``), and then the old directory is
moved aside first and deleted only after the new one is in place. An empty
directory counts as free.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_directory", "fsync_directory", "fsync_tree", "staging_directory"]


def fsync_directory(path: str | os.PathLike) -> None:
    """Flush a directory's entries (the names of files renamed into it) to
    disk. Some file systems cannot fsync a directory; that is not an error."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file under ``root`` and then every directory, deepest first."""
    directories = []
    for here, _, files in os.walk(root):
        directories.append(here)
        for name in files:
            with open(os.path.join(here, name), "rb") as f:
                os.fsync(f.fileno())
    for here in reversed(directories):
        fsync_directory(here)


def staging_directory(target: str | os.PathLike) -> Path:
    """A new empty hidden directory beside ``target``, in the same parent
    (so renaming it onto ``target`` is atomic), with the usual permissions
    (``tempfile.mkdtemp`` would make it private to its owner)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    staging.mkdir()
    return staging


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Write the directory ``target`` all at once.

    Yields an empty staging directory; write the files into it. When the
    ``with`` block ends normally, every file is flushed to disk and the
    staging directory is renamed to ``target``. When it raises, the staging
    directory is deleted and ``target`` is left as it was.

    An existing ``target`` that is not empty raises ``FileExistsError``
    (before anything is written) unless ``overwrite=True`` (an empty one is
    simply replaced); then the old directory is renamed
    aside, the new one renamed in, and the old one deleted, so a crash leaves
    either the old directory, or the new one, or none, never a mixture.
    ``target`` being a file is a ``ValueError``.

    >>> with atomic_directory(path) as staging:          # doctest: +SKIP
    ...     (staging / "config.json").write_text("{}")
    """
    target = Path(target).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file; a directory was to be written there. Remove it or choose another path.")
    if _occupied(target) and not overwrite:
        raise FileExistsError(f"{target} already exists; choose a new directory, or pass overwrite=True to replace "
                              f"it as a whole.")
    staging = staging_directory(target)
    try:
        yield staging
        fsync_tree(staging)
        old = None
        if _occupied(target):
            if not overwrite:
                raise FileExistsError(f"{target} appeared while it was being written (another process?); it was "
                                      f"left as it is.")
            old = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.old"
            target.rename(old)
        elif target.exists():
            target.rmdir()  # an empty directory (made by mkdtemp, say) holds nothing to lose
        staging.rename(target)
        fsync_directory(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _occupied(path: Path) -> bool:
    """Whether ``path`` is a directory with something in it."""
    return path.is_dir() and any(path.iterdir())
