"""Chapter 08, part 2: merging, the 4-bit merge's cost, export to a transformers
directory and to GGUF (f16, Q8_0), and the bad inputs of the export command.

A tiny Llama with a 384-token BPE tokenizer stands in for SmolLM2 (with SmolLM2's
49,152 tokens every GGUF read takes half a minute in the gguf package's reader).
"""

from __future__ import annotations

import pytest
import torch

from qlora_lab import __main__ as cli
from qlora_lab.after.chat import load_with_adapter
from qlora_lab.after.export import dequantize_model, export, merge_into_4bit, merged_model
from qlora_lab.after.gguf import load_gguf, permute_for_rope
from qlora_lab.lora import lora_modules
from qlora_lab.models import load_model
from qlora_lab.models.tiny import write_tiny_adapter, write_tiny_chat_model
from qlora_lab.qlora import LinearNF4, quantize_model

IDS = torch.tensor([[5, 17, 40, 3, 99, 120, 7, 250, 11, 2, 64, 300]])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="module")
def adapter(tiny_dir, tmp_path_factory):
    return write_tiny_adapter(tiny_dir, tmp_path_factory.mktemp("adapters") / "a", seed=1)


@pytest.fixture(scope="module")
def reference(adapter):
    """Logits of what the adapter was trained with: NF4 base + adapter beside it."""
    model, _ = load_with_adapter(adapter)
    with torch.no_grad():
        return model(IDS).logits


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_dequantize_model_gives_the_weights_the_4bit_layers_compute_with(tiny_dir):
    model, _ = load_model(str(tiny_dir))
    quantize_model(model)
    layers = {n: m.dequantized_weight() for n, m in model.named_modules() if isinstance(m, LinearNF4)}
    before = logits(model)
    assert dequantize_model(model) == len(layers) == 14
    for name, weight in layers.items():
        assert type(model.get_submodule(name)) is torch.nn.Linear
        assert torch.equal(model.get_submodule(name).weight, weight)
    assert torch.equal(logits(model), before)  # LinearNF4 runs F.linear on these very weights: same kernel, same bits


def test_hf_export_round_trip(tiny_dir, adapter, reference, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert cli.main(["export", "--adapter", str(adapter), "--out", str(out), "--format", "hf"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tokenizer.chat_template
    # Merged W0 + (alpha/r) B A against W0 x + (alpha/r) B (A x): the same function
    # summed in another order; float32 rounding on logits of size ~1.
    assert (logits(loaded) - reference).abs().max() < 1e-4
    assert torch.equal(logits(loaded).argmax(-1), reference.argmax(-1))
    # the adapter changes the model: the export is not just the base
    base, _ = load_model(str(tiny_dir))
    quantize_model(base)
    assert (logits(base) - reference).abs().max() > 0.1


def test_hf_export_from_the_float_base_and_in_float16(tiny_dir, adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    float_model, _ = load_with_adapter(adapter, quantize=False)
    out = export(adapter, tmp_path / "f16", "hf", base="float", dtype=torch.float16)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.float16
    # float16 weights: relative rounding 2^-11 per weight
    assert (logits(loaded.float()) - logits(float_model)).abs().max() < 2e-2


@pytest.mark.parametrize("gguf_type, tolerance", [("f16", 5e-3), ("q8_0", 5e-2)])
def test_gguf_export_round_trip(tiny_dir, adapter, tmp_path, gguf_type, tolerance):
    merged, tokenizer = merged_model(adapter)
    out = tmp_path / "gguf"
    path = export(adapter, out, "gguf", gguf_type=gguf_type)
    assert path == out / f"gguf.{gguf_type}.gguf"
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{path.name}\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    loaded, loaded_tokenizer = load_gguf(path)
    # float16 rounds each weight by at most 2^-11 relative; Q8_0 by half a step of 1/127 of its block's absmax
    difference = (logits(loaded) - logits(merged)).abs().max()
    assert 0 < difference < tolerance
    text = "<|im_start|>user\nConvert the time 7:15 pm, please!<|im_end|>"
    assert loaded_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert loaded_tokenizer.eos_token == "<|im_end|>"
    assert torch.equal(logits(loaded).argmax(-1), logits(merged).argmax(-1))


def test_rope_permutation_is_undone_by_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.arange(12 * 4 * 5, dtype=torch.float32).reshape(12 * 4, 5).numpy()
    permuted = permute_for_rope(w, 4)
    assert not (permuted == w).all()
    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 4})
    assert (processor.process(permuted, "blk.0.attn_q.weight").weights == w).all()


def test_merge_into_4bit_loses_part_of_the_update(tiny_dir, adapter):
    model, _ = load_with_adapter(adapter)
    report = merge_into_4bit(model)
    assert report.layers == 14 and not lora_modules(model)
    assert all(isinstance(m, LinearNF4) for n, m in model.named_modules() if n.endswith("_proj"))
    assert 0 < report.error_norm < report.update_norm
    assert 0 < report.unchanged_fraction < 1
    # an adapter that changes nothing (B = 0) re-quantizes to the same 4-bit codes
    zero, _ = load_with_adapter(adapter)
    with torch.no_grad():
        for layer in lora_modules(zero).values():
            layer.lora_B.zero_()
    report = merge_into_4bit(zero)
    assert report.update_norm == 0 and report.unchanged_fraction == 1.0


def test_an_existing_output_directory_is_never_overwritten(adapter, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for fmt in ("hf", "gguf"):
        with pytest.raises(FileExistsError, match="never overwrites"):
            export(adapter, out, fmt)
        assert cli.main(["export", "--adapter", str(adapter), "--out", str(out), "--format", fmt]) == 2
        assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no staging directory left behind


def test_unknown_format_and_type(adapter, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown format 'onnx'.*'hf'.*'gguf'"):
        export(adapter, tmp_path / "x", "onnx")
    with pytest.raises(ValueError, match="unknown GGUF type 'q4_k'"):
        export(adapter, tmp_path / "x", "gguf", gguf_type="q4_k")
    assert cli.main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "x"), "--format", "onnx"]) == 2
    assert "unknown format" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_adapter_for_another_base_and_base_without_tokenizer(tiny_dir, adapter, narrower_base, tmp_path, capsys):
    other = narrower_base
    with pytest.raises(ValueError, match="does not fit this base model.*shape"):
        export(adapter, tmp_path / "out1", "hf", model=str(other))
    bare = tmp_path / "bare"
    load_model(str(tiny_dir), with_tokenizer=False).save_pretrained(bare)
    assert cli.main(["export", "--adapter", str(adapter), "--model", str(bare), "--out", str(tmp_path / "out2")]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
