"""qlora_lab.lora: LoRALinear, add_lora, merging, peft's adapter format.

Equality with peft is exact (``torch.equal``): LoRALinear rounds as peft's
``lora.Linear.forward`` does (its fused add only where that is exact), and merging
forms ``(B @ A) * scaling`` as peft's ``get_delta_weight`` does. The only
tolerances are where the arithmetic legitimately differs: a merged layer
computes ``x (W + s B A)^T`` in one matmul instead of ``x W^T + s (x A^T) B^T``,
and ``(W + d) - d`` is not ``W`` in floating point.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qlora_lab  # noqa: F401  (before bitsandbytes, which peft imports)
from qlora_lab import lora
from qlora_lab.lora import (
    LoRALinear,
    add_lora,
    adapter_state_dict,
    load_adapter,
    lora_modules,
    lora_parameter_count,
    merge_lora,
    save_adapter,
    trainable_parameters,
    unmerge_lora,
)
from qlora_lab.support.checks import assert_close_to_rounding

peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _quiet_peft():
    # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` property.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def peft_model(base, r, alpha, targets, dropout=0.0):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(base, config)


def randomize_adapters(model, seed=1, std=0.05):
    """Non-zero B (A is already random) so that the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)


def copy_adapters_into_peft(ours, theirs):
    with torch.no_grad():
        for name, layer in lora_modules(ours).items():
            target = theirs.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)


def merge_terms(model) -> int:
    """Float32 terms whose summation order merging changes: each adapted layer's sum over its inputs
    (x @ (W + d).T against x @ W.T + x @ d.T); at worst every such rounding reaches the logits."""
    return sum(layer.base.in_features for layer in lora_modules(model).values())


def peft_layer(theirs, name):
    return theirs.base_model.model.get_submodule(name)


# --------------------------------------------------------------------------- #
# LoRALinear
# --------------------------------------------------------------------------- #
def test_initialisation_b_zero_a_kaiming_and_output_unchanged():
    base = nn.Linear(64, 32)
    layer = LoRALinear(base, r=4, alpha=8)
    assert layer.lora_A.shape == (4, 64) and layer.lora_B.shape == (32, 4)
    assert layer.lora_A.dtype == torch.float32
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform with a = sqrt(5) on fan_in 64
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert layer.scaling == 2.0
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), base(x))


def test_forward_is_base_plus_scaled_low_rank_update():
    layer = LoRALinear(nn.Linear(48, 24), r=3, alpha=6)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 7, 48)
    expected = layer.base(x) + (layer.alpha / layer.r) * x @ layer.lora_A.T @ layer.lora_B.T
    assert torch.equal(layer(x), expected)  # alpha / r = 2 scales exactly, so the same products round the same


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("r, alpha", [(16, 16), (64, 16), (8, 16), (12, 16), (3, 5)])
def test_forward_has_pefts_rounding_in_every_dtype(dtype, r, alpha):
    """When alpha / r is a power of two the forward adds the scaled update in
    one fused operation; the result must still be peft's
    ``result + update * scaling`` bit for bit. Small weights make float16 products
    reach its subnormal range, where only peft's order gives peft's result."""
    torch.manual_seed(7)
    base = nn.Linear(32, 24, bias=False).to(dtype)
    layer = LoRALinear(base, r=r, alpha=alpha, adapter_dtype=dtype)
    with torch.no_grad():
        base.weight.mul_(1e-4)  # small outputs too, so that the update is not lost in the sum
        layer.lora_B.normal_(0, 1e-4)
    x = torch.randn(64, 32, dtype=dtype)
    with torch.no_grad():
        expected = base(x) + F.linear(F.linear(x, layer.lora_A), layer.lora_B) * layer.scaling
        assert torch.equal(layer(x), expected)


def test_only_the_adapter_is_trainable_and_gets_gradients():
    layer = LoRALinear(nn.Linear(16, 8), r=2, alpha=4)
    nn.init.normal_(layer.lora_B)
    layer(torch.randn(4, 16)).sum().backward()
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_a_wrapper_takes_the_training_mode_of_the_layer_it_wraps():
    # An adapter loaded into a model in eval mode must not drop inputs: the
    # wrapper is created in the mode of its base layer, so outputs are repeatable.
    base = nn.Linear(16, 8).eval()
    layer = LoRALinear(base, r=2, alpha=4, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    assert not layer.training and not layer.lora_dropout.training
    x = torch.randn(4, 16)
    assert torch.equal(layer(x), layer(x))
    assert LoRALinear(nn.Linear(16, 8), r=2, alpha=4, dropout=0.5).training


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"r": 0}, ValueError, "at least 1"),
        ({"r": -2}, ValueError, "at least 1"),
        ({"r": 2.0}, TypeError, "must be an int"),
        ({"r": True}, TypeError, "must be an int"),
        ({"alpha": 0}, ValueError, "positive"),
        ({"alpha": -1.0}, ValueError, "positive"),
        ({"alpha": float("nan")}, ValueError, "positive"),
        ({"alpha": "16"}, TypeError, "must be a number"),
        ({"dropout": 1.0}, ValueError, "0 <= dropout < 1"),
        ({"dropout": -0.1}, ValueError, "0 <= dropout < 1"),
        ({"adapter_dtype": torch.int8}, TypeError, "floating-point"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, error, match):
    args = {"r": 4, "alpha": 8, "dropout": 0.0} | kwargs
    with pytest.raises(error, match=match):
        LoRALinear(nn.Linear(8, 8), **args)


def test_bad_base_layers_are_refused():
    with pytest.raises(TypeError, match="in_features and out_features"):
        LoRALinear(nn.ReLU(), r=2, alpha=2)
    with pytest.raises(TypeError, match="cannot be nested"):
        LoRALinear(LoRALinear(nn.Linear(4, 4), r=2, alpha=2), r=2, alpha=2)


def test_16_bit_base_float32_adapter_matches_peft_bit_for_bit():
    """peft up-casts a bfloat16 layer's adapter to float32 (autocast_adapter_dtype)
    and casts the input to it and the sum back; so does LoRALinear."""
    torch.manual_seed(3)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(32, 16, bias=False).to(torch.bfloat16))
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    ours = copy.deepcopy(model)
    add_lora(ours, r=4, alpha=8, target_modules=["proj"])
    randomize_adapters(ours)
    copy_adapters_into_peft(ours, theirs)
    assert peft_layer(theirs, "proj").lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    y = ours(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, theirs(x))


class PackedLinear(nn.Module):
    """A stand-in for a 4-bit layer: the weight lives in a non-float buffer and
    the forward reconstructs it (like chapter 05's LinearNF4)."""

    def __init__(self, weight: torch.Tensor, with_hook: bool):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.scale = weight.abs().max() / 127
        self.register_buffer("weight", torch.round(weight / self.scale).to(torch.int8))
        if with_hook:
            self.add_to_weight = self._add_to_weight

    def forward(self, x):
        return x @ (self.weight.float() * self.scale).T

    def _add_to_weight(self, delta):
        self.weight = torch.round(self.weight.float() + delta / self.scale).to(torch.int8)


def test_forward_never_reads_the_base_weight_and_merge_needs_the_protocol():
    torch.manual_seed(4)
    packed = PackedLinear(torch.randn(8, 16), with_hook=False)
    layer = LoRALinear(packed, r=2, alpha=4)
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), packed(x))
    with pytest.raises(TypeError, match="add_to_weight"):
        layer.merge()
    assert not layer.merged

    hooked = LoRALinear(PackedLinear(torch.randn(8, 16), with_hook=True), r=2, alpha=4)
    nn.init.normal_(hooked.lora_B, std=5.0)
    before = hooked.base.weight.clone()
    hooked.merge()
    assert hooked.merged and not torch.equal(hooked.base.weight, before)
    hooked.unmerge()
    assert (hooked.base.weight.int() - before.int()).abs().max() <= 1  # re-rounding, as with any quantized merge


def test_merge_twice_or_unmerge_unmerged_is_an_error():
    layer = LoRALinear(nn.Linear(4, 4), r=1, alpha=1)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


# --------------------------------------------------------------------------- #
# add_lora
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear", ["self_attn.o_proj", "down_proj"]])
def test_add_lora_selects_the_same_layers_and_counts_like_peft(tiny, targets, capsys):
    theirs = peft_model(copy.deepcopy(tiny), r=4, alpha=8, targets=targets)
    report = add_lora(tiny, r=4, alpha=8, target_modules=targets)
    peft_names = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(lora_modules(tiny)) == peft_names
    theirs.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == str(report)
    assert report == trainable_parameters(tiny)
    assert {n for n, p in tiny.named_parameters() if p.requires_grad} == {
        f"{name}.lora_{w}" for name in peft_names for w in "AB"}


def test_all_linear_skips_the_output_head(tiny):
    add_lora(tiny, r=2, alpha=4, target_modules="all-linear")
    assert isinstance(tiny.lm_head, nn.Linear)
    assert len(lora_modules(tiny)) == 2 * 7


def test_a_string_target_is_a_full_match_regex_like_peft(tiny):
    add_lora(tiny, r=2, alpha=4, target_modules=r".*layers\.1\.self_attn\.(q|k)_proj")
    assert list(lora_modules(tiny)) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]


def test_unknown_targets_list_the_linear_layers(tiny):
    with pytest.raises(ValueError, match=r"\['qproj'\] matched no module.*k_proj, lm_head, o_proj, q_proj"):
        add_lora(tiny, r=2, alpha=4, target_modules=["q_proj", "qproj"])
    with pytest.raises(ValueError, match="regular expression matched against the full module name"):
        add_lora(tiny, r=2, alpha=4, target_modules="q_proj")
    with pytest.raises(ValueError, match="LlamaMLP, which is not a linear layer"):
        add_lora(tiny, r=2, alpha=4, target_modules=["mlp"])
    with pytest.raises(TypeError, match="target_modules"):
        add_lora(tiny, r=2, alpha=4, target_modules=[])
    assert not lora_modules(tiny)  # nothing changed by the failed calls
    assert all(p.requires_grad for p in tiny.parameters())


def test_add_lora_twice_is_refused(tiny):
    add_lora(tiny, r=2, alpha=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(tiny, r=2, alpha=4, target_modules=["v_proj"])


# --------------------------------------------------------------------------- #
# Equivalence with peft: outputs and gradients
# --------------------------------------------------------------------------- #
def assert_same_as_peft(base, ids, targets, r=8, alpha=16, dropout=0.0, train=False):
    theirs = peft_model(copy.deepcopy(base), r=r, alpha=alpha, targets=targets, dropout=dropout)
    ours = copy.deepcopy(base)
    add_lora(ours, r=r, alpha=alpha, dropout=dropout, target_modules=targets)
    randomize_adapters(ours)
    copy_adapters_into_peft(ours, theirs)
    ours.train(train)
    theirs.train(train)
    torch.manual_seed(5)  # the same dropout masks, drawn in the same order
    logits_ours = ours(ids).logits
    torch.manual_seed(5)
    logits_theirs = theirs(ids).logits
    assert torch.equal(logits_ours, logits_theirs)
    logits_ours.float().logsumexp(-1).mean().backward()
    logits_theirs.float().logsumexp(-1).mean().backward()
    for name, layer in lora_modules(ours).items():
        other = peft_layer(theirs, name)
        assert torch.equal(layer.lora_A.grad, other.lora_A["default"].weight.grad), name
        assert torch.equal(layer.lora_B.grad, other.lora_B["default"].weight.grad), name
    return ours, theirs


def test_same_outputs_and_gradients_as_peft_tiny(tiny):
    ids = torch.randint(0, 512, (2, 24))
    assert_same_as_peft(tiny, ids, "all-linear", r=4, alpha=8)
    assert_same_as_peft(tiny, ids, ["q_proj", "v_proj"], r=1, alpha=3)


def test_same_outputs_and_gradients_as_peft_with_dropout_in_training(tiny):
    assert_same_as_peft(tiny, torch.randint(0, 512, (2, 16)), "all-linear", r=4, alpha=8, dropout=0.1, train=True)


def test_same_outputs_and_gradients_as_peft_smollm2(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("LoRA freezes the pretrained weights and learns a low-rank update.",
                    return_tensors="pt").input_ids
    assert_same_as_peft(model, ids, ["q_proj", "v_proj", "down_proj"], r=8, alpha=16)


# --------------------------------------------------------------------------- #
# Merging
# --------------------------------------------------------------------------- #
def test_merge_equals_peft_merge_and_unmerge_restores(tiny):
    ids = torch.randint(0, 512, (2, 16))
    original = {n: p.clone() for n, p in tiny.named_parameters()}
    theirs = peft_model(copy.deepcopy(tiny), r=4, alpha=8, targets="all-linear")
    add_lora(tiny, r=4, alpha=8, target_modules="all-linear")
    randomize_adapters(tiny)
    copy_adapters_into_peft(tiny, theirs)
    with torch.no_grad():
        separate = tiny(ids).logits
        merge_lora(tiny)
        theirs.merge_adapter()
        for name, layer in lora_modules(tiny).items():
            assert layer.merged
            assert torch.equal(layer.base.weight, peft_layer(theirs, name).base_layer.weight), name
        merged = tiny(ids).logits
        terms = merge_terms(tiny)  # same function, other summation order: float32 rounding only
        assert_close_to_rounding(merged, separate, terms=terms, why="merged: one sum per layer instead of two")
        assert not torch.equal(lora_modules(tiny)["model.layers.0.self_attn.q_proj"].base.weight,
                               original["model.layers.0.self_attn.q_proj.weight"])
        unmerge_lora(tiny)
        for name, layer in lora_modules(tiny).items():
            # (W + d) - d rounds twice, by at most eps/2 x |W + d| and eps/2 x |W|: within 2 eps x (|W| + |d|).
            weight = original[f"{name}.weight"]
            assert_close_to_rounding(layer.base.weight, weight, terms=2, why="(W + d) - d",
                                     magnitude=weight.abs() + layer.delta_weight().abs())
        assert_close_to_rounding(tiny(ids).logits, separate, terms=terms,
                                 why="unmerged weights W up to rounding; each adapted layer's sum reorders")


def test_merge_and_unload_gives_a_plain_model(tiny):
    ids = torch.randint(0, 512, (1, 12))
    add_lora(tiny, r=2, alpha=4, target_modules=["q_proj", "up_proj"])
    randomize_adapters(tiny)
    with torch.no_grad():
        expected = tiny(ids).logits
        terms = merge_terms(tiny)
        merge_lora(tiny, unload=True)
        assert not lora_modules(tiny)
        assert type(tiny.model.layers[0].self_attn.q_proj) is nn.Linear
        assert_close_to_rounding(tiny(ids).logits, expected, terms=terms, why="merged: one sum per layer instead of two")


def test_merge_without_adapters_is_an_error(tiny):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(tiny)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        unmerge_lora(tiny)


# --------------------------------------------------------------------------- #
# peft's on-disk format, both directions
# --------------------------------------------------------------------------- #
def test_stock_peft_loads_our_adapter_with_the_same_logits(tiny, tmp_path):
    base = copy.deepcopy(tiny)
    add_lora(tiny, r=4, alpha=8, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    randomize_adapters(tiny)
    tiny.eval()
    path = save_adapter(tiny, tmp_path / "adapter")
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.05)
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert config["bias"] == "none" and config["base_model_name_or_path"] is None

    from safetensors.torch import load_file

    keys = set(load_file(str(path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 4 * 2

    loaded = peft.PeftModel.from_pretrained(base, str(path))
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, tiny(ids).logits)


def test_we_load_an_adapter_peft_saved(tiny, tmp_path):
    base = copy.deepcopy(tiny)
    theirs = peft_model(tiny, r=4, alpha=16, targets="all-linear")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    theirs.save_pretrained(str(tmp_path / "peft"))
    report = load_adapter(base, tmp_path / "peft")
    assert report.trainable == sum(p.numel() for n, p in theirs.named_parameters() if "lora_" in n)
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(base(ids).logits, theirs(ids).logits)


def test_round_trip_through_peft_on_smollm2(smollm2, tmp_path):
    model, tokenizer = smollm2
    ours = copy.deepcopy(model)
    add_lora(ours, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    randomize_adapters(ours, std=0.02)
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        model.name_or_path
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = copy.deepcopy(model)
    load_adapter(back, tmp_path / "theirs")
    ids = tokenizer("Adapters in peft's format.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = ours(ids).logits
        assert torch.equal(theirs(ids).logits, expected)
        assert torch.equal(back(ids).logits, expected)


def test_partial_targets_are_saved_by_full_name(tiny, tmp_path):
    base = copy.deepcopy(tiny)
    add_lora(tiny, r=2, alpha=4, target_modules=["layers.0.self_attn.q_proj"])
    save_adapter(tiny, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "a"))
    adapted = [n for n, m in loaded.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert adapted == ["base_model.model.model.layers.0.self_attn.q_proj"]


def test_load_into_existing_adapters(tiny, tmp_path):
    source = copy.deepcopy(tiny)
    add_lora(source, r=2, alpha=4, target_modules=["v_proj"])
    randomize_adapters(source)
    save_adapter(source, tmp_path / "a")
    add_lora(tiny, r=2, alpha=4, target_modules=["v_proj"])
    load_adapter(tiny, tmp_path / "a")
    assert all(torch.equal(a.lora_B, b.lora_B) for a, b in zip(lora_modules(tiny).values(),
                                                                 lora_modules(source).values()))
    other = copy.deepcopy(tiny)
    merge_lora(other)
    with pytest.raises(ValueError, match="unmerge_lora"):
        load_adapter(other, tmp_path / "a")


# --------------------------------------------------------------------------- #
# Saving safely
# --------------------------------------------------------------------------- #
def test_save_replaces_an_adapter_but_not_other_directories(tiny, tmp_path):
    add_lora(tiny, r=2, alpha=4, target_modules=["q_proj"])
    target = save_adapter(tiny, tmp_path / "a")
    randomize_adapters(tiny)
    save_adapter(tiny, target)  # an adapter directory is replaced
    from safetensors.torch import load_file

    saved = load_file(str(target / "adapter_model.safetensors"))
    assert torch.equal(saved["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"],
                       lora_modules(tiny)["model.layers.0.self_attn.q_proj"].lora_B)

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"not part of an adapter \(notes.txt\).*overwrite=True"):
        save_adapter(tiny, busy)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    save_adapter(tiny, busy, overwrite=True)
    assert sorted(p.name for p in busy.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        save_adapter(tiny, tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "busy", "file"]  # no temporary leftovers


def test_a_failed_save_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    add_lora(tiny, r=2, alpha=4, target_modules=["q_proj"])
    save_adapter(tiny, tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(tiny, tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        save_adapter(tiny, tmp_path / "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before


def test_save_without_adapters_or_with_mixed_ranks_is_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapter(tiny, tmp_path / "a")
    add_lora(tiny, r=2, alpha=4, target_modules=["q_proj"])
    tiny.model.layers[0].mlp.up_proj = LoRALinear(tiny.model.layers[0].mlp.up_proj, r=3, alpha=4)
    with pytest.raises(ValueError, match=r"different values of r \(\[2, 3\]\)"):
        save_adapter(tiny, tmp_path / "a")
    assert not (tmp_path / "a").exists()


# --------------------------------------------------------------------------- #
# Loading validates before it changes anything
# --------------------------------------------------------------------------- #
@pytest.fixture
def saved_adapter(tmp_path):
    from qlora_lab.models import tiny_llama

    model = tiny_llama()
    add_lora(model, r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    return save_adapter(model, tmp_path / "adapter")


def edit_weights(path, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "adapter_model.safetensors"))
    edit(state)
    save_file(state, str(path / "adapter_model.safetensors"))


def edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


KEY = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (lambda p: (p / "adapter_config.json").unlink(), FileNotFoundError, "no adapter_config.json"),
        (lambda p: (p / "adapter_model.safetensors").unlink(), FileNotFoundError, "no adapter_model.safetensors"),
        (lambda p: (p / "adapter_model.safetensors").rename(p / "adapter_model.bin"), ValueError, "safetensors only"),
        (lambda p: (p / "adapter_model.safetensors").write_bytes(b"garbage"), ValueError, "not a readable"),
        (lambda p: (p / "adapter_config.json").write_text("{"), ValueError, "not valid JSON"),
        (lambda p: edit_config(p, peft_type="IA3"), ValueError, "'IA3' adapter"),
        (lambda p: edit_config(p, use_dora=True), ValueError, "use_dora=True"),
        (lambda p: edit_config(p, r=0), ValueError, "at least 1"),
        (lambda p: edit_config(p, target_modules=["w_proj"]), ValueError, "matched no module"),
        (lambda p: edit_weights(p, lambda s: s.pop(KEY)), ValueError, f"has no '{KEY}'"),
        (lambda p: edit_weights(p, lambda s: s.update({KEY: torch.zeros(48, 3)})), ValueError,
         rf"'{KEY}' has shape \(48, 3\), expected \(48, 2\)"),
        (lambda p: edit_weights(p, lambda s: s.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 96)})),
         ValueError, "'lm_head' is not among the layers"),
        (lambda p: edit_weights(p, lambda s: s.update({"base_model.model.x.lora_magnitude_vector": torch.zeros(2)})),
         ValueError, "not a LoRA weight"),
    ],
)
def test_load_reports_damage_and_leaves_the_model_unchanged(saved_adapter, tiny, damage, error, match):
    damage(saved_adapter)
    with pytest.raises(error, match=match):
        load_adapter(tiny, saved_adapter)
    assert not lora_modules(tiny)
    assert all(p.requires_grad for p in tiny.parameters())


def test_load_accepts_a_target_list_for_several_architectures(saved_adapter, tiny):
    """peft only needs the list as a whole to match (a config may name the
    layers of several model families); each entry must match in add_lora."""
    edit_config(saved_adapter, target_modules=["q_proj", "v_proj", "c_attn"])
    load_adapter(tiny, saved_adapter)
    assert len(lora_modules(tiny)) == 4


def test_saved_directory_has_ordinary_permissions(tiny, tmp_path):
    import os
    import stat

    add_lora(tiny, r=2, alpha=4, target_modules=["q_proj"])
    mask = os.umask(0)
    os.umask(mask)
    path = save_adapter(tiny, tmp_path / "a")
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~mask


def test_load_from_a_missing_directory(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter at"):
        load_adapter(tiny, tmp_path / "nothing")


def test_adapter_state_dict_uses_peft_key_names(tiny):
    add_lora(tiny, r=2, alpha=4, target_modules=["o_proj"])
    assert sorted(adapter_state_dict(tiny)) == [
        f"base_model.model.model.layers.{i}.self_attn.o_proj.lora_{w}.weight" for i in (0, 1) for w in "AB"]


# --------------------------------------------------------------------------- #
# Counting from a config (the seminar's GPT-3 example)
# --------------------------------------------------------------------------- #
GPT3 = {"hidden_size": 12288, "num_hidden_layers": 96, "num_attention_heads": 96}
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32}


def test_gpt3_count_from_the_seminar():
    """2 x d_model x r x L_lora with L_lora = 96 layers x 4 matrices, r = 4."""
    count = lora_parameter_count(GPT3, r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert count == 2 * 12288 * 4 * (96 * 4) == 37_748_736
    # The LoRA paper's other GPT-3 row: r = 1 on W_q and W_v is 4.7M.
    assert lora_parameter_count(GPT3, r=1, target_modules=["q_proj", "v_proj"]) == 4_718_592


def test_llama_7b_guanaco_count_matches_a_model_built_on_the_meta_device():
    from transformers import LlamaConfig, LlamaForCausalLM

    expected = lora_parameter_count(LLAMA_7B, r=64, target_modules="all-linear")
    assert expected == 159_907_840
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_7B, vocab_size=32000))
    report = add_lora(model, r=64, alpha=16, target_modules="all-linear")
    assert report.trainable == expected
    assert report.total - report.trainable == 6_738_415_616


def test_smollm2_count_from_its_config_matches_add_lora(smollm2):
    """SmolLM2 has grouped-query attention (3 key/value heads for 9 query
    heads), so k_proj and v_proj are 576 -> 192, not square."""
    from transformers import LlamaForCausalLM

    model, _ = smollm2
    for targets in (["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear"):
        with torch.device("meta"):
            skeleton = LlamaForCausalLM(model.config)  # the same modules, no weights
        report = add_lora(skeleton, r=8, alpha=16, target_modules=targets)
        assert report.trainable == lora_parameter_count(model.config, r=8, target_modules=targets)
        assert report.total - report.trainable == sum(p.numel() for p in model.parameters())


def test_counting_errors():
    with pytest.raises(ValueError, match="Unknown layer names"):
        lora_parameter_count(LLAMA_7B, r=8, target_modules=["c_attn"])
    with pytest.raises(ValueError, match="intermediate_size"):
        lora_parameter_count(GPT3, r=8, target_modules="all-linear")
    with pytest.raises(ValueError, match="at least 1"):
        lora_parameter_count(LLAMA_7B, r=0)
    with pytest.raises(ValueError, match="hidden_size"):
        lora.linear_shapes({"num_attention_heads": 8})
