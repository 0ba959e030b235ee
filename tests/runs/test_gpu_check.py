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


def test_the_checkpoints_have_the_shipped_7b_shapes():
    mistral = gpu_check.checkpoint_config("mistral-7b-v0.3", 2, tiny=False)
    assert (mistral.hidden_size, mistral.intermediate_size, mistral.num_attention_heads,
            mistral.num_key_value_heads, mistral.vocab_size, mistral.num_hidden_layers) == (4096, 14336, 32, 8, 32768, 2)
    qwen = gpu_check.checkpoint_config("qwen2.5-7b", None, tiny=False)
    assert (qwen.hidden_size, qwen.intermediate_size, qwen.vocab_size, qwen.num_hidden_layers) == (3584, 18944, 152064,
                                                                                                  28)
    assert gpu_check.checkpoint_config("llama-7b", None, tiny=False).num_hidden_layers == 32
    assert gpu_check.checkpoint_config("qwen2.5-7b", 2, tiny=True).hidden_size == 128


def test_the_whole_check_at_tiny_width_on_the_cpu(tmp_path, capsys):
    assert main(["gpu-check", "--device", "cpu", "--tiny", "--steps", "12", "--out", str(tmp_path / "out"),
                 "--dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["failed"] == [] and results["device"] == "cpu" and results["width"] == "tiny"
    assert all(all(v for v in row.values() if isinstance(v, bool)) for row in results["bits"].values())
    assert set(results["runs"]) == {f"{m} {'all' if n is None else n} layers {b}" for m, n, b, _ in gpu_check.RUNS}
    for (name, layers, backend, steps), row in zip(gpu_check.RUNS, results["runs"].values()):
        assert len(row["losses"]) == (steps or 12) and row["reload_same_logits"] and row["tokens_per_second"] > 0
        assert row["loss_falls"] if steps is None else "loss_falls" not in row  # 2 steps prove the path only
    assert "0 failed check(s)" in capsys.readouterr().out


def test_a_false_verdict_is_named_and_fails_the_command():
    results = {"bits": {"q_proj": {"shape": [4, 4], "bytes_equal_cpu": False}},
               "runs": {"qwen2.5-7b qlora_lab": {"losses": [2.0, float("nan")], "loss_falls": False,
                                                 "peak_within_10_percent": True}}}
    assert gpu_check.failures(results) == ["bits q_proj: bytes_equal_cpu", "qwen2.5-7b qlora_lab: loss_falls",
                                           "qwen2.5-7b qlora_lab: loss not finite"]
