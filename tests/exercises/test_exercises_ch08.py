"""The chapter 08 checkers accept right answers, reject typical wrong ones with a
hint, and treat a skeleton as "not attempted yet" without raising."""

import copy

import numpy as np
import torch

from qlora_lab.after.export import merge_into_4bit
from qlora_lab.exercises import ch08
from qlora_lab.lora import load_adapter, lora_modules
from qlora_lab.quant.nf4 import quantize_4bit


def skeleton(*args):
    raise NotImplementedError("your turn")


def q8_0_roundtrip(x):
    blocks = x.reshape(-1, 32)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / 127
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale > 0, blocks / scale, 0)
    q = np.sign(q) * np.floor(np.abs(q) + 0.5)  # halves away from zero
    return (scale.astype(np.float16).astype(np.float32) * q).reshape(-1)


def unchanged_codes(w0, delta):
    def codes(x):
        packed, _ = quantize_4bit(x, blocksize=64, quant_type="nf4")
        packed = packed.reshape(-1)
        return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)

    return (codes(w0) == codes(w0 + delta)).float().mean().item()


def update_lost(model, adapter_dir, scale):
    merged = copy.deepcopy(model)
    load_adapter(merged, adapter_dir)
    for layer in lora_modules(merged).values():
        layer.scaling *= scale
    report = merge_into_4bit(merged)
    return report.error_norm / report.update_norm


def test_right_answers(capsys):
    assert ch08.check_exercise_1(q8_0_roundtrip)
    assert ch08.check_exercise_2(unchanged_codes)
    assert ch08.check_exercise_3(update_lost)
    out = capsys.readouterr().out
    assert "Exercise 1: correct" in out and "Exercise 2: correct" in out and "Exercise 3: correct" in out


def test_skeletons_are_not_attempted(capsys):
    assert ch08.check_exercise_1(skeleton) is False
    assert ch08.check_exercise_2(skeleton) is False
    assert ch08.check_exercise_3(skeleton) is False
    assert capsys.readouterr().out.count("not attempted yet") == 3


def test_wrong_answers_get_hints(capsys):
    def tensor_wise(x):
        scale = np.abs(x).max() / 127
        return np.round(x / scale) * scale if scale > 0 else x * 0

    def unrounded_scale(x):
        blocks = x.reshape(-1, 32)
        scale = np.abs(blocks).max(axis=1, keepdims=True) / 127
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(scale > 0, np.round(blocks / scale) * scale, 0).reshape(-1)

    for wrong, hint in [(tensor_wise, "one scale per block"), (unrounded_scale, "float16")]:
        assert ch08.check_exercise_1(wrong) is False
        assert hint in capsys.readouterr().out

    def bytes_not_codes(w0, delta):
        a, _ = quantize_4bit(w0, blocksize=64, quant_type="nf4")
        b, _ = quantize_4bit(w0 + delta, blocksize=64, quant_type="nf4")
        return (a == b).float().mean().item()

    assert ch08.check_exercise_2(bytes_not_codes) is False
    assert "compare codes, not bytes" in capsys.readouterr().out
    assert ch08.check_exercise_2(lambda w0, delta: 1.0) is False
    assert "unpack both" in capsys.readouterr().out

    def unscaled(model, adapter_dir, scale):
        return update_lost(model, adapter_dir, 1.0)

    def moved_not_lost(model, adapter_dir, scale):
        merged = copy.deepcopy(model)
        load_adapter(merged, adapter_dir)
        for layer in lora_modules(merged).values():
            layer.scaling *= scale
        report = merge_into_4bit(merged)
        return report.kept_update_norm / report.update_norm

    def in_place(model, adapter_dir, scale):
        load_adapter(model, adapter_dir)
        report = merge_into_4bit(model)
        return report.error_norm / report.update_norm

    for wrong, hint in [(unscaled, "multiply every LoRALinear's scaling"), (moved_not_lost, "return what was lost"),
                        (in_place, "changed the model it was given")]:
        assert ch08.check_exercise_3(wrong) is False
        assert hint in capsys.readouterr().out


def test_bugs_in_the_learners_code_are_feedback(capsys):
    from exercise_feedback import assert_bugs_are_feedback

    assert_bugs_are_feedback(capsys, [(1, ch08.check_exercise_1, ()), (2, ch08.check_exercise_2, ()),
                                  (3, ch08.check_exercise_3, ())])
