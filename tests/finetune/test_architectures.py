"""Today's open models, at tiny size: both backends finetune a random model of
each architecture (Llama, Mistral, Qwen2, Gemma 2; qlora_lab.models.tiny), built
from its transformers config and saved as a model directory, as a download
would be. Each run: quantize -> LoRA -> 2 steps -> adapter saved -> reloaded in
stock peft on a base that transformers quantizes with bitsandbytes, giving the
trained model's logits."""

import json

import pytest
import torch
from safetensors.torch import load_file

import qlora_lab  # noqa: F401  (before bitsandbytes)
from qlora_lab.__main__ import main
from qlora_lab.finetune.backends import bitsandbytes_config
from qlora_lab.finetune.train import preset, train
from qlora_lab.models.tiny import TINY_ARCHITECTURES, write_tiny_chat_model
from qlora_lab.qlora import LinearNF4
from qlora_lab.support.bitsandbytes_cpu import keep_compute_dtype_path

BACKENDS = ("qlora_lab", "bitsandbytes")
LINEAR_LAYERS = 2 * 7  # two blocks of q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")
    return {a: write_tiny_chat_model(root / f"tiny-{a}", architecture=a) for a in TINY_ARCHITECTURES}


def four_bit_layers(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, (LinearNF4, bnb.nn.Linear4bit)) for m in model.modules())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_each_architecture_finetunes_in_4_bits_and_reloads_in_stock_peft(architecture, backend, model_dirs,
                                                                         small_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = model_dirs[architecture]
    # Without double quantization the course's quantize_4bit gives bitsandbytes' bytes
    # (chapter 02), so the reloaded base is the trained one exactly.
    config = preset("smollm2-cpu", model=str(model_dir), backend=backend, data=str(small_data), double_quant=False,
                    max_steps=2, batch_size=2, max_length=64, eval_every=2, save_every=1, eval_examples=4,
                    eval_batch_size=4)
    result = train(config, tmp_path, progress="none")
    losses = result.losses()
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    assert four_bit_layers(result.model) == LINEAR_LAYERS
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == 2 * LINEAR_LAYERS and any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(model_dir)

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                quantization_config=bitsandbytes_config("nf4", False, torch.float32))
    # On a CPU with AVX-512 BF16 bitsandbytes would switch to a bfloat16 kernel in eval mode.
    reloaded = keep_compute_dtype_path(PeftModel.from_pretrained(base, tmp_path / "adapter").eval())
    ids = torch.tensor([[1, 17, 230, 300, 9, 42]])
    with torch.no_grad():
        expected = keep_compute_dtype_path(result.model.eval())(ids).logits
        got = reloaded(ids).logits
    # The same 4-bit weights, the same adapter; the two backends' layers order the
    # float operations alike, so the logits agree to float32 rounding at most.
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 64 * torch.finfo(torch.float32).eps * scale


def test_finetune_as_a_new_user_types_it(guanaco_dir, model_dirs, tmp_path, monkeypatch, capsys):
    """No --preset (this machine's default), no --out (runs/<model name>): a
    tiny random Qwen2 on data in the Guanaco schema."""
    monkeypatch.chdir(tmp_path)
    code = main(["finetune", "--data", str(guanaco_dir), "--model", str(model_dirs["qwen2"]), "--max-steps", "2",
                 "--progress", "none"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    warned = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and "go 4.0 times through the 4 training examples" in warned[0]  # one line, no path
    if not torch.cuda.is_available():
        assert "preset: smollm2-cpu (the default on this machine" in captured.err
    assert "output: runs/tiny-qwen2 (--out chooses another directory)" in captured.err
    assert "read as guanaco (train 4, validation 1 conversations" in captured.out
    assert (tmp_path / "runs" / "tiny-qwen2" / "adapter" / "adapter_model.safetensors").is_file()
    # the same command again refuses to overwrite the run
    assert main(["finetune", "--data", str(guanaco_dir), "--model", str(model_dirs["qwen2"]), "--max-steps", "2",
                 "--progress", "none"]) == 2
    assert "already holds a run" in capsys.readouterr().err
