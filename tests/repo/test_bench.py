"""The benchmark scripts in bench/: they validate their arguments, build what
they claim to build, and run end to end on a tiny model. No timings are
asserted (they depend on the machine); the benchmarks' numbers are in
bench/RESULTS.md."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

import qlora_lab  # noqa: F401  (before bitsandbytes)
from qlora_lab.models import tiny_llama
from qlora_lab.qlora import LinearNF4
from qlora_lab.quant.nf4 import quantize_4bit

BENCH = Path(__file__).resolve().parents[2] / "bench"

# Every linear layer's width a multiple of the block size 64, as in real
# models (bitsandbytes 0.50.2's CPU dequantize kernel is wrong for rows
# that end inside a block, e.g. the 96-wide tiny_llama()).
TINY_CONFIG = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 128,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "initializer_range": 0.02,
}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_step():
    return _load("train_step")


@pytest.fixture(scope="module")
def quantize_bench():
    return _load("quantize")


@pytest.fixture(scope="module")
def seven_b():
    return _load("seven_b")


@pytest.fixture(scope="module")
def run_all():
    return _load("run_all")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """A tiny Llama saved like a real checkpoint (config.json + safetensors)."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2,
               max_positions=128).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-config") / "tiny.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return str(path)


def _exit_message(capsys, parse, argv) -> str:
    with pytest.raises(SystemExit) as excinfo:
        parse(argv)
    assert excinfo.value.code == 2
    return capsys.readouterr().err


# --------------------------------------------------------------------------- #
# Arguments
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "expected a positive integer, got 0"),
    (["--seq-len", "-4"], "expected a positive integer, got -4"),
    (["--steps", "two"], "expected a positive integer, got 'two'"),
    (["--lora-alpha", "0"], "expected a positive number"),
    (["--variants", "qlora_lab", "unsloth"], "unknown variant(s) 'unsloth'"),
    (["--variants", "lora16", "lora16"], "each variant at most once"),
    (["--interleave", "--profile", "torch"], "leave out --interleave"),
    (["--seq-len", "4096"], "longer than the model's context (128 tokens)"),
])
def test_train_step_rejects_bad_arguments(train_step, tiny_dir, capsys, argv, message):
    assert message in _exit_message(capsys, train_step.parse_args, ["--model", tiny_dir, *argv])


def test_train_step_rejects_unknown_model(train_step, tmp_path, capsys):
    assert "unknown model" in _exit_message(capsys, train_step.parse_args, ["--model", "llama-3-8b"])
    assert "needs config.json and *.safetensors" in _exit_message(
        capsys, train_step.parse_args, ["--model", str(tmp_path)])


def test_train_step_refuses_to_start_without_memory(train_step, tiny_dir, capsys):
    assert train_step.main(["--model", tiny_dir, "--batch", "10000000", "--seq-len", "128"]) == 2
    assert "not enough free memory" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--config", "llama-1b"], "no config called 'llama-1b'"),
    (["--seq-len", "0"], "expected a positive integer, got 0"),
    (["--layers", "0"], "expected a positive integer, got 0"),
    (["--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
    (["--seq-len", "4096"], "longer than the model's context (2048 tokens)"),
])
def test_seven_b_rejects_bad_arguments(seven_b, capsys, argv, message):
    assert message in _exit_message(capsys, seven_b.parse_args, argv)


def test_seven_b_refuses_to_start_without_memory(seven_b, capsys):
    # Far beyond any machine: 65B with 1e6 tokens of activations.
    assert seven_b.main(["--config", "llama-65b", "--batch", "500", "--seq-len", "2048"]) == 2
    assert "not enough free memory" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--skip", "quantize", "train_step", "seven_b", "seven_b_8bit"], "--skip leaves nothing to run"),
    (["--skip", "everything"], "invalid choice: 'everything'"),
    (["--output", "/nonexistent/dir/RESULTS.md"], "does not exist"),
])
def test_run_all_rejects_bad_arguments(run_all, capsys, argv, message):
    assert message in _exit_message(capsys, run_all.parse_args, argv)


# --------------------------------------------------------------------------- #
# The 7B model is built one quantized layer at a time
# --------------------------------------------------------------------------- #
def test_seven_b_builds_the_model_one_quantized_layer_at_a_time(seven_b):
    from qlora_lab.support.model_config import count_parameters, read_model_config

    config = read_model_config(dict(TINY_CONFIG))
    model = seven_b.skeleton(config)
    assert all(p.is_meta for p in model.parameters())
    built = seven_b.quantize_linear_layers(model, std=0.02, seed=3, compute_dtype=torch.float32)
    assert built["layers"] == 14
    assert built["quantized_weights"] == count_parameters(config).block_linear
    seven_b.materialise_rest(model, std=0.02, seed=3)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])

    quantized = [m for m in model.modules() if isinstance(m, LinearNF4)]
    assert len(quantized) == 14 and all(m.compute_dtype == torch.float32 for m in quantized)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(model.model.norm.weight, torch.ones(128, dtype=torch.bfloat16))

    # The first layer's weight is the seeded generator's N(0, 0.02) draw, quantized.
    first = model.model.layers[0].self_attn.q_proj
    weight = torch.empty(128, 128).normal_(0.0, 0.02, generator=seven_b.layer_generator(3, 0))
    packed, _ = quantize_4bit(weight, blocksize=64, quant_type="nf4", double_quant=True)
    assert torch.equal(first.weight, packed)
    assert first.dequantized_weight().std().item() == pytest.approx(0.02, rel=0.1)


# --------------------------------------------------------------------------- #
# End to end on a tiny model, through bench/run_all.py
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def tiny_run(run_all, tiny_dir, tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-run")
    code = run_all.main([
        "--output", str(out / "RESULTS.md"), "--json-dir", str(out), "--threads", "1",
        "--quantize-shapes", "64x128", "--quantize-runs", "1",
        "--model", tiny_dir, "--batch", "2", "--seq-len", "16", "--steps", "1",
        "--config", tiny_config, "--seven-b-seq-len", "16",
    ])
    return code, out


def test_run_all_writes_a_results_page(tiny_run):
    code, out = tiny_run
    assert code == 0
    page = (out / "RESULTS.md").read_text()
    for text in ("# Benchmark results", "- Machine:", "- Versions:", "torch 2.13.0", "bitsandbytes 0.50.2",
                 "## 1. 4-bit quantize", "ratio fast", "| 64 x 128 |", "fast / floor", "## 2. A QLoRA training step", "| qlora_lab (",
                 "| transformers `BitsAndBytesConfig` + peft |", "| 16-bit LoRA", "**throughput",
                 "## 3. One QLoRA training step", "measured above the runtime / estimate",
                 "estimate for full 16-bit finetuning", "## 4. The same 7B step with 8-bit AdamW states",
                 "bitsandbytes AdamW with 8-bit states",
                 "## Measurements behind the speed choices"):
        assert text in page


def test_train_step_measures_all_three_variants(tiny_run):
    from qlora_lab.support.model_config import count_parameters, read_model_config

    _, out = tiny_run
    data = json.loads((out / "train_step.json").read_text())
    results = data["results"]
    assert list(results) == ["qlora_lab", "bitsandbytes", "lora16"]
    for r in results.values():
        assert r["tokens_per_second"] > 0 and r["peak_bytes"] > 0 and len(r["step_seconds"]) == 1
        assert all(math.isfinite(loss) for loss in r["losses"])
    ours, theirs = results["qlora_lab"], results["bitsandbytes"]
    # Same LoRA shapes (r=16 on the 14 block layers), same NF4 bytes: before
    # any update (B = 0) the two QLoRA models compute the same loss, up to the
    # few double-quantization constants that bitsandbytes' CPU lookup table
    # rounds differently (see qlora_lab.quant.double_quant).
    lora = count_parameters(read_model_config(dict(TINY_CONFIG))).lora(16)
    assert ours["trainable_parameters"] == theirs["trainable_parameters"] == lora
    # Modelling tolerance: those constants move tiny-llama's loss by ~1e-6 relative (test_backends); 1e-3 of ~6.
    assert ours["losses"][0] == pytest.approx(theirs["losses"][0], abs=1e-3)
    # The tensors held: the same packed weights and constants, give or take
    # the code tables that bitsandbytes shares between layers.
    assert ours["weights_bytes"] == pytest.approx(theirs["weights_bytes"], rel=0.02)
    assert set(data["ratios"]) == {"throughput", "peak_memory", "weights", "pairs"}
    assert data["ratios"]["pairs"] is None


def test_run_all_takes_the_throughput_ratio_from_steps_taken_in_turn(tiny_run):
    _, out = tiny_run
    data = json.loads((out / "train_step_turns.json").read_text())
    assert data["settings"]["interleave"] and list(data["results"]) == ["qlora_lab", "bitsandbytes"]
    ours, theirs = data["results"]["qlora_lab"], data["results"]["bitsandbytes"]
    assert "peak_bytes" not in ours and data["ratios"]["peak_memory"] is None
    assert data["ratios"]["pairs"] == [theirs["step_seconds"][0] / ours["step_seconds"][0]]
    page = (out / "RESULTS.md").read_text()
    assert "**Steps taken in turn**" in page
    assert f"**throughput {data['ratios']['throughput']:.3f}** (median" in page


def test_quantize_ratio_is_the_median_of_the_ratios_within_a_round(quantize_bench):
    # The machine's load tripled in round 3, between our call and
    # bitsandbytes': the per-round ratios set that round aside, the ratio of
    # the two medians takes our quiet rounds against their loaded ones.
    times = {"fast": [1.0, 1.0, 1.0, 3.0, 3.0], "bnb": [1.5, 1.5, 4.5, 4.5, 4.5]}
    assert quantize_bench.ratio_to_bnb(times, "fast") == pytest.approx(1.5)
    assert statistics.median(times["bnb"]) / statistics.median(times["fast"]) == pytest.approx(4.5)
    calls = []
    timed = quantize_bench.round_seconds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b"] * 4 and [len(v) for v in timed.values()] == [3, 3]  # warm-up, then rounds


def test_interleaved_throughput_is_the_median_of_the_per_step_ratios(train_step):
    def run(steps):
        return {"step_seconds": steps, "tokens_per_second": 1 / statistics.median(steps), "weights_bytes": 10}

    # The load rose for the last two pairs (both variants slow down), and a
    # burst hit one of our steps: the median of the per-step ratios sets both
    # aside, the ratio of the two medians does not.
    results = {"qlora_lab": run([1.0, 2.0, 2.0]), "bitsandbytes": run([1.1, 1.1, 2.2])}
    summary = train_step.ratios(results, interleaved=True)
    assert summary["pairs"] == pytest.approx([1.1, 0.55, 1.1])
    assert summary["throughput"] == pytest.approx(1.1) and summary["peak_memory"] is None
    assert train_step.ratios(results)["throughput"] == pytest.approx(0.55)
    assert train_step.ratios(results)["pairs"] is None
    with pytest.raises(ValueError):
        train_step.ratios({"qlora_lab": run([1.0]), "bitsandbytes": run([1.0, 2.0])}, interleaved=True)


def test_seven_b_measures_one_step(tiny_run):
    from qlora_lab.support.model_config import count_parameters, read_model_config

    _, out = tiny_run
    data = json.loads((out / "seven_b.json").read_text())
    r = data["result"]
    counts = count_parameters(read_model_config(dict(TINY_CONFIG)))
    assert r["quantized_weights"] == counts.block_linear
    assert r["parameters"] == counts.total
    assert r["trainable_parameters"] == counts.lora(64)
    assert math.isfinite(r["loss"])
    assert r["step_peak_bytes"] > r["runtime_bytes"] > 0
    assert data["full16_estimate_peak_bytes"] > data["estimate_peak_bytes"] > 0


def test_seven_b_with_8bit_states_keeps_a_quarter_of_the_optimizer_memory(tiny_run):
    _, out = tiny_run
    recipe, eight = (json.loads((out / f"{name}.json").read_text()) for name in ("seven_b", "seven_b_8bit"))
    assert (recipe["settings"]["optimizer"], eight["settings"]["optimizer"]) == ("adamw32", "adamw8")
    trainable = eight["result"]["trainable_parameters"]
    assert (recipe["estimate"]["optimizer"], eight["estimate"]["optimizer"]) == (8 * trainable, 2 * trainable)
    assert eight["estimate_peak_bytes"] == recipe["estimate_peak_bytes"] - 6 * trainable
    assert math.isfinite(eight["result"]["loss"])


def test_run_all_reports_a_failing_benchmark(run_all, tmp_path):
    code = run_all.main(["--output", str(tmp_path / "RESULTS.md"), "--skip", "quantize", "train_step",
                         "--config", "llama-1b"])
    assert code == 1
    page = (tmp_path / "RESULTS.md").read_text()
    assert "**Failed:**" in page and "no config called 'llama-1b'" in page


def test_bench_scripts_run_as_scripts():
    """``python bench/X.py --help`` works from any directory (bench/ puts itself on the path)."""
    import subprocess

    for name in ("train_step", "seven_b", "run_all", "streaming_load"):
        done = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--help"], capture_output=True,
                              text=True, cwd="/", check=False)
        assert done.returncode == 0, done.stderr
        assert "usage:" in done.stdout


def test_streaming_load_measures_a_load_and_deletes_the_checkpoint(tiny_config, tmp_path, capsys):
    streaming_load = _load("streaming_load")
    assert streaming_load.main(["--config", tiny_config, "--dir", str(tmp_path), "--threads", "1",
                                "--json", str(tmp_path / "out.json")]) == 0
    data = json.loads((tmp_path / "out.json").read_text())
    r = data["result"]
    assert data["written"]["files"] == 1 and r["checkpoint_bytes"] == data["written"]["total_bytes"]
    assert r["peak_bytes"] > r["runtime_bytes"] > 0 and r["model_bytes"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # the checkpoint is gone
    assert "target: the whole load under 8.00 GB" in capsys.readouterr().out


def test_the_step_profile_puts_each_operator_in_its_category_and_counts_matmul_flops(train_step):
    """--profile torch: a matrix product is 'matmul' with its 2 n^3 FLOPs, a log-softmax is
    'loss', and what no operator took is overhead; the shares add up to the wall time."""
    from torch.profiler import ProfilerActivity, profile

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        torch.mm(a, b).log_softmax(-1).relu()
    spent, flops = train_step.profile_breakdown(prof, wall=1.0)
    assert spent["matmul"] > 0 and spent["loss"] > 0 and spent["other operators"] > 0
    assert spent["dequantization"] == 0 and spent["optimizer"] == 0
    assert math.isclose(sum(spent.values()), 1.0)
    assert flops == 2 * 512 ** 3
    summary = train_step.profile_summary(prof, wall=1.0, peak=1e9)
    assert "Python and framework overhead" in summary and f"{flops / 1e9:.1f} GFLOP" in summary
    assert train_step.matmul_peak_flops(size=128, repeats=3) > 1e6
