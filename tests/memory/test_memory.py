"""Tests of the memory model (qlora_lab.memory): exact parameter counts, the
NF4 storage against bitsandbytes, the activation derivation against the
tensors autograd really saves, the paper's claims, and the estimate against
a measured training step of SmolLM2."""

from __future__ import annotations

import json

import matplotlib
import pytest
import torch

import qlora_lab  # noqa: F401  (before bitsandbytes)
from qlora_lab import memory
from qlora_lab.memory import activations, report
from qlora_lab.memory import GB, estimate
from qlora_lab.memory import measured_step
from qlora_lab.support import model_config

matplotlib.use("Agg")

# peft calls a transformers method that transformers 5 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


# --------------------------------------------------------------------------- #
# Parameters
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name, expected", [
    ("llama-7b", 6_738_415_616),
    ("llama-13b", 13_015_864_320),
    ("llama-33b", 32_528_943_616),
    ("llama-65b", 65_285_660_672),
])
def test_llama_parameter_counts_are_exact(name, expected):
    assert model_config.count_parameters(name).total == expected


def test_smollm2_count_matches_the_real_model(smollm2):
    model, _ = smollm2
    real = sum(p.numel() for p in model.parameters())
    assert real == 134_515_008
    counts = model_config.count_parameters(model.config)
    assert counts.total == real
    # Tied embeddings: the lm_head is the embedding, so neither is quantized.
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert counts.block_linear == linear


def test_every_way_to_pass_a_config_gives_the_same_count(tmp_path):
    path = model_config.CONFIG_DIR / "llama-7b.json"
    values = json.loads(path.read_text())
    (tmp_path / "config.json").write_text(path.read_text())
    ways = ["llama-7b", "LLaMA-7B", path, str(path), values, model_config.read_model_config(values), tmp_path]
    assert {model_config.count_parameters(way).total for way in ways} == {6_738_415_616}


def test_lora_count_r64_all_linear_layers_of_llama_7b():
    # 32 layers x 64 x (q, k, v, o: 4096+4096 each; gate, up: 4096+11008; down: 11008+4096)
    per_layer = 64 * (4 * 8192 + 3 * 15104)
    assert model_config.count_parameters("llama-7b").lora(64) == 32 * per_layer == 159_907_840


def test_counting_builds_the_model_on_the_meta_device(monkeypatch):
    """65 billion parameters are counted without allocating 130 GB."""
    from transformers import AutoModelForCausalLM

    built = []
    original = AutoModelForCausalLM.from_config

    def spy(config, **kwargs):
        built.append(original(config, **kwargs))
        return built[-1]

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", spy)
    model_config.count_parameters_of_json.cache_clear()
    assert model_config.count_parameters("llama-65b").total == 65_285_660_672
    assert len(built) == 1
    assert {p.device.type for p in built[0].parameters()} == {"meta"}


# --------------------------------------------------------------------------- #
# NF4 storage
# --------------------------------------------------------------------------- #
def test_nf4_bits_per_weight_are_the_papers():
    n = 4096 * 11008
    assert memory.nf4_storage_bytes(n, double_quant=False) * 8 / n == pytest.approx(4 + 32 / 64)
    assert memory.nf4_storage_bytes(n) * 8 / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-6)
    e = estimate("llama-7b", "qlora")
    linear_bytes = e.weights - model_config.count_parameters("llama-7b").other * 2
    assert linear_bytes * 8 / model_config.count_parameters("llama-7b").block_linear == pytest.approx(4.127, abs=5e-4)


@pytest.mark.parametrize("shape", [(1536, 576), (192, 576), (33, 7)])
def test_nf4_storage_equals_the_tensors_bitsandbytes_keeps(shape):
    import bitsandbytes.functional as F

    w = torch.randn(shape)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    kept = (packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
            + state.state2.absmax.numel() * 4 + state.offset.numel() * 4)
    assert kept == memory.nf4_storage_bytes(w.numel())


# --------------------------------------------------------------------------- #
# Activations: the derivation against what autograd saves
# --------------------------------------------------------------------------- #
def _saved_bytes(model, ids) -> int:
    """Bytes of every distinct storage autograd saves in a forward pass with
    the loss, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


def _tiny(layers, dtype, attention, method, dropout=0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=layers, vocab_size=100, tie_word_embeddings=False,
                         attn_implementation=attention)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    if method != "full16":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                 target_modules="all-linear"))
    return model.train(), config


CASES = [
    ("full16", torch.float32, "sdpa", 0.0),
    ("full16", torch.bfloat16, "sdpa", 0.0),
    ("full16", torch.bfloat16, "eager", 0.0),
    ("lora16", torch.float32, "sdpa", 0.0),
    ("lora16", torch.float32, "eager", 0.0),
    # bf16 base: peft keeps the adapters in fp32 and casts each input
    ("lora16", torch.bfloat16, "sdpa", 0.0),
    # dropout: every adapter keeps its own dropped input and mask
    ("lora16", torch.float32, "sdpa", 0.1),
    ("lora16", torch.bfloat16, "eager", 0.1),
]


@pytest.mark.parametrize("method, dtype, attention, dropout", CASES)
def test_activation_model_is_exactly_what_autograd_saves(method, dtype, attention, dropout):
    batch, seq = 2, 32
    ids = torch.randint(0, 100, (batch, seq))
    two, config = _tiny(2, dtype, attention, method, dropout)
    three, _ = _tiny(3, dtype, attention, method, dropout)
    saved_two, saved_three = _saved_bytes(two, ids), _saved_bytes(three, ids)

    adapter = None
    if method != "full16":
        adapter = next(p.dtype for n, p in two.named_parameters() if "lora_A" in n)
    adapter_bytes = adapter.itemsize if adapter is not None else 1
    per_layer = activations.activation_breakdown(
        config, method, seq_len=seq, lora_r=8, compute_dtype=dtype, adapter_dtype=adapter,
        lora_dropout=dropout, dropout_mask_bytes=adapter_bytes,  # PyTorch's CPU dropout: mask in the input dtype
        attention=attention)
    assert (saved_three - saved_two) == sum(per_layer.values()) * batch * seq

    head = activations.head_breakdown(config, method, compute_dtype=dtype)
    outside = sum(head.values()) - head["loss backward"]  # the backward buffers are not saved tensors
    expected_outside = outside * batch * seq + activations.rope_table_bytes(config, seq, dtype)
    # The loss also keeps one fp32 scalar (the total weight).
    assert saved_two - 2 * (saved_three - saved_two) - expected_outside in (0, 4)


def test_lora_saves_almost_as_much_as_full_finetuning():
    full = sum(activations.activation_breakdown("llama-7b", "full16").values())
    lora = sum(activations.activation_breakdown("llama-7b", "qlora").values())
    assert (full, lora) == (186_504, 171_016)


# --------------------------------------------------------------------------- #
# The paper's claims
# --------------------------------------------------------------------------- #
def test_full_16bit_finetuning_of_65b_needs_over_780_gb():
    e = estimate("llama-65b", "full16")
    assert e.weights + e.gradients + e.optimizer == 12 * 65_285_660_672
    assert e.total > memory.PAPER_FULL16_65B_GB * GB


def test_qlora_65b_fits_one_48gb_gpu_and_16bit_lora_does_not():
    assert estimate("llama-65b", "qlora").total < 48 * GB <= memory.gpu_capacity_bytes(48)
    assert estimate("llama-65b", "lora16").total > memory.gpu_capacity_bytes(80)


def test_qlora_33b_fits_a_24gb_consumer_gpu():
    assert estimate("llama-33b", "qlora").total < memory.gpu_capacity_bytes(24)


def test_table6_memory_column_within_15_percent_like_with_like():
    """The column is the deployed model (see the module docstring): weights,
    adapters and the key/value cache of the full 2048-token context."""
    rows = report.paper_comparison()
    assert len(rows) == 6
    for row in rows:
        assert abs(row["deployment_vs_paper"]) < 0.15, row


def test_the_column_is_not_a_finetuning_total():
    """The paper's own 7B base model (5,048 MB, Sec. 2) plus the training
    state of the r = 64 adapters is already more than the column's 5 GB."""
    e = estimate("llama-7b", "qlora")
    assert 5_048e6 + e.adapters + e.gradients + e.optimizer > memory.PAPER_MEMORY_GB["llama-7b"] * GB


def test_defaults_are_the_papers_setting():
    """Figure 6's batch 1 x 512 tokens, trained with the Guanaco recipe."""
    e = estimate("llama-7b", "qlora")
    assert (e.seq_len, e.batch, e.gradient_checkpointing, e.lora_r) == (512, 1, True, 64)
    assert e.settings["adapter_dtype"] == "torch.bfloat16" and e.settings["optimizer_state_bytes"] == 8


def test_lora_weights_of_0_2_percent_take_26_mb():
    params = 0.002 * model_config.count_parameters("llama-7b").total
    assert params * 2 / 1e6 == pytest.approx(26, rel=0.05)


# --------------------------------------------------------------------------- #
# Sanity
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", memory.LLAMA_SIZES)
def test_methods_are_ordered(name):
    full, lora, qlora = (estimate(name, m).total for m in ("full16", "lora16", "qlora"))
    assert full > lora > qlora


@pytest.mark.parametrize("method", memory.METHODS)
def test_totals_grow_with_model_size(method):
    totals = [estimate(name, method).total for name in memory.LLAMA_SIZES]
    assert totals == sorted(totals) and len(set(totals)) == 4


@pytest.mark.parametrize("method", memory.METHODS)
def test_activations_grow_with_tokens_and_shrink_with_checkpointing(method):
    base = estimate("llama-7b", method)
    assert estimate("llama-7b", method, seq_len=1024).activations > base.activations
    assert estimate("llama-7b", method, batch=2).activations > base.activations
    no_ckpt = estimate("llama-7b", method, gradient_checkpointing=False)
    assert no_ckpt.activations > 5 * base.activations
    # Everything but the activations is independent of the batch.
    assert estimate("llama-7b", method, batch=4).total - estimate("llama-7b", method, batch=4).activations \
        == base.total - base.activations
    assert estimate("llama-7b", method, attention="eager").activations >= base.activations


def test_adapter_memory_grows_with_rank():
    small, large = estimate("llama-7b", "qlora", lora_r=8), estimate("llama-7b", "qlora", lora_r=64)
    assert large.adapters == 8 * small.adapters
    assert large.total > small.total
    assert estimate("llama-7b", "full16", lora_r=8).total == estimate("llama-7b", "full16").total


def test_table_prints_every_component_in_gb():
    text = estimate("llama-7b", "qlora").table()
    for word in (*memory.MemoryEstimate.COMPONENTS, "total", "GB", "llama-7b", "r=64"):
        assert word in text
    assert "6.12 GB" in text
    assert report.estimates_table([estimate("llama-7b", m) for m in memory.METHODS]).count("\n") == 3


def test_the_chart_has_every_bar_and_gpu_line():
    import matplotlib.pyplot as plt

    fig = report.plot_breakdown()
    ax = fig.axes[0]
    assert len(ax.patches) == 4 * 3 * 5
    levels = sorted(line.get_ydata()[0] for line in ax.get_lines())
    assert levels == pytest.approx([memory.gpu_capacity_bytes(gb) / GB for gb in (24, 48, 80)])
    plt.close(fig)


# --------------------------------------------------------------------------- #
# Bad inputs
# --------------------------------------------------------------------------- #
def test_config_without_a_needed_field_names_it():
    with pytest.raises(ValueError, match="'intermediate_size'"):
        estimate({"model_type": "gpt2"}, "qlora")
    from transformers import PretrainedConfig

    with pytest.raises(ValueError, match="'hidden_size'"):
        estimate(PretrainedConfig(), "qlora")
    with pytest.raises(ValueError, match="'model_type'"):
        estimate({"hidden_size": 64}, "qlora")


def test_unknown_config_and_wrong_types():
    with pytest.raises(ValueError, match="llama-7b"):
        estimate("llama-8b", "qlora")
    with pytest.raises(TypeError, match="config must be"):
        estimate(7, "qlora")


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="full16, lora16, qlora"):
        estimate("llama-7b", "qlora4")
    with pytest.raises(ValueError, match="full16, lora16, qlora"):
        measured_step.measure_training_step("int8")


@pytest.mark.parametrize("argument", ["seq_len", "batch", "lora_r"])
@pytest.mark.parametrize("value, error", [(0, ValueError), (-3, ValueError), (1.5, TypeError), (True, TypeError)])
def test_non_positive_sizes_are_refused(argument, value, error):
    with pytest.raises(error, match=argument):
        estimate("llama-7b", "qlora", **{argument: value})


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="attention"):
        estimate("llama-7b", "qlora", attention="flash")
    with pytest.raises(ValueError, match="compute_dtype"):
        estimate("llama-7b", "qlora", compute_dtype="int3")
    with pytest.raises(ValueError, match="lora_dropout"):
        estimate("llama-7b", "qlora", lora_dropout=1.5)
    with pytest.raises(ValueError, match="bits"):
        memory.deployment_footprint("llama-7b", bits=8)
    with pytest.raises(ValueError, match="package.module:function"):
        measured_step.measure_training_step("qlora", builder="no_colon_here")


# --------------------------------------------------------------------------- #
# Estimate against measurement
# --------------------------------------------------------------------------- #
# The estimate against one measured training step of SmolLM2 (peak, resident
# model and activations, both methods) is chapter 03's section 7, checked by its
# asserts under nbval in `make test`; it is not repeated here.
