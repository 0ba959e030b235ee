"""The run's adapter on disk, in peft's format, whichever backend trained it
(chapter 07).

A finetuning run writes its adapter at every checkpoint and at the end
(:mod:`qlora_lab.finetune.train`), and reads it back to resume. The two
backends of :mod:`qlora_lab.finetune.backends` hold it differently: the
course's layers (:func:`qlora_lab.lora.add_lora`) are written by
:func:`qlora_lab.lora.save_adapter`, a peft model by peft itself. Both write the
same two files (``adapter_config.json`` and ``adapter_model.safetensors``), which
load in stock ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path

from qlora_lab.support.atomic import atomic_directory

__all__ = ["is_peft_model", "load_adapter", "save_adapter"]


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


def save_adapter(model, path: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write the model's adapters in peft's format (both backends write the
    same files: ``adapter_config.json`` and ``adapter_model.safetensors``).
    For a peft model the directory is written all at once; an existing
    adapter directory is replaced, one holding other files is refused
    (``overwrite`` only applies to the course's models, which keep them)."""
    from qlora_lab import lora

    if not is_peft_model(model):
        return lora.save_adapter(model, path, base_model_name_or_path=base_model_name_or_path, overwrite=overwrite)
    target = Path(path).expanduser()
    others = sorted(p.name for p in target.iterdir() if p.name not in lora.ADAPTER_FILES) if target.is_dir() else []
    if others:
        raise ValueError(f"{target} holds files that are not part of an adapter ({', '.join(others[:5])}); choose a "
                         f"new directory (a peft model's adapter replaces its directory as a whole)")
    if base_model_name_or_path is not None:
        model.peft_config["default"].base_model_name_or_path = str(base_model_name_or_path)
    # An existing adapter directory is replaced, as qlora_lab.lora.save_adapter does.
    with atomic_directory(target, overwrite=target.is_dir()) as staging:
        # No embedding layers are trained: do not ask the hub whether the base vocabulary changed.
        model.save_pretrained(staging, safe_serialization=True, save_embedding_layers=False)
    return target


def load_adapter(model, path: str | os.PathLike) -> None:
    """Load adapter weights saved by :func:`save_adapter` into a model of
    either backend (resuming a run)."""
    from qlora_lab import lora

    if not is_peft_model(model):
        lora.load_adapter(model, path)
        return
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = Path(path) / lora.WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{path} has no {lora.WEIGHTS_NAME}: the adapter is incomplete")
    result = set_peft_model_state_dict(model, load_file(str(weights)))
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k]
    if unexpected or missing:
        raise ValueError(f"{weights} does not fit this model: unexpected {unexpected[:3]}, missing {missing[:3]}")
