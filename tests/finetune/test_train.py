"""The training loop: resume equals uninterrupted, data errors (killed and damaged runs: test_reliability.py),
the CLI's presets, adapters that stock peft loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_lab.finetune import data as data_lib
from qlora_lab.finetune.train import TrainConfig, preset, train
from qlora_lab.support.resume import latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def tiny_config(data_dir, **overrides) -> TrainConfig:
    settings = dict(model="tiny-llama", data=str(data_dir), max_steps=6, batch_size=4, gradient_accumulation_steps=2,
                    max_length=64, lora_dropout=0.1, eval_every=3, save_every=2, eval_examples=8,
                    eval_batch_size=8, gradient_checkpointing=True)
    settings.update(overrides)
    return preset("smollm2-cpu", **settings)


def adapter_tensors(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = train(tiny_config(small_data), out, progress="none")
    return out, result


def test_a_run_trains_and_writes_everything(uninterrupted):
    out, result = uninterrupted
    assert len(result.history) == 6
    assert result.history[0]["lr"] < result.history[-1]["lr"] == pytest.approx(1e-3)  # warmup, then constant
    assert [e["step"] for e in result.evaluations] == [0, 3, 6]
    assert result.evaluations[-1]["eval_loss"] < result.evaluations[0]["eval_loss"]
    assert all(h["grad_norm"] > 0 for h in result.history)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 6
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_resume_reaches_the_same_adapter_bit_for_bit(uninterrupted, small_data, tmp_path):
    class Interrupted(Exception):
        pass

    def stop_at_step_3(entry):
        if entry["step"] == 3:
            raise Interrupted  # after step 3, whose checkpoint does not exist (save_every=2)

    with pytest.raises(Interrupted):
        train(tiny_config(small_data), tmp_path, progress="none", on_step=stop_at_step_3)
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"
    resumed = train(tiny_config(small_data), tmp_path, progress="none", resume=True)
    assert resumed.resumed_from == 2
    reference_out, reference = uninterrupted
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in reference.history]
    ours, theirs = adapter_tensors(tmp_path), adapter_tensors(reference_out)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_a_malformed_line_stops_the_run_before_training(small_data, tmp_path):
    bad = tmp_path / "data"
    bad.mkdir()
    lines = (small_data / "train.jsonl").read_text().splitlines()
    lines[4] = '{"messages": [{"role": "user", "content": "hi"}]}'  # no assistant reply
    (bad / "train.jsonl").write_text("\n".join(lines) + "\n")
    (bad / "validation.jsonl").write_text((small_data / "validation.jsonl").read_text())
    with pytest.raises(data_lib.DataFormatError, match=r"train\.jsonl:5: the conversation ends with a user message"):
        train(tiny_config(bad), tmp_path / "out", progress="none")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_starting_over_an_existing_run_is_refused(uninterrupted, small_data):
    out, _ = uninterrupted
    with pytest.raises(FileExistsError, match="resume"):
        train(tiny_config(small_data), out, progress="none")


def test_resume_without_a_checkpoint_is_explained(small_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(tiny_config(small_data), tmp_path, progress="none", resume=True)


def test_the_adapter_loads_in_stock_peft(uninterrupted):
    from peft import PeftModel

    from qlora_lab.models import load_model

    out, result = uninterrupted
    base = load_model("tiny-llama", with_tokenizer=False)
    peft_model = PeftModel.from_pretrained(base, out / "adapter")
    ours = adapter_tensors(out)
    loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(ours)
    for key, value in ours.items():
        peft_key = key.replace(".weight", ".default.weight")
        assert torch.equal(loaded[peft_key], value), key


# --------------------------------------------------------------------------- #
# Presets and the command line
# --------------------------------------------------------------------------- #
def test_the_7b_preset_is_the_guanaco_recipe():
    config = preset("llama-7b-gpu")
    assert (config.method, config.quant_type, config.double_quant, config.compute_dtype) == ("qlora", "nf4", True, "bfloat16")
    assert (config.r, config.lora_alpha, config.lora_dropout, config.target_modules) == (64, 16.0, 0.1, "all-linear")
    assert (config.optimizer, config.learning_rate, config.max_grad_norm) == ("paged_adamw_32bit", 2e-4, 0.3)
    assert (config.batch_size, config.gradient_accumulation_steps, config.max_steps) == (1, 16, 1875)
    assert config.warmup_ratio == 0.03 and config.warmup_steps == 57
    assert config.gradient_checkpointing and config.group_by_length


def test_presets_reject_unknown_or_bad_settings():
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpt-5")
    with pytest.raises(ValueError, match="unknown setting"):
        preset("smollm2-cpu", learning_rat=1.0)
    with pytest.raises(ValueError, match="lora_r is now r"):
        preset("smollm2-cpu", lora_r=8)
    with pytest.raises(ValueError, match="max_steps must be a positive integer"):
        preset("smollm2-cpu", max_steps=0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        preset("smollm2-cpu", warmup_ratio=1.5)


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "qlora_lab", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cli_refuses_the_7b_preset_without_a_gpu(tmp_path):
    result = run_cli("finetune", "--preset", "llama-7b-gpu", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr and "--dry-run" in result.stderr
    assert not (tmp_path / "run").exists()


def test_cli_dry_run_prints_the_recipe_and_the_memory_estimate():
    result = run_cli("finetune", "--preset", "llama-7b-gpu", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert '"learning_rate": 0.0002' in result.stdout and '"r": 64' in result.stdout
    assert "memory estimate for llama-7b" in result.stdout
    assert "full 16-bit finetuning of the same model would peak at about" in result.stdout


def test_cli_explains_bad_arguments(tmp_path):
    result = run_cli("finetune", "--preset", "smollm2-cpu", "--set", "r=abc", "--out", str(tmp_path))
    assert result.returncode == 2 and "r=abc" in result.stderr
    result = run_cli("finetune", "--preset", "smollm2-cpu", "--set", "lora_r=8", "--out", str(tmp_path))
    assert result.returncode == 2 and "lora_r is now r" in result.stderr
    result = run_cli("finetune", "--preset", "smollm2-cpu", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path))
    assert result.returncode == 2 and "--data" in result.stderr and "no such file or directory" in result.stderr


# --------------------------------------------------------------------------- #
# Reading a checkpoint back runs no code
# --------------------------------------------------------------------------- #
class _RunsCode:
    """A pickled object that calls os.mkdir(path) when it is unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_checkpoint_that_would_run_code_is_refused(uninterrupted, small_data, tmp_path):
    import shutil

    out, _ = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoint-4", run / "checkpoint-4")
    state = run / "checkpoint-4" / "training_state.pt"
    marker = tmp_path / "code-ran"
    saved = torch.load(state, weights_only=True)
    saved["rng"]["python"] = _RunsCode(marker)
    torch.save(saved, state)
    # The trainer state records each file's SHA-256, so this edit is caught before torch.load sees the file:
    with pytest.raises(ValueError, match=r"training_state\.pt is damaged: its contents changed after it was written"):
        train(tiny_config(small_data), run, progress="none", resume=True)
    assert not marker.exists()
    # A checkpoint without the digests (written by hand, or by an older course) reaches torch.load, which refuses:
    trainer_state = run / "checkpoint-4" / "trainer_state.json"
    trainer_state.write_text(json.dumps({k: v for k, v in json.loads(trainer_state.read_text()).items() if k != "files"}))
    with pytest.raises(ValueError, match=r"training_state\.pt holds Python objects besides tensors and plain data, "
                                         r"which could run code while loading, so it was refused"):
        train(tiny_config(small_data), run, progress="none", resume=True)
    assert not marker.exists()
    torch.load(state, weights_only=False)  # what the course used to do: the file's code runs
    assert marker.is_dir()
