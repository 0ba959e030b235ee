"""After finetuning, part 1: talking to the model, and one base serving several adapters.

A QLoRA run ends with an adapter directory in peft's format: a few megabytes
of ``A`` and ``B`` matrices and a config that names the base model. To use it
we rebuild what training saw, the frozen base in 4 bits (NF4 + double
quantization, QLoRA Sec. 3) with the adapter beside every linear layer, and
generate with the model's own chat template:

* :func:`load_with_adapter` loads the base the adapter names (or another one),
  quantizes it like the training run did (the course's layers on a CPU,
  bitsandbytes while loading on a GPU), and loads the adapter into it; an
  adapter that was trained for another base is refused before anything is
  changed (its shapes do not fit);
* :func:`reply` answers a conversation greedily and streams the tokens as they
  are generated; :func:`chat_loop` is the interactive session of
  ``python -m qlora_lab chat`` (``/reset`` forgets the conversation, ``/quit``
  leaves);
* :class:`AdapterSet` keeps several adapters on one base and switches between
  them at run time: the base's weights are shared, each adapter is a set of
  small :class:`qlora_lab.lora.LoRALinear` wrappers around the same base
  layers, and switching puts one set (or none) into the model. No weight is
  copied or reloaded. peft calls the same thing ``load_adapter`` /
  ``set_adapter``; the chapter shows the two give the same outputs.
* :func:`generation_speed`: greedy tokens per second, for the chapter's ledger
  of what 4 bits cost at inference on a CPU; :func:`cpu_name` says which CPU.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

import torch
from torch import nn

from qlora_lab.finetune import chat_format
from qlora_lab.lora import CONFIG_NAME, LoRALinear, load_adapter, lora_modules
from qlora_lab.models.generation import greedy
from qlora_lab.support.modules import replace_module

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


# --------------------------------------------------------------------------- #
# Loading base + adapter
# --------------------------------------------------------------------------- #
def adapter_config(adapter_dir: str | os.PathLike) -> dict:
    """The adapter's ``adapter_config.json``, with a clear error when there is none."""
    directory = Path(adapter_dir).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"There is no adapter directory {directory}; pass the directory a finetuning run "
                                f"wrote (it holds {CONFIG_NAME} and adapter_model.safetensors).")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{directory} has no {CONFIG_NAME}, so it is not an adapter directory; pass the "
                         f"'adapter' directory of a finetuning run.")
    return json.loads(path.read_text())


def base_model_name(adapter_dir: str | os.PathLike) -> str:
    """The base model an adapter names (``base_model_name_or_path`` of its config)."""
    name = adapter_config(adapter_dir).get("base_model_name_or_path")
    if not name:
        raise ValueError(f"The adapter at {adapter_dir} does not name its base model; pass --model NAME_OR_PATH.")
    return str(name)


def check_tokenizer_files(directory: str | os.PathLike) -> None:
    """A model directory must carry its tokenizer: chatting needs its chat
    template, and an exported model without one cannot be used."""
    directory = Path(directory).expanduser()
    if directory.is_dir() and not any((directory / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"{directory} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the base "
                         f"model's tokenizer files into it (tokenizer.save_pretrained(directory)).")


def load_with_adapter(adapter_dir: str | os.PathLike, model: str | None = None, *, quantize: bool = True,
                      base=None, tokenizer=None, quantizer: str = "auto"):
    """``(model, tokenizer)``: the base the adapter names (or ``model``, a name
    or path; or an already loaded ``base`` with its ``tokenizer``), quantized
    to NF4 + double quantization as QLoRA trained it (``quantize=False`` keeps
    the float weights), with the adapter loaded beside its layers. The model
    is in eval mode.

    Who quantizes (``quantizer``): ``"qlora_lab"``, the course's layers, after
    loading the float model (a CPU's default); ``"bitsandbytes"``, transformers
    with a ``BitsAndBytesConfig`` while it loads, so a 7B base never exists in
    16 bits on the device, onto the GPU when there is one (a GPU's default)."""
    from qlora_lab.models import load_model
    from qlora_lab.qlora import quantize_model

    if quantizer not in ("auto", "qlora_lab", "bitsandbytes"):
        raise ValueError(f"quantizer must be auto, qlora_lab or bitsandbytes, got {quantizer!r}")
    if quantizer == "auto":
        quantizer = "bitsandbytes" if torch.cuda.is_available() else "qlora_lab"
    config = adapter_config(adapter_dir)
    if base is None:
        name = model or base_model_name(adapter_dir)
        check_tokenizer_files(name)
        if quantize and quantizer == "bitsandbytes":
            from qlora_lab.finetune.backends import bitsandbytes_config

            dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
            base, tokenizer = load_model(name, dtype=dtype, quantization_config=bitsandbytes_config("nf4", True, dtype),
                                         device_map={"": 0} if torch.cuda.is_available() else None)
            quantize = False  # done while loading
        else:
            base, tokenizer = load_model(name)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with the base model")
    if quantize:
        quantize_model(base)
    try:
        load_adapter(base, adapter_dir)
    except ValueError as err:
        raise ValueError(f"The adapter at {adapter_dir} does not fit this base model (it names "
                         f"{config.get('base_model_name_or_path')!r}): {err}") from None
    chat_format.ensure_chat_template(tokenizer)
    return base.eval(), tokenizer


# --------------------------------------------------------------------------- #
# Replies, streamed
# --------------------------------------------------------------------------- #
class TokenStreamer:
    """Receives the tokens ``model.generate`` produces (transformers' streamer
    protocol: ``put`` for the prompt, then for each new token; ``end`` at the
    end) and writes the reply's text as it grows. A character that spans
    several tokens (UTF-8 bytes) is held back until it is complete."""

    def __init__(self, tokenizer, write: Callable[[str], object]) -> None:
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.shown = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._show(text)

    def end(self) -> None:
        self._show(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _show(self, text: str) -> None:
        if len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)


@torch.no_grad()
def reply(model, tokenizer, messages: list[dict] | str, max_new_tokens: int = 128,
          stream: TextIO | None = None) -> str:
    """The model's greedy reply to ``messages`` (or one user message), up to its
    end-of-turn token. With ``stream``, each piece of text is written (and
    flushed) as soon as its tokens are generated."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    ids = torch.tensor([chat_format.prompt_ids(messages, tokenizer)])
    streamer = None
    if stream is not None:
        streamer = TokenStreamer(tokenizer, lambda text: (stream.write(text), stream.flush()))
    eot = chat_format.end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    (new,) = greedy(model, ids, max_new_tokens=max_new_tokens, stop_id=eot, pad_id=pad, streamer=streamer)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def chat_loop(model, tokenizer, read: Callable[[str], str] = input, out: TextIO = sys.stdout,
              max_new_tokens: int = 128) -> list[dict]:
    """An interactive chat: each line read is a user turn, the reply is
    streamed to ``out``. ``/reset`` starts a new conversation, ``/quit`` (or the
    end of input) ends the session. Returns the last conversation."""
    out.write("Chat with the model. /reset forgets the conversation, /quit leaves.\n")
    messages: list[dict] = []
    while True:
        try:
            line = read("you> ")
        except EOFError:
            out.write("\n")
            break
        text = line.strip()
        if text == "/quit":
            break
        if text == "/reset":
            messages = []
            out.write("(conversation reset)\n")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        out.write("model> ")
        answer = reply(model, tokenizer, messages, max_new_tokens, stream=out)
        out.write("\n")
        messages.append({"role": "assistant", "content": answer})
    return messages


# --------------------------------------------------------------------------- #
# Several adapters on one base
# --------------------------------------------------------------------------- #
class AdapterSet:
    """Several LoRA adapters on one base model, switched at run time.

    ``add(name, path)`` loads an adapter: :func:`qlora_lab.lora.load_adapter`
    wraps the base layers it targets in :class:`LoRALinear` modules, which are
    kept and taken out of the model again. ``use(name)`` puts that adapter's
    wrappers in (``use(None)``: the bare base). Every wrapper holds the *same*
    base layer object, so N adapters cost the base once plus N adapters.
    """

    def __init__(self, model: nn.Module) -> None:
        if lora_modules(model):
            raise ValueError("AdapterSet needs the base model without adapters (it loads and switches them itself).")
        self.model = model
        self.adapters: dict[str, dict[str, LoRALinear]] = {}
        self.active: str | None = None

    def add(self, name: str, path: str | os.PathLike) -> None:
        """Load the adapter at ``path`` under ``name`` (the active one stays active)."""
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded; choose another name")
        active = self.active
        self.use(None)
        try:
            load_adapter(self.model, path)
        except ValueError as err:
            raise ValueError(f"The adapter at {path} does not fit this base model: {err}") from None
        layers = lora_modules(self.model)
        self.adapters[name] = layers
        for module_name, layer in layers.items():
            replace_module(self.model, module_name, layer.base)
        self.use(active)

    def use(self, name: str | None) -> nn.Module:
        """Make ``name`` the active adapter (``None``: no adapter); returns the model."""
        if name is not None and name not in self.adapters:
            raise ValueError(f"no adapter named {name!r}; loaded: {sorted(self.adapters)}")
        if self.active is not None:
            for module_name, layer in self.adapters[self.active].items():
                replace_module(self.model, module_name, layer.base)
        if name is not None:
            for module_name, layer in self.adapters[name].items():
                layer.train(self.model.training)
                replace_module(self.model, module_name, layer)
        self.active = name
        return self.model

    def adapter_bytes(self, name: str) -> int:
        """Bytes of one adapter's ``A`` and ``B`` matrices."""
        return sum(t.numel() * t.element_size() for layer in self.adapters[name].values()
                   for t in (layer.lora_A, layer.lora_B))


# --------------------------------------------------------------------------- #
# Speed
# --------------------------------------------------------------------------- #
@torch.no_grad()
def generation_speed(model, tokenizer, prompt: str = "Write a short story about a lighthouse.",
                     new_tokens: int = 32, repeats: int = 1) -> float:
    """Tokens per second of greedy generation (batch 1, key/value cache on),
    exactly ``new_tokens`` tokens after the prompt, best of ``repeats`` runs."""
    ids = torch.tensor([chat_format.prompt_ids([{"role": "user", "content": prompt}], tokenizer)])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    best = float("inf")
    was_training = model.training
    model.eval()
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            (row,) = greedy(model, ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_id=pad)
            best = min(best, time.perf_counter() - started)
            assert len(row) == new_tokens
    finally:
        model.train(was_training)
    return new_tokens / best


def cpu_name() -> str:
    """The CPU a speed was measured on: its model name (Linux's /proc/cpuinfo, else
    what ``platform`` knows) and the kernels torch chose for it (AVX2, AVX512, ...)."""
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine())
    return f"{name} (torch kernels {torch.backends.cpu.get_cpu_capability()})"
