"""peft's adapter files: saving and loading LoRA adapters as peft does.

An adapter directory holds ``adapter_config.json`` (peft's ``LoraConfig``:
``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ...) and
``adapter_model.safetensors``, whose keys name each adapted layer as peft's
wrapper sees it: ``base_model.model.<module name>.lora_A.weight`` and
``.lora_B.weight``. :func:`save_adapter` writes that format, so that
``peft.PeftModel.from_pretrained`` loads what we save, and
:func:`load_adapter` reads it, so that we load what peft saves. Only plain
LoRA is read: a config that asks for DoRA, rsLoRA, per-layer ranks and the
like is refused with a message pointing to peft.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlora_lab.lora.layer import LoRALinear, in_out_features, validate_hyperparameters
from qlora_lab.lora.surgery import (
    TrainableParameters,
    base_module_names,
    lora_modules,
    matches_target,
    resolve_targets,
    trainable_parameters,
    wrap_layers,
)
from qlora_lab.support.atomic import atomic_directory, fsync_directory, fsync_tree, staging_directory

__all__ = ["ADAPTER_FILES", "CONFIG_NAME", "KEY_PREFIX", "WEIGHTS_NAME", "adapter_state_dict", "load_adapter",
           "save_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
# Files peft writes into an adapter directory; a directory holding nothing
# else is an adapter directory that save_adapter may replace.
ADAPTER_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, "README.md"})
KEY_PREFIX = "base_model.model."
_KEY_PATTERN = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")



def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under peft's key names:
    ``base_model.model.<module name>.lora_A.weight`` / ``.lora_B.weight``."""
    state = {}
    for name, layer in lora_modules(model).items():
        state[f"{KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().cpu().contiguous()
        state[f"{KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().cpu().contiguous()
    return state


def _uniform_setting(adapters: Mapping[str, LoRALinear], attribute: str) -> Any:
    values = {getattr(layer, attribute) for layer in adapters.values()}
    if len(values) != 1:
        raise ValueError(f"The model's adapters use different values of {attribute} ({sorted(values)}); "
                         f"save_adapter writes one config and needs them all equal.")
    return values.pop()


def _target_modules_for_config(model: nn.Module, adapted: Sequence[str]) -> list[str]:
    """The shortest faithful ``target_modules`` list: the adapted layers' last
    names (``q_proj``, ...) when peft's suffix rule with them selects exactly
    the adapted layers, else the full names."""
    names = [n for n in base_module_names(model) if n]
    short = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    if {n for n in names if any(matches_target(n, t) for t in short)} == set(adapted):
        return short
    return sorted(adapted)


def _adapter_config(model: nn.Module, adapters: Mapping[str, LoRALinear], base_model_name_or_path: str | None,
                    task_type: str) -> dict[str, Any]:
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "revision": None,
        "inference_mode": True,
        "r": _uniform_setting(adapters, "r"),
        "lora_alpha": _uniform_setting(adapters, "alpha"),
        "lora_dropout": _uniform_setting(adapters, "dropout_p"),
        "target_modules": _target_modules_for_config(model, list(adapters)),
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _write_adapter_files(directory: Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))


def save_adapter(model: nn.Module, path: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                 task_type: str = "CAUSAL_LM", overwrite: bool = False) -> Path:
    """Save the model's adapters in peft's format into the directory ``path``.

    Writes ``adapter_config.json`` (a ``LoraConfig`` peft accepts) and
    ``adapter_model.safetensors`` (peft's key names), so that
    ``PeftModel.from_pretrained(base_model, path)`` rebuilds the same model.

    Never leaves a half-written adapter behind. A new directory, or an
    existing adapter directory (holding only adapter files, which it
    replaces, as peft's ``save_pretrained`` does), is written all at once
    (:func:`qlora_lab.support.atomic.atomic_directory`). A directory holding
    other files is refused unless ``overwrite=True``; then its other files are
    kept and the adapter files are replaced one by one, the old config out
    first and the new config in last, so that at every moment ``path`` holds
    a complete adapter or no config at all.
    """
    adapters = lora_modules(model)
    if not adapters:
        raise ValueError("This model has no LoRA adapters to save; add them with add_lora (or load_adapter) first.")
    config = _adapter_config(model, adapters, base_model_name_or_path, task_type)
    state = adapter_state_dict(model)
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file; save_adapter needs a directory path.")
    others = sorted(p.name for p in target.iterdir() if p.name not in ADAPTER_FILES) if target.exists() else []
    if not others:
        with atomic_directory(target, overwrite=target.exists()) as staging:
            _write_adapter_files(staging, config, state)
        return target
    if not overwrite:
        raise ValueError(
            f"{target} already exists and holds files that are not part of an adapter ({', '.join(others[:5])}"
            f"{', ...' if len(others) > 5 else ''}); choose a new directory, or pass overwrite=True to write the "
            f"adapter files into it (its other files are kept)."
        )
    staging = staging_directory(target / target.name)
    try:
        _write_adapter_files(staging, config, state)
        fsync_tree(staging)
        # Config first out, config last in: a crash in between leaves no config,
        # which load_adapter reports, never an old config with new weights.
        for stale in (CONFIG_NAME, PICKLE_WEIGHTS_NAME):
            (target / stale).unlink(missing_ok=True)
        os.replace(staging / WEIGHTS_NAME, target / WEIGHTS_NAME)
        os.replace(staging / CONFIG_NAME, target / CONFIG_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fsync_directory(target)
    return target


# Options of peft's LoraConfig that change what an adapter computes, with the
# value of plain LoRA; a config that sets any of them otherwise is refused.
_PLAIN_LORA_OPTIONS = {
    "use_dora": False,
    "use_rslora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "exclude_modules": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
}


def _non_plain_options(config: Mapping[str, Any]) -> list[str]:
    found = []
    for key, plain in _PLAIN_LORA_OPTIONS.items():
        value = config.get(key, plain)
        is_plain = value == plain if isinstance(plain, str) else not value  # None, False, [] and {} all mean "off"
        if not is_plain:
            found.append(f"{key}={value!r}")
    return found


def _read_adapter_config(directory: Path) -> dict[str, Any]:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}, so it is not a (complete) adapter directory.")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}).") from err
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}.")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path} describes a {config.get('peft_type')!r} adapter; load_adapter reads LoRA "
                         f"adapters (peft_type 'LORA').")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(f"{config_path} has no {key!r} entry; a LoRA config needs r, lora_alpha and target_modules.")
    unsupported = _non_plain_options(config)
    if unsupported:
        raise ValueError(f"{config_path} uses options this loader does not implement ({', '.join(unsupported)}); "
                         f"load it with peft.PeftModel.from_pretrained instead.")
    return config


def load_adapter(model: nn.Module, path: str | os.PathLike, *,
                 adapter_dtype: torch.dtype = torch.float32) -> TrainableParameters:
    """Load a LoRA adapter saved in peft's format (by :func:`save_adapter` or by
    peft's ``save_pretrained``) into ``model``, in place.

    If the model has no adapters yet they are created on the layers the
    config's ``target_modules`` selects (and everything else is frozen, as in
    :func:`add_lora`); if it has, they must be the same layers with the same
    ``r`` and ``alpha``. Everything is checked before anything is changed:
    missing files, unknown or missing keys and wrong shapes raise an error
    that names the file or key. Returns the :class:`TrainableParameters`.
    """
    from safetensors.torch import load_file

    directory = Path(path).expanduser()
    if not directory.exists():
        raise FileNotFoundError(f"There is no adapter at {directory}.")
    if not directory.is_dir():
        raise ValueError(f"{directory} is a file; load_adapter needs the adapter's directory.")
    config = _read_adapter_config(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        if (directory / PICKLE_WEIGHTS_NAME).is_file():
            raise ValueError(f"{directory} holds {PICKLE_WEIGHTS_NAME} (pickle) but no {WEIGHTS_NAME}; load_adapter "
                             f"reads safetensors only: re-save the adapter with safe_serialization=True.")
        raise FileNotFoundError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}: the adapter is incomplete.")
    r, alpha, dropout = config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0)
    validate_hyperparameters(r, alpha, dropout)
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{weights_path} is not a readable safetensors file ({err}).") from err

    existing = lora_modules(model)
    if existing:
        expected = list(existing)
        for name, layer in existing.items():
            if (layer.r, layer.alpha) != (r, alpha):
                raise ValueError(f"The model's adapter on {name} has r={layer.r}, alpha={layer.alpha}, the file "
                                 f"r={r}, lora_alpha={alpha}; load into a model without adapters instead.")
            if layer.merged:
                raise ValueError(f"The adapter on {name} is merged; call unmerge_lora(model) before loading new weights.")
    else:
        expected = resolve_targets(model, config["target_modules"], require_each=False)

    modules = dict(model.named_modules())
    for key in state:
        match = _KEY_PATTERN.match(key)
        if match is None:
            raise ValueError(f"{weights_path} holds the key {key!r}, which is not a LoRA weight "
                             f"('{KEY_PREFIX}<module>.lora_A.weight' or '.lora_B.weight'); this loader reads plain "
                             f"LoRA adapters only.")
        if match["module"] not in expected:
            raise ValueError(f"{weights_path} holds {key!r}, but {match['module']!r} is not among the layers the "
                             f"adapter config targets in this model (target_modules={config['target_modules']!r}).")
    for name in expected:
        if existing:
            in_features, out_features = existing[name].in_features, existing[name].out_features
        else:
            in_features, out_features = in_out_features(modules[name])
        for which, shape in (("A", (r, in_features)), ("B", (out_features, r))):
            key = f"{KEY_PREFIX}{name}.lora_{which}.weight"
            if key not in state:
                raise ValueError(f"{weights_path} has no {key!r}, but the adapter config targets {name!r}.")
            if tuple(state[key].shape) != shape:
                raise ValueError(f"{key!r} has shape {tuple(state[key].shape)}, expected {shape} "
                                 f"(r={r}, in_features={in_features}, out_features={out_features}).")

    if not existing:
        for p in model.parameters():
            p.requires_grad_(False)
        wrap_layers(model, expected, r, alpha, dropout, adapter_dtype)
    with torch.no_grad():
        for name, layer in lora_modules(model).items():
            layer.lora_A.copy_(state[f"{KEY_PREFIX}{name}.lora_A.weight"])
            layer.lora_B.copy_(state[f"{KEY_PREFIX}{name}.lora_B.weight"])
    return trainable_parameters(model)
