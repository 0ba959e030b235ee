"""Counting LoRA's trainable parameters from a model's config, without building it.

Each adapted ``in x out`` matrix adds ``A`` (``r x in``) and ``B``
(``out x r``): ``r * (in + out)`` numbers. Summed over the adapted matrices of
every layer, that is the whole count; for square ``d x d`` matrices it is the
LoRA paper's ``2 * d_model * r * L`` (LoRA, Sec. 4.2 / Table 4), e.g. the
seminar's GPT-3 example. :func:`linear_shapes` reads the matrices' shapes
from a Llama-style config, :func:`lora_parameter_count` adds them up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qlora_lab.lora.layer import validate_hyperparameters
from qlora_lab.lora.surgery import ALL_LINEAR

__all__ = ["linear_shapes", "lora_parameter_count"]


def _config_value(config: Any, key: str, default: Any = None) -> Any:
    value = config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)
    return default if value is None else value


def linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """``{name: (in_features, out_features)}`` of one decoder layer's linear
    layers, from a Llama-style config (a dict or a transformers config).

    Needs ``hidden_size``; ``num_attention_heads``, ``num_key_value_heads``
    (default: as many as attention heads) and ``head_dim`` (default:
    hidden / heads) size the attention projections; ``intermediate_size``
    sizes the gated MLP (``gate_proj``, ``up_proj``, ``down_proj``).
    """
    hidden = _config_value(config, "hidden_size")
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"The config needs a positive integer hidden_size, got {hidden!r}.")
    heads = _config_value(config, "num_attention_heads")
    if heads is None:
        raise ValueError("The config needs num_attention_heads to size the attention projections.")
    kv_heads = _config_value(config, "num_key_value_heads", heads)
    head_dim = _config_value(config, "head_dim", hidden // heads)
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
    }
    intermediate = _config_value(config, "intermediate_size")
    if intermediate is not None:
        shapes.update(gate_proj=(hidden, intermediate), up_proj=(hidden, intermediate),
                      down_proj=(intermediate, hidden))
    return shapes


def lora_parameter_count(config: Any, r: int, target_modules: str | Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                         num_layers: int | None = None) -> int:
    """Trainable parameters LoRA adds: ``sum r * (in + out)`` over the adapted
    matrices of every layer (A is ``r x in``, B is ``out x r``).

    For square ``d x d`` matrices this is the LoRA paper's count,
    ``2 * d_model * r * L`` with ``L`` the number of adapted matrices (LoRA,
    Sec. 4.2 / Table 4). ``target_modules`` is a list of per-layer names from
    :func:`linear_shapes` or ``"all-linear"``; ``num_layers`` defaults to the
    config's ``num_hidden_layers``.
    """
    validate_hyperparameters(r, 1, 0.0)
    shapes = linear_shapes(config)
    if isinstance(target_modules, str):
        if target_modules.lower() != ALL_LINEAR:
            raise ValueError(f"target_modules must be 'all-linear' or a list of names from {sorted(shapes)}, "
                             f"got {target_modules!r}.")
        if "gate_proj" not in shapes:
            raise ValueError("target_modules='all-linear' needs the MLP's size: add intermediate_size to the config.")
        target_modules = list(shapes)
    unknown = [t for t in target_modules if t not in shapes]
    if unknown:
        raise ValueError(f"Unknown layer names {unknown}; this config has {sorted(shapes)}.")
    layers = num_layers if num_layers is not None else _config_value(config, "num_hidden_layers")
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"Need a positive number of layers (num_hidden_layers or num_layers=), got {layers!r}.")
    return layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in target_modules)
