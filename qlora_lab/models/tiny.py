"""Tiny models for fast tests and demonstrations: a random Llama with SmolLM2's
structure (:func:`tiny_llama`), the same at tiny size for each architecture
the course finetunes (:func:`tiny_causal_lm`: Llama, Mistral, Qwen2, Gemma 2),
and a tiny chat model on disk with its own tokenizer (:func:`write_tiny_chat_model`).

The chat model on disk is for fast tests of chatting and exporting: a
random Llama (:func:`tiny_llama`) with a small byte-level BPE
tokenizer trained here on a few sentences, with SmolLM2's ChatML special
tokens and chat template. SmolLM2's own 49,152-token vocabulary makes every
GGUF round trip take half a minute (the ``gguf`` reader parses each token and
merge in Python); this one has 384 tokens."""

from __future__ import annotations

import os
from pathlib import Path

import torch


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


TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma2")
"""The architectures of today's open 7B-9B models, each at tiny size: LLaMA 1/2/3
(``llama``), Mistral-7B (``mistral``: grouped-query attention, no biases),
Qwen2/2.5 (``qwen2``: biases on the query, key and value projections) and
Gemma 2 (``gemma2``: a head size of its own, soft-capped logits, tied embeddings)."""


def tiny_causal_lm(architecture: str = "llama", seed: int = 0, vocab_size: int = 512, dtype=torch.float32,
                   **sizes):
    """A random model of ``architecture`` (one of :data:`TINY_ARCHITECTURES`)
    built from its transformers config, 128 wide with 2 layers, 4 query and 2
    key/value heads of 32: every linear layer a whole number of 64-blocks wide,
    as in the real models. The same ``seed`` gives the same weights. ``sizes``
    overrides config fields (``hidden_size=4096, intermediate_size=14336`` ...):
    ``make gpu-check`` builds 2-layer models at a 7B model's full width."""
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    shape = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2) | sizes
    configs = {"llama": lambda: LlamaConfig(**shape, tie_word_embeddings=False),
               "mistral": lambda: MistralConfig(**shape, sliding_window=None, tie_word_embeddings=False),
               "qwen2": lambda: Qwen2Config(**shape, tie_word_embeddings=False),
               "gemma2": lambda: Gemma2Config(**shape, query_pre_attn_scalar=32, sliding_window=64)}
    if architecture not in configs:
        raise ValueError(f"architecture must be one of {', '.join(TINY_ARCHITECTURES)}, got {architecture!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(configs[architecture]())
    return model.to(dtype).eval()


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TEXT = [
    "Convert the date to ISO format: 3 March 2024 is 2024-03-03.",
    "Convert the time to 24-hour format: 7:15 pm is 19:15.",
    "Extract the person's name, age and city. Answer exactly as name=...; age=...; city=...",
    "Sort these words alphabetically: pear, apple, fig.",
    "Hello! How are you today? I am a small language model and I answer questions.",
    "The lighthouse keeper wrote a short story about the sea, the bread and the rivers.",
]


def tiny_chat_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer (transformers ``PreTrainedTokenizerFast``) with
    ``<|im_start|>``/``<|im_end|>`` and a ChatML chat template; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_TEXT * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def write_tiny_chat_model(directory: str | os.PathLike, seed: int = 0, architecture: str | None = None,
                          dtype=torch.float32, **sizes) -> Path:
    """Save a tiny Llama (128 wide, 2 layers; :func:`tiny_llama`), or a tiny
    model of ``architecture`` (:func:`tiny_causal_lm`, with ``sizes``), with
    :func:`tiny_chat_tokenizer` as a transformers model directory; returns it."""

    tokenizer = tiny_chat_tokenizer()
    model = (tiny_llama(seed=seed, vocab_size=len(tokenizer), hidden_size=128) if architecture is None
             else tiny_causal_lm(architecture, seed=seed, **({"vocab_size": len(tokenizer)} | sizes), dtype=dtype))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_tiny_adapter(model_dir: str | os.PathLike, out: str | os.PathLike, seed: int = 1, r: int = 4,
                       alpha: float = 8.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"), dropout: float = 0.05) -> Path:
    """A LoRA adapter for the model in ``model_dir`` with random ``A`` *and*
    ``B`` (a trained adapter's ``B`` is not zero; scaled so that it changes the
    logits clearly), saved in peft's format naming ``model_dir`` as its base.
    Its config carries ``dropout`` (0.05 like the course's trained adapters),
    which a loaded adapter must ignore in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_lab.lora import add_lora, lora_modules, save_adapter
    from qlora_lab.support.loading import quiet_loading

    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        add_lora(model, r=r, alpha=alpha, dropout=dropout, target_modules=list(target_modules))
        with torch.no_grad():
            for layer in lora_modules(model).values():
                layer.lora_A.normal_(0.0, 0.1)
                layer.lora_B.normal_(0.0, 0.1)
    return save_adapter(model, out, base_model_name_or_path=str(model_dir))
