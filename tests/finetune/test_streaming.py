"""The streaming 4-bit load (qlora_lab.finetune.streaming): the same model as loading
then quantizing, a host peak far below the 16-bit model, clear errors."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

import qlora_lab  # noqa: F401  (before bitsandbytes)
from qlora_lab.finetune.streaming import QUANTIZE_TEMPORARY_BYTES, checkpoint_files, load_memory, load_quantized
from qlora_lab.qlora import LinearNF4, quantize_model
from qlora_lab.support.checkpoints import measure_load, write_random_checkpoint


def small_config(**overrides) -> LlamaConfig:
    settings = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    settings.update(overrides)
    return LlamaConfig(**settings)


@pytest.mark.parametrize("tied", [False, True])
def test_the_streamed_model_is_load_then_quantize_buffer_for_buffer(tmp_path, tied):
    """Sharded like a real checkpoint (about 200 kB per shard here), with a
    tensor an old LLaMA checkpoint carries but today's model computes (the
    rotary frequencies), which is skipped. SmolLM2 ties its embeddings."""
    info = write_random_checkpoint(small_config(tie_word_embeddings=tied), tmp_path, max_shard_bytes=200_000)
    assert info["files"] > 2
    save_file({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16)}, str(tmp_path / "extra.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.rotary_emb.inv_freq"] = "extra.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))

    torch.manual_seed(3)
    expected_rng = torch.get_rng_state()
    streamed, report = load_quantized(tmp_path, dtype=torch.float32)
    assert torch.equal(torch.get_rng_state(), expected_rng), "loading must not move the random stream"
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    quantize_model(reference, compute_dtype=torch.float32)
    ours, theirs = streamed.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert report.quantized_layers == 14 and report.skipped == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert sum(isinstance(m, LinearNF4) for m in streamed.modules()) == 14
    assert (streamed.lm_head.weight is streamed.model.embed_tokens.weight) == tied
    assert not streamed.training and str(streamed.name_or_path) == str(tmp_path)
    ids = torch.randint(0, 1000, (2, 9))
    assert torch.equal(streamed(ids).logits, reference(ids).logits)


def test_the_load_never_holds_the_16bit_model(tmp_path):
    """A small LLaMA (8 layers, hidden 1024, 0.12 B parameters: 238 MB in
    bfloat16) in shards of 100 MB, loaded in a fresh process onto the CPU,
    where the 4-bit model stays. The whole process's peak must be within the
    runtime + the 4-bit model + the largest tensor + a stated margin: the
    quantization temporaries of the largest linear layer (13 bytes per weight,
    2.9 M weights: 37 MB) and 16 MiB of allocator slack. That bound is about
    157 MB above the runtime, two thirds of the 16-bit model; measured: about
    125 MB (transformers with BitsAndBytesConfig: about 295 MB)."""
    config = small_config(vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=16)
    write_random_checkpoint(config, tmp_path, max_shard_bytes=100 * 10**6)
    r = measure_load(tmp_path, backend="qlora_lab", dtype=torch.bfloat16, device="cpu", threads=1)
    largest_linear = 2816 * 1024
    margin = QUANTIZE_TEMPORARY_BYTES * largest_linear + 16 * 2**20
    above = r["peak_bytes"] - r["runtime_bytes"]
    assert r["checkpoint_bytes"] == 238_323_712 and r["largest_tensor_bytes"] == 8000 * 1024 * 2
    assert above <= r["model_bytes"] + r["largest_tensor_bytes"] + margin, r
    assert r["model_bytes"] + r["largest_tensor_bytes"] + margin < 0.7 * r["checkpoint_bytes"]
    # chapter 07's account of the load (what --dry-run prints) covers what was measured.
    account = load_memory(config, file_dtype=torch.bfloat16, dtype=torch.bfloat16, device="cpu")
    assert account.resident == pytest.approx(r["model_bytes"], rel=1e-3)  # the code tables aside
    assert above <= account.total <= 1.3 * above


def test_load_memory_on_a_gpu_leaves_one_tensor_on_the_host():
    on_gpu = load_memory("llama-7b", file_dtype=torch.float16, dtype=torch.bfloat16, device="cuda")
    assert on_gpu.resident == 0 and on_gpu.transient == 32000 * 4096 * 2  # the embedding, as read
    on_cpu = load_memory("llama-7b", file_dtype=torch.float16, dtype=torch.bfloat16, device="cpu")
    assert 3.8e9 < on_cpu.resident < 3.9e9  # NF4 + DQ weights and bfloat16 embeddings, norms, lm_head


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #
def test_a_directory_without_safetensors_is_explained(tmp_path):
    small_config().save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(ValueError, match=r"has no safetensors checkpoint .* it holds pytorch_model\.bin, which are "
                                         r"pickle files.*--backend bitsandbytes"):
        load_quantized(tmp_path)


def test_missing_shards_and_tensors_are_named(tmp_path):
    write_random_checkpoint(small_config(), tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    lost = index["weight_map"].pop("model.norm.weight")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"has no tensor for model\.norm\.weight"):
        load_quantized(tmp_path)
    (tmp_path / lost).unlink()
    with pytest.raises(FileNotFoundError, match=f"names shards that are not in .*{lost}.*incomplete"):
        checkpoint_files(tmp_path)


def test_a_directory_without_config_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="There is no checkpoint directory"):
        load_quantized(tmp_path / "nothing")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_quantized(tmp_path)


def test_where_a_checkpoint_is(monkeypatch, tmp_path):
    import huggingface_hub.constants

    from qlora_lab.models import ModelNotAvailableError, checkpoint_directory, smollm2_cache_path

    assert checkpoint_directory("smollm2") == smollm2_cache_path()
    small_config().save_pretrained(tmp_path)
    assert checkpoint_directory(str(tmp_path)) == tmp_path
    with pytest.raises(ValueError, match="tiny-llama is built in memory"):
        checkpoint_directory("tiny-llama")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotAvailableError, match=r"Could not download 'someone/some-7b'.*hf download someone/"
                                                     r"some-7b --local-dir DIR"):
        checkpoint_directory("someone/some-7b")
