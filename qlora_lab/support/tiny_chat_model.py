"""A tiny chat model on disk for fast tests of chatting and exporting: a
random Llama (``qlora_lab.models.tiny_llama``) with a small byte-level BPE
tokenizer trained here on a few sentences, with SmolLM2's ChatML special
tokens and chat template. SmolLM2's own 49,152-token vocabulary makes every
GGUF round trip take half a minute (the ``gguf`` reader parses each token and
merge in Python); this one has 384 tokens."""

from __future__ import annotations

import os
from pathlib import Path

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


def write_tiny_chat_model(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny Llama (128 wide, 2 layers) and :func:`tiny_chat_tokenizer`
    as a transformers model directory; returns it."""
    from qlora_lab.models import tiny_llama

    tokenizer = tiny_chat_tokenizer()
    model = tiny_llama(seed=seed, vocab_size=len(tokenizer), hidden_size=128)
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

    from qlora_lab.lora import add_lora, lora_modules, save_adapter
    from qlora_lab.models import load_model

    model = load_model(str(model_dir), with_tokenizer=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        add_lora(model, r=r, alpha=alpha, dropout=dropout, target_modules=list(target_modules))
        with torch.no_grad():
            for layer in lora_modules(model).values():
                layer.lora_A.normal_(0.0, 0.1)
                layer.lora_B.normal_(0.0, 0.1)
    return save_adapter(model, out, base_model_name_or_path=str(model_dir))
