"""Checkers for chapter 08 (after finetuning).

Exercise 1: Q8_0 by hand, the 8-bit type of the GGUF export (blocks of 32
            weights, one float16 scale each), against the ``gguf`` package.
Exercise 2: how many 4-bit codes a merged update changes when ``W0 + delta`` is
            quantized to NF4 again (the merge QLoRA cannot do losslessly).
Exercise 3: change the size of an adapter's update and measure what merging it
            into the 4-bit weights loses (checked on a tiny model; the notebook
            then measures SmolLM2).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import torch

from qlora_lab.exercises import call_learner, checker

# ---------------------------------------------------------------- exercise 1


def _q8_0_reference(x: np.ndarray) -> np.ndarray:
    import gguf

    q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    return gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(x.shape)


def _exercise_1_cases():
    rng = np.random.default_rng(8)
    yield rng.standard_normal(64).astype(np.float32)
    yield (rng.standard_normal(320) * 0.02).astype(np.float32)
    outliers = rng.standard_normal(96).astype(np.float32)
    outliers[5] = 40.0
    yield outliers
    yield np.zeros(32, dtype=np.float32)


@checker(1)
def check_exercise_1(q8_0_roundtrip) -> bool:
    """``q8_0_roundtrip(x)`` (a float32 array whose length is a multiple of 32)
    must return what a Q8_0 file gives back: for each block of 32 values,
    ``scale = max|x| / 127`` stored as float16, ``q = round(x / scale)`` (halves
    away from zero) as int8, and the value ``scale * q``."""
    for x in _exercise_1_cases():
        expected = _q8_0_reference(x)
        ok, got = call_learner(1, q8_0_roundtrip, x.copy())
        if not ok:
            return False
        got = np.asarray(got, dtype=np.float32).reshape(-1)
        if got.shape != x.shape:
            print(f"Exercise 1: return one value per input value ({x.shape[0]}), got {got.shape[0]}")
            return False
        if not np.isfinite(got).all():
            print("Exercise 1: your values are not all finite; a block of zeros has scale 0 and must give zeros")
            return False
        # x / scale and x * (1 / scale) round differently in a rare tie: one step apart at most, rarely
        step = np.repeat(np.abs(x.reshape(-1, 32)).max(axis=1) / 127, 32)
        off = np.abs(got - expected) > 1e-7 * np.maximum(np.abs(expected), 1e-30)
        if off.mean() > 0.01 or (np.abs(got - expected)[off] > step[off] * 1.01).any():
            blocks = x.reshape(-1, 32)
            tensor_wise = np.round(x / (np.abs(x).max() / 127)) * (np.abs(x).max() / 127)
            exact_scale = np.repeat(np.abs(blocks).max(axis=1) / 127, 32)
            with np.errstate(divide="ignore", invalid="ignore"):
                unrounded_scale = np.where(exact_scale > 0, np.round(x / exact_scale) * exact_scale, 0)
            print(f"Exercise 1: wrong values for an input of {x.shape[0]} values (max |x| {np.abs(x).max():.3g})")
            # Hint only: these differ from a learner's float32 result by a few roundings of scale * q (eps 1.2e-7).
            if np.allclose(got, tensor_wise, rtol=1e-6, atol=0):
                print("  Hint: one scale per block of 32 values, not one for the whole array.")
            elif np.allclose(got, unrounded_scale, rtol=1e-6, atol=0):
                print("  Hint: the file stores each scale as float16: round it (np.float16) before multiplying back.")
            else:
                print("  Hint: scale = max |x| of the block / 127; q = round(x / scale); return scale * q.")
            return False
    print("Exercise 1: correct")
    return True


# ---------------------------------------------------------------- exercise 2


def _codes(x: torch.Tensor) -> torch.Tensor:
    from qlora_lab.quant.nf4 import quantize_4bit

    packed, _ = quantize_4bit(x, blocksize=64, quant_type="nf4")
    packed = packed.reshape(-1)
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[: x.numel()]


def _exercise_2_cases():
    g = torch.Generator().manual_seed(80)
    w0 = torch.randn(64, 128, generator=g) * 0.05
    for scale in (0.0, 1e-4, 1e-3, 1e-2):
        yield w0, torch.randn(64, 128, generator=g) * scale


@checker(2)
def check_exercise_2(unchanged_codes) -> bool:
    """``unchanged_codes(w0, delta)`` must return the fraction (a float in [0, 1])
    of the 4-bit NF4 codes of ``w0`` (block size 64, no double quantization,
    ``qlora_lab.quant.nf4.quantize_4bit``) that stay the same when ``w0 + delta`` is
    quantized instead."""
    for w0, delta in _exercise_2_cases():
        expected = (_codes(w0) == _codes(w0 + delta)).double().mean().item()
        ok, got = call_learner(2, unchanged_codes, w0.clone(), delta.clone())
        if not ok:
            return False
        try:
            got = float(got)
        except (TypeError, ValueError):
            print(f"Exercise 2: return a number (a fraction), got {type(got).__name__}")
            return False
        if abs(got - expected) > 1e-9:
            print(f"Exercise 2: for an update of size {delta.abs().max().item():.2g} the fraction is not {got:.6f}")
            if abs(got - _packed_equal(w0, delta)) < 1e-9:
                print("  Hint: each byte holds two codes (high and low nibble); compare codes, not bytes.")
            else:
                print("  Hint: quantize_4bit(w0) and quantize_4bit(w0 + delta), unpack both (>> 4 and & 15), "
                      "compare code by code.")
            return False
    print("Exercise 2: correct")
    return True


def _packed_equal(w0: torch.Tensor, delta: torch.Tensor) -> float:
    from qlora_lab.quant.nf4 import quantize_4bit

    a, _ = quantize_4bit(w0, blocksize=64, quant_type="nf4")
    b, _ = quantize_4bit(w0 + delta, blocksize=64, quant_type="nf4")
    return (a == b).double().mean().item()


# ---------------------------------------------------------------- exercise 3


def _tiny_base_and_adapter(directory: Path):
    """A tiny Llama quantized to NF4 + double quantization, and a LoRA adapter for it
    with random ``A`` and ``B`` on every linear layer (written to ``directory``)."""
    from transformers import AutoModelForCausalLM

    from qlora_lab.models import write_tiny_adapter, write_tiny_chat_model
    from qlora_lab.qlora import quantize_model
    from qlora_lab.support.loading import quiet_loading

    with quiet_loading():
        model_dir = write_tiny_chat_model(directory / "model")
        adapter_dir = write_tiny_adapter(model_dir, directory / "adapter")
        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    quantize_model(model)
    return model.eval(), adapter_dir


def _requantize_report(model, adapter_dir, scale: float):
    from qlora_lab.after.export import merge_into_4bit
    from qlora_lab.lora import load_adapter, lora_modules

    merged = copy.deepcopy(model)
    load_adapter(merged, adapter_dir)
    for layer in lora_modules(merged).values():
        layer.scaling *= scale
    return merge_into_4bit(merged)


@checker(3)
def check_exercise_3(update_lost) -> bool:
    """``update_lost(model, adapter_dir, scale)`` must load the adapter into a copy
    of the 4-bit ``model``, multiply every adapter layer's ``scaling`` by ``scale``,
    merge into the 4-bit weights (``merge_into_4bit``) and return
    ``error_norm / update_norm``, leaving ``model`` as it was."""
    from qlora_lab.lora import lora_modules

    with tempfile.TemporaryDirectory(prefix="ch08-exercise-3-") as tmp:
        model, adapter_dir = _tiny_base_and_adapter(Path(tmp))
        before = {name: t.clone() for name, t in model.state_dict().items()}
        reports = {scale: _requantize_report(model, adapter_dir, scale) for scale in (1.0, 0.01, 10.0)}
        for scale, report in reports.items():
            expected = report.error_norm / report.update_norm
            ok, got = call_learner(3, update_lost, model, adapter_dir, scale)
            if not ok:
                return False
            if lora_modules(model) or any(not torch.equal(before[n], t) for n, t in model.state_dict().items()):
                print("Exercise 3: your function changed the model it was given; load the adapter into a copy "
                      "(copy.deepcopy(model)) so that every scale starts from the same 4-bit base.")
                return False
            try:
                got = float(got)
            except (TypeError, ValueError):
                print(f"Exercise 3: return a number (error_norm / update_norm), got {type(got).__name__}")
                return False
            # The same functions give the same bits; a float32 norm computed another way rounds by about
            # sqrt(n) eps relative, 3e-5 for the tiny model's 3e5 weights: allow 1e-4.
            if not abs(got - expected) <= 1e-4 * expected:
                print(f"Exercise 3: at scale {scale:g} re-quantizing loses {expected:.4f} of the update, "
                      f"you returned {got:.4f}")
                unscaled = reports[1.0].error_norm / reports[1.0].update_norm
                if scale != 1.0 and abs(got - unscaled) <= 1e-4 * unscaled:
                    print("  Hint: multiply every LoRALinear's scaling (alpha / r) by scale before merging.")
                elif abs(got - report.kept_update_norm / report.update_norm) <= 1e-4 * expected:
                    print("  Hint: kept_update_norm is how far the weights moved; return what was lost, "
                          "error_norm / update_norm.")
                else:
                    print("  Hint: copy the model, load_adapter, scale every layer's scaling, merge_into_4bit, "
                          "and divide the report's error_norm by its update_norm.")
                return False
    print("Exercise 3: correct")
    return True
