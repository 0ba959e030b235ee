"""`make gpu-check` (qlora_lab.runs.gpu_check): on a CPU it refuses without
claiming anything; with --device cpu --tiny its whole path runs here at tiny width."""

import json

import pytest
import torch

import qlora_lab  # noqa: F401  (before bitsandbytes)
from qlora_lab.__main__ import main
from qlora_lab.runs import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_without_a_gpu_it_checks_nothing_and_says_so(tmp_path, capsys):
    assert main(["gpu-check", "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.startswith("gpu-check needs a CUDA GPU and this machine has none: nothing was "
                                              "checked")
    assert not (tmp_path / "out").exists()


def test_the_shapes_are_the_shipped_7b_configs():
    assert gpu_check.full_width_sizes("mistral-7b-v0.3") == {
        "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 32768}
    qwen = gpu_check.full_width_sizes("qwen2.5-7b")
    assert (qwen["hidden_size"], qwen["intermediate_size"], qwen["vocab_size"]) == (3584, 18944, 152064)
    assert gpu_check.full_width_sizes("llama-7b")["num_key_value_heads"] == 32


def test_the_whole_check_at_tiny_width_on_the_cpu(tmp_path, capsys):
    assert main(["gpu-check", "--device", "cpu", "--tiny", "--steps", "8", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["failed"] == [] and results["device"] == "cpu" and results["width"] == "tiny"
    assert all(all(v for v in row.values() if isinstance(v, bool)) for row in results["bits"].values())
    assert set(results["runs"]) == {f"{m} {b}" for m in gpu_check.SHAPED_LIKE for b in gpu_check.BACKENDS}
    for row in results["runs"].values():
        assert len(row["losses"]) == 8 and row["loss_falls"] and row["reload_same_logits"]
        assert row["tokens_per_second"] > 0
    assert "0 failed check(s)" in capsys.readouterr().out


def test_a_false_verdict_is_named_and_fails_the_command():
    results = {"bits": {"q_proj": {"shape": [4, 4], "bytes_equal_cpu": False}},
               "runs": {"qwen2.5-7b qlora_lab": {"losses": [2.0, float("nan")], "loss_falls": False,
                                                 "peak_within_10_percent": True}}}
    assert gpu_check.failures(results) == ["bits q_proj: bytes_equal_cpu", "qwen2.5-7b qlora_lab: loss_falls",
                                           "qwen2.5-7b qlora_lab: loss not finite"]
