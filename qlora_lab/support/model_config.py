"""Reading a model's configuration: the one place that turns "llama-7b", a
path, a dict or a transformers config into a config object and into the
dimensions the memory model needs.

Plumbing, not course material. :func:`read_model_config` accepts every form
the course passes around; :func:`config_value` reads one field from a dict or
a config alike; :func:`model_shape` collects the dimensions of a Llama-style
decoder, naming any field that is missing; :func:`count_parameters` counts a
model's parameters by building it on the ``meta`` device (no weights).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SHIPPED_CONFIGS = {
    "llama-7b": "llama-7b.json",
    "llama-13b": "llama-13b.json",
    "llama-33b": "llama-33b.json",
    "llama-30b": "llama-33b.json",  # Meta's name for the same 32.5B model
    "llama-65b": "llama-65b.json",
    "llama-2-70b": "llama-2-70b.json",  # grouped-query attention (8 key/value heads); chapter 09
    # today's open 7B-8B models (their config.json on the hub, copied): the 7B path's choices
    "llama-3.1-8b": "llama-3.1-8b.json",  # 128,256-token vocabulary, 8 key/value heads; gated
    "mistral-7b-v0.3": "mistral-7b-v0.3.json",  # 8 key/value heads, FFN 14,336
    "qwen2.5-7b": "qwen2.5-7b.json",  # 152,064-token vocabulary, 4 key/value heads, q/k/v biases
}
"""Model configurations shipped with the course, so that the memory model and
the dry run work offline. LLaMA (Touvron et al., 2023, Table 2: hidden
4096/5120/6656/8192, 32/40/60/80 layers, 32/40/52/64 heads; FFN width
11008/13824/17920/22016; vocabulary 32000; RMSNorm eps 1e-6; context 2048;
untied input and output embeddings), LLaMA-2-70B, and the ``config.json`` of
Llama-3.1-8B, Mistral-7B-v0.3 and Qwen2.5-7B as their hub repositories have them."""

HUB_IDS = {
    "huggyllama/llama-7b": "llama-7b",
    "meta-llama/llama-3.1-8b": "llama-3.1-8b", "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b",
    "mistralai/mistral-7b-v0.3": "mistral-7b-v0.3", "mistralai/mistral-7b-instruct-v0.3": "mistral-7b-v0.3",
    "qwen/qwen2.5-7b": "qwen2.5-7b", "qwen/qwen2.5-7b-instruct": "qwen2.5-7b",
}
"""Hub ids (lower case) whose architecture a shipped config describes (an
instruct model has its base's shapes), read offline by :func:`read_model_config`."""

SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
"""The config fields :func:`model_shape` needs."""


def read_model_config(config: Any):
    """A transformers ``PretrainedConfig`` from ``config``: a config object, a
    dict (with ``model_type``), a path to a config JSON file or to a model
    directory holding ``config.json``, or a shipped name such as ``"llama-7b"``
    (see :data:`SHIPPED_CONFIGS`)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, Mapping):
        values = dict(config)
        model_type = values.pop("model_type", None)
        if model_type is None:
            raise ValueError("the config dict has no 'model_type'; add one, e.g. {'model_type': 'llama', ...}")
        try:
            return AutoConfig.for_model(model_type, **values)
        except ValueError as err:
            raise ValueError(f"transformers does not know model_type {model_type!r}: {err}") from None
    if isinstance(config, (str, os.PathLike)):
        name = str(config)
        name = HUB_IDS.get(name.lower(), name)
        if name.lower() in SHIPPED_CONFIGS:
            return AutoConfig.from_pretrained(CONFIG_DIR / SHIPPED_CONFIGS[name.lower()])
        path = Path(name).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ValueError(f"{path} has no config.json; pass a model directory or a config JSON file")
            return AutoConfig.from_pretrained(path)
        if path.is_file():
            try:
                values = json.loads(path.read_text())
            except ValueError as err:
                raise ValueError(f"{path} is not a JSON config file ({err})") from None
            return read_model_config(values)
        raise ValueError(
            f"no config called {name!r}: pass a config object, a dict, a path to a config JSON file "
            f"or model directory, or one of {sorted(SHIPPED_CONFIGS)}"
        )
    raise TypeError(
        f"config must be a transformers config, a dict, a path or a shipped name, not {type(config).__name__}"
    )


def config_value(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` for a dict, ``config.key`` for a config object;
    ``default`` when it is missing or None."""
    value = config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)
    return default if value is None else value


def model_name(config: Any, original: Any = None) -> str:
    """A short name for tables: the shipped name if ``original`` was one,
    else the directory name of the config, else its ``model_type``."""
    if isinstance(original, str) and HUB_IDS.get(original.lower(), original.lower()) in SHIPPED_CONFIGS:
        return HUB_IDS.get(original.lower(), original.lower())
    name = getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "")
    return Path(name).name if name else config.model_type


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder that the memory model needs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def model_shape(config: Any) -> ModelShape:
    """Read :class:`ModelShape` from any form :func:`read_model_config` takes
    (or from a plain dict of fields), naming any missing field."""
    if not isinstance(config, Mapping) or "model_type" in config:
        config = read_model_config(config)
    values = {}
    for name in SHAPE_FIELDS:
        value = config_value(config, name)
        if value is None:
            raise ValueError(
                f"the {type(config).__name__} has no '{name}', which the memory model needs "
                f"(it needs {', '.join(SHAPE_FIELDS)}); pass a decoder-only causal-LM config that defines it"
            )
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"config field '{name}' must be a positive integer, got {value!r}")
        values[name] = value
    heads = values["num_attention_heads"]
    return ModelShape(
        hidden=values["hidden_size"],
        intermediate=values["intermediate_size"],
        layers=values["num_hidden_layers"],
        heads=heads,
        kv_heads=config_value(config, "num_key_value_heads", heads),
        head_dim=config_value(config, "head_dim", values["hidden_size"] // heads),
        vocab=values["vocab_size"],
    )


# --------------------------------------------------------------------------- #
# Parameters, counted on the meta device
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a causal LM, counted on the meta device (no weights)."""

    total: int
    """Every parameter once (tied embeddings count once)."""
    block_linear_shapes: tuple[tuple[int, int], ...]
    """``(out_features, in_features)`` of every linear layer that QLoRA
    quantizes and LoRA adapts: all of them except the output embedding."""
    largest: int = 0
    """Elements of the largest parameter tensor."""

    @property
    def block_linear(self) -> int:
        return sum(o * i for o, i in self.block_linear_shapes)

    @property
    def other(self) -> int:
        """Parameters kept in 16 bits under QLoRA: embeddings, lm_head, norms, biases."""
        return self.total - self.block_linear

    def lora(self, r: int) -> int:
        """LoRA parameters at rank ``r`` on every block linear layer: ``r (in + out)`` each."""
        return sum(r * (o + i) for o, i in self.block_linear_shapes)

    def largest_lora(self, r: int) -> int:
        """Elements of the largest LoRA matrix (``A`` is r x in, ``B`` is out x r)."""
        return r * max((max(o, i) for o, i in self.block_linear_shapes), default=0)


@functools.lru_cache(maxsize=32)
def count_parameters_of_json(config_json: str) -> ParameterCount:
    """:func:`count_parameters` of a config given as its full JSON string
    (the cache key: a model is built once per configuration)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D
    from transformers.utils import logging as hf_logging

    from qlora_lab.support.counting import parameter_count

    values = json.loads(config_json)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise ValueError(f"transformers cannot build a causal LM from this config: {err}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    output = model.get_output_embeddings()
    skip = {id(output)} if output is not None else set()
    shapes = []
    for module in model.modules():
        if id(module) in skip:
            continue
        if isinstance(module, torch.nn.Linear):
            shapes.append((module.out_features, module.in_features))
        elif isinstance(module, Conv1D):  # GPT-2 style linear layers, weight stored (in, out)
            shapes.append((module.weight.shape[1], module.weight.shape[0]))
    largest = max((p.numel() for p in model.parameters()), default=0)
    return ParameterCount(total=parameter_count(model), block_linear_shapes=tuple(shapes), largest=largest)


def count_parameters(config: Any) -> ParameterCount:
    """Count a causal LM's parameters by building it on the ``meta`` device:
    every module and shape exists, no memory is allocated for weights.

    >>> count_parameters("llama-7b").total
    6738415616
    """
    config = read_model_config(config)
    model_shape(config)  # clear error for missing fields before transformers' own
    return count_parameters_of_json(config.to_json_string(use_diff=False))
