"""Any Hugging Face model, for readers with a GPU: load it by hub id or from a
local directory, and talk to a chat model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qlora_lab.models.generation import greedy
from qlora_lab.models.smollm2 import SMOLLM2_NAMES, ModelNotAvailableError, load_smollm2, smollm2_cache_path
from qlora_lab.models.tiny import tiny_llama
from qlora_lab.support.loading import quiet_loading


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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    (new_tokens,) = greedy(model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=max_new_tokens,
                           pad_id=pad)
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
